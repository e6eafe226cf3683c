"""Where datasets live: the data path (``--data`` / ``$HIRES_DATA``), the cache folder
(``$HIRES_CACHE``, default ``~/.cache/hires``) and a cache of decoded arrays, so that
image decoding happens once per source file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = ["DatasetNotFoundError", "cache_dir", "data_root", "source_key", "cached_arrays"]


class DatasetNotFoundError(FileNotFoundError):
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


def source_key(path: Path, *extra) -> str:
    """A short key that changes when ``path`` (file or folder) or ``extra`` changes."""
    path = Path(path).resolve()
    st = path.stat()
    text = f"{path}|{st.st_size}|{st.st_mtime_ns}|{extra}"
    return f"{path.name.split('.')[0]}-{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def cached_arrays(key: str, build):
    """Load ``key``.npz from the cache folder, or call ``build()`` -> dict of arrays
    and save it there first (written to a temporary file, then renamed)."""
    path = cache_dir() / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except Exception:  # a truncated or foreign file: rebuild it
            path.unlink(missing_ok=True)
    arrays = build()
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return arrays
