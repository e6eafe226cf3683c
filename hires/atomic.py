"""Files that a reader never sees half-written: each is written to a temporary file
beside its target and renamed over it (``os.replace`` is atomic on one file system).

A process killed between the two steps leaves its temporary behind; the temporary's
name carries the writer's process id, so :func:`remove_stale_temporaries` can tell a
leftover (its writer is gone) from a file that another process is still writing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "remove_stale_temporaries"]

_TEMPORARY = re.compile(r"\.tmp(\d+)(\.[A-Za-z0-9]+)?$")


def _temporary(path: Path) -> Path:
    # The target's suffix stays last: np.savez appends ".npz" to names without it.
    return path.with_name(f"{path.stem}{path.suffix}.tmp{os.getpid()}{path.suffix}")


def atomic_write(path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` to write a temporary file, then rename it to ``path``;
    the temporary is removed if ``write`` fails or is interrupted."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the temporaries in ``folder`` whose writing process no longer runs;
    returns what was deleted."""
    removed = []
    for p in Path(folder).glob("*.tmp*"):
        m = _TEMPORARY.search(p.name)
        if m and p.is_file() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed
