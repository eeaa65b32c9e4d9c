"""One process at a time per search: a lock file in the search's output directory.

A search holds `outputs/<search run id>/search.lock` (its process id and host)
while it runs, and so does a resume of it. A second resume of the same search
(a scheduler retrying, a user starting it twice) is refused, naming the
process that holds it; a lock left by a process that has died is taken over.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

LOCK_FILE = "search.lock"


class LockedError(RuntimeError):
    """Another live process holds the search."""


@contextlib.contextmanager
def holding(folder: Path, run_id: str) -> Iterator[Path]:
    """Hold the search's lock in `folder` for the duration of the block."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    for _ in range(2):  # the second try after removing a dead process's lock
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder and _alive(*holder):
                raise LockedError(f"search run {run_id} is already running in process {holder[0]} on {holder[1]} (lock {path})") from None
            path.unlink(missing_ok=True)  # its process is gone: a lock left behind by a kill
            continue
        with os.fdopen(descriptor, "w") as file:
            file.write(f"{os.getpid()} {socket.gethostname()}\n")
        break
    else:
        raise LockedError(f"search run {run_id}: cannot take the lock {path}")
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _holder(path: Path) -> tuple[int, str] | None:
    try:
        pid, host = path.read_text().split()
        return int(pid), host
    except (OSError, ValueError):
        return None


def _alive(pid: int, host: str) -> bool:
    """Whether process `pid` runs; on another host it cannot be checked, so it counts as alive."""
    if host != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
