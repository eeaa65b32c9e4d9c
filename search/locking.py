"""One process at a time per search: a lock on a file in the search's output directory.

A search holds `outputs/<search run id>/search.lock` while it runs, and so does a
resume of it. A second resume of the same search (a scheduler retrying, a user
starting it twice) is refused, naming the process that holds it.

The lock is the kernel's (`flock`), not the file's existence: it goes with the
process that holds it however that process ends, two processes can never both take
it, and a process id written by a container that has since restarted means
nothing. The file's text (process id and host) only names the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
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
    descriptor = _lock(path, run_id)
    try:
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield path
    finally:
        path.unlink(missing_ok=True)  # while still locked: no one can lock this file after it is gone
        os.close(descriptor)


def _lock(path: Path, run_id: str) -> int:
    """A descriptor of `path` holding its lock; raises LockedError naming the holder."""
    while True:
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise LockedError(f"search run {run_id} is already running in {_holder(path)} (lock {path})") from None
        # The holder before us may have removed the file between our open and our lock:
        # that file is no one's lock any more; lock the one at `path` now.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        os.close(descriptor)


def _holder(path: Path) -> str:
    try:
        pid, host = path.read_text().split()
        return f"process {int(pid)} on {host}"
    except (OSError, ValueError):
        return "another process"  # it has the lock and has not written its name yet
