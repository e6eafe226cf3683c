"""Where datasets live: the data path (``--data`` / ``$HIRES_DATA``), the cache folder
(``$HIRES_CACHE``, default ``~/.cache/hires``) and a cache of decoded arrays, so that
image decoding happens once per version of the source.

A cache entry is named after its source's content (:func:`source_key`) and holds a
digest of its arrays; an entry whose arrays do not match that digest or fail the
loader's check (shapes, dtypes, label range) is decoded again, not used."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from ..errors import UserError

__all__ = ["DatasetNotFoundError", "cache_dir", "cached_arrays", "check_splits", "data_root", "source_key"]


class DatasetNotFoundError(FileNotFoundError, UserError):
    """A dataset's files are missing or do not have the expected layout."""


def cache_dir() -> Path:
    """``$HIRES_CACHE`` or ``~/.cache/hires`` (created if needed)."""
    path = Path(os.environ.get("HIRES_CACHE") or Path.home() / ".cache" / "hires").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_root(path: str | os.PathLike | None, what: str = "dataset") -> Path | None:
    """The explicit ``path``, else ``$HIRES_DATA``, else None."""
    if path is None or str(path) == "":
        path = os.environ.get("HIRES_DATA") or None
    return None if path is None else Path(path).expanduser()


_DIGEST = "__digest__"


def source_key(path: Path, *extra) -> str:
    """A short key that changes when the content of ``path`` or ``extra`` changes: for a
    folder, every file's relative path, size and modification time; for a file (an
    archive), a hash of its bytes, so that an archive replaced by another with the same
    size and time still gets a new key."""
    path = Path(path).resolve()
    h = hashlib.blake2b(repr(extra).encode(), digest_size=12)
    if path.is_dir():
        h.update(str(path).encode())
        for p in sorted(path.rglob("*")):
            if p.is_file():
                st = p.stat()
                h.update(f"\n{p.relative_to(path).as_posix()}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return f"{path.name.split('.')[0]}-{h.hexdigest()}"


def _digest(arrays: dict) -> str:
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes() if a.dtype.kind in "OU" else memoryview(a).cast("B"))
    return h.hexdigest()


def _load_entry(path: Path, check) -> dict:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    stored = arrays.pop(_DIGEST, None)
    if stored is None or str(stored) != _digest(arrays):
        raise ValueError("its arrays do not match their digest")
    if check is not None:
        check(arrays)
    return arrays


def cached_arrays(key: str, build, check=None) -> dict:
    """The arrays cached as ``key``.npz, or ``build()``'s (a dict of arrays), saved there
    first. ``check(arrays)`` raises ValueError for arrays that ``build`` cannot have
    returned; a cached entry that fails it or its digest is built again."""
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            return _load_entry(path, check)
        except Exception as e:  # damaged, foreign or edited: never use it
            print(f"hires: cached dataset {path} is unusable ({e}); decoding the source again", file=sys.stderr)
    arrays = build()
    if check is not None:
        try:
            check(arrays)
        except ValueError as e:
            raise DatasetNotFoundError(f"the decoded dataset {key} is not usable: {e}") from None
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays, **{_DIGEST: np.array(_digest(arrays))}))
    return arrays


def check_splits(arrays: dict) -> None:
    """The layout of a decoded dataset with ``classes`` and ``{train,test}_{x,y}``:
    uint8 ``[N, 3, H, W]`` images, one int64 label each in range, and every class
    present in the training split. Raises ValueError naming what is wrong."""
    n_classes = len(arrays["classes"])
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"{split} images are {x.dtype} {x.shape}, not uint8 [N, 3, H, W]")
        if y.dtype != np.int64 or y.shape != (len(x),):
            raise ValueError(f"{split} labels are {y.dtype} {y.shape}, not int64 [{len(x)}]")
        if len(y) and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{split} labels span {y.min()}..{y.max()}, outside 0..{n_classes - 1}")
    missing = sorted(set(range(n_classes)) - set(np.unique(arrays["train_y"]).tolist()))
    if missing:
        raise ValueError(f"classes {[str(arrays['classes'][i]) for i in missing]} have no training images")
