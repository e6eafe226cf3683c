"""Read files from a folder, a ``.tar``/``.tar.gz``/``.tgz`` or a ``.zip`` through one
interface, so that image trees are decoded straight from their archive in one pass
(no tens of thousands of small files written to disk)."""

from __future__ import annotations

import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from .cache import DatasetNotFoundError

__all__ = ["is_archive", "list_files", "iter_files"]

_TAR = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith(_TAR) or name.endswith(".zip"))


def data_source(path, missing: str) -> Path:
    """``path`` as a Path when it is a folder or a supported archive; otherwise a
    DatasetNotFoundError (``missing``: what to tell the user when it does not exist)."""
    path = Path(path).expanduser() if path is not None else None
    if path is None or not path.exists():
        raise DatasetNotFoundError(missing.format(path=path))
    if not (path.is_dir() or is_archive(path)):
        raise DatasetNotFoundError(f"{path} is neither a folder nor a .tar.gz/.zip archive")
    return path


def list_files(path: Path) -> list[str]:
    """Relative POSIX paths of every regular file under ``path`` (folder or archive)."""
    path = Path(path)
    if path.is_dir():
        return sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    if not path.exists():
        raise DatasetNotFoundError(f"{path} does not exist")
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                return sorted(i.filename for i in z.infolist() if not i.is_dir())
        with tarfile.open(path) as t:
            return sorted(m.name.lstrip("./") for m in t.getmembers() if m.isfile())
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DatasetNotFoundError(f"{path} is not a readable archive (.tar.gz or .zip): {e}") from e


def iter_files(path: Path, wanted: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(relative path, bytes) of the files under ``path`` for which ``wanted(name)``,
    in the archive's stored order (one sequential pass)."""
    path = Path(path)
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and wanted(rel):
                yield rel, p.read_bytes()
        return
    try:
        if path.name.lower().endswith(".zip"):
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    if not info.is_dir() and wanted(info.filename):
                        yield info.filename, z.read(info)
            return
        with tarfile.open(path, mode="r|*") as t:  # streaming: one pass over a .tar.gz
            for m in t:
                name = m.name.lstrip("./")
                if m.isfile() and wanted(name):
                    yield name, t.extractfile(m).read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        raise DatasetNotFoundError(f"{path} is not a readable archive (.tar.gz or .zip): {e}") from e
