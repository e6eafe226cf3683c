"""CIFAR-10 and CIFAR-100 in the official "python version" format.

``--data`` may name ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``, the
extracted ``cifar-10-batches-py/`` / ``cifar-100-python/`` folder, or a folder holding
either. If nothing is found and ``download=True``, the archive is fetched from the
official URL into that folder (or the cache folder) and checked against its md5.
The pickled batches are read straight from the archive (no extraction needed).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .base import ImageData
from .cache import DatasetNotFoundError, cache_dir

__all__ = ["load_cifar", "download_cifar", "CIFAR"]

CIFAR = {
    "cifar10": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
        meta="batches.meta", names_key="label_names", labels_key="labels",
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "cifar100": dict(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz", md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python", train=["train"], test=["test"],
        meta="meta", names_key="fine_label_names", labels_key="fine_labels",
        mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar(name: str, folder: Path, timeout: float = 10.0) -> Path:
    """Fetch the official archive of ``name`` into ``folder``, verify its md5, return its path."""
    info = CIFAR[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / info["archive"]
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(info["url"], timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        tmp.unlink(missing_ok=True)
        raise DatasetNotFoundError(
            f"{name}: could not download {info['url']} ({e}). Without network access, download "
            f"{info['archive']} elsewhere and pass its path (or its folder) with --data / HIRES_DATA.") from e
    digest = _md5(tmp)
    if digest != info["md5"]:
        tmp.unlink(missing_ok=True)
        raise DatasetNotFoundError(f"{name}: downloaded file has md5 {digest}, expected {info['md5']}")
    os.replace(tmp, dest)
    return dest


def _locate(name: str, root: Path | None) -> Path | None:
    """The archive or extracted folder of ``name`` at or under ``root`` (None if absent)."""
    info = CIFAR[name]
    roots = [root] if root is not None else [cache_dir()]
    for r in roots:
        for cand in (r, r / info["folder"], r / info["archive"]):
            if cand.is_dir() and (cand / info["meta"]).is_file():
                return cand
            if cand.is_file() and cand.name == info["archive"]:
                return cand
        if r.is_file() and tarfile.is_tarfile(r):
            return r
    return None


def _read_members(src: Path, info: dict, names: list[str]) -> dict[str, dict]:
    out = {}
    if src.is_dir():
        for n in names:
            p = src / n
            if not p.is_file():
                raise DatasetNotFoundError(f"{p} is missing (expected the official CIFAR python batches)")
            out[n] = p.read_bytes()
    else:
        try:
            with tarfile.open(src) as t:
                members = {m.name.split("/")[-1]: m for m in t.getmembers()
                           if m.isfile() and m.name.split("/")[-2:-1] == [info["folder"]]}
                for n in names:
                    if n not in members:
                        raise DatasetNotFoundError(
                            f"{src} has no {info['folder']}/{n}: not the official {info['archive']}")
                    out[n] = t.extractfile(members[n]).read()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DatasetNotFoundError(f"{src} is not a readable .tar.gz: {e}") from e
    decoded = {}
    for n, blob in out.items():
        try:
            decoded[n] = pickle.load(io.BytesIO(blob), encoding="bytes")
        except Exception as e:
            raise DatasetNotFoundError(f"{src}: {n} is not a CIFAR python batch ({e})") from e
    return decoded


def load_cifar(name: str, root=None, train: bool = True, download: bool = True) -> ImageData:
    """Load CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels)."""
    if name not in CIFAR:
        raise ValueError(f"unknown CIFAR variant {name!r}; expected one of {sorted(CIFAR)}")
    info = CIFAR[name]
    root = None if root is None else Path(root).expanduser()
    src = _locate(name, root)
    if src is None:
        if not download:
            raise DatasetNotFoundError(
                f"{name} not found at {root or cache_dir()}: expected {info['archive']} or an extracted "
                f"{info['folder']}/ (pass --data PATH or set HIRES_DATA)")
        target = root if root is not None and (root.is_dir() or not root.exists()) else cache_dir()
        src = download_cifar(name, target)
    batches = info["train"] if train else info["test"]
    decoded = _read_members(src, info, [info["meta"], *batches])
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in decoded[info["meta"]][info["names_key"].encode()]]
    xs, ys = [], []
    for b in batches:
        d = decoded[b]
        try:
            x = np.asarray(d[b"data"], dtype=np.uint8)
            y = np.asarray(d[info["labels_key"].encode()], dtype=np.int64)
        except KeyError as e:
            raise DatasetNotFoundError(f"{src}: batch {b} lacks key {e}; is this {name}?") from e
        if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise DatasetNotFoundError(f"{src}: batch {b} has data {x.shape} / {len(y)} labels, expected [N, 3072]")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    y = np.concatenate(ys)
    if y.min() < 0 or y.max() >= len(classes):
        raise DatasetNotFoundError(f"{src}: labels outside 0..{len(classes) - 1}")
    return ImageData(np.concatenate(xs), y, classes, info["mean"], info["std"], name=name)
