"""The search's output directory (`outputs/<search run id>/`): checked before any
run opens, and a full disk anywhere named as one line with the way to continue."""

from __future__ import annotations

import contextlib
import errno
import gc
import sys
import tempfile
from pathlib import Path

from experiments import ConfigError


def check_writable(folder: Path) -> None:
    """Fail before any run opens when the outputs cannot be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(f"output_dir {folder}: cannot be written ({err.strerror or err})") from None


class DiskFull(RuntimeError):
    """The output directory's file system is full: the search stopped, resumable."""


@contextlib.contextmanager
def naming_a_full_disk(out: Path, run_id: str):
    """A 'no space left' error, wherever it happens, as one line naming the output directory."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DiskFull(
            f"{err.filename or out}: no space left on device; free some, then continue with `python -m search resume {run_id}`"
        ) from None


def quiet_leftovers_of_a_full_disk() -> None:
    """Files half written when the disk filled (an HDF5 checkpoint) fail again when they are
    garbage-collected, and Python prints "Exception ignored ..." under the one line the error
    already printed, at a moment nobody controls. Collect them now, and drop only reports of
    a full disk, for the rest of the process."""
    report = sys.unraisablehook

    def drop_full_disk_reports(unraisable) -> None:
        value = unraisable.exc_value
        if getattr(value, "errno", None) != errno.ENOSPC and "No space left on device" not in str(value):
            report(unraisable)

    sys.unraisablehook = drop_full_disk_reports
    gc.collect()
