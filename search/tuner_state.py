"""The tuner's state on disk, kept whole across kills and full disks.

Keras Tuner rewrites its JSON state in place (truncate, then write): a SIGKILL,
SIGTERM or full disk in the middle leaves `oracle.json` or a `trial.json` empty,
and a resume would fail to parse it. After every save of the tuner, a copy of the
whole state is kept (written aside, then renamed into place); a resume that finds
a damaged file goes back to that copy, the state after the last trial that ended.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

GOOD = ".last-good"  # the copy, inside the tuner's project directory


class TunerStateError(RuntimeError):
    """The tuner's state is damaged and no good copy of it is kept."""


def state_files(project_dir: Path) -> list[Path]:
    """The JSON files Keras Tuner reloads: the tuner's, the oracle's and each trial's."""
    return sorted([*project_dir.glob("*.json"), *project_dir.glob("trial_*/trial.json")])


def keep_good_copy(project_dir: Path) -> None:
    """Copy the state just saved aside; a copy that cannot be written (a full disk) leaves
    the previous one, and the search's own disk checks say what to do."""
    staging, good, old = (project_dir / name for name in (f"{GOOD}.new", GOOD, f"{GOOD}.old"))
    try:
        shutil.rmtree(staging, ignore_errors=True)
        for file in state_files(project_dir):
            target = staging / file.relative_to(project_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        shutil.rmtree(old, ignore_errors=True)
        if good.exists():
            os.replace(good, old)  # a kill between these two renames leaves `old`, which restore reads
        os.replace(staging, good)
        shutil.rmtree(old, ignore_errors=True)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)


def restore_if_damaged(project_dir: Path) -> str:
    """Before a resume reloads the tuner: if a state file does not parse, put back the last
    good copy (trials created after it are created again); what was done, or "" when
    nothing was damaged. Raises TunerStateError when there is no good copy."""
    damaged = [file for file in state_files(project_dir) if not _parses(file)]
    if not damaged:
        return ""
    copies = [project_dir / GOOD, project_dir / f"{GOOD}.old"]
    good = next((copy for copy in copies if copy.is_dir() and all(_parses(f) for f in state_files(copy))), None)
    if good is None:
        raise TunerStateError(
            f"tuner state {damaged[0]} is damaged (written when the search stopped) and no earlier copy is kept: "
            "start a new search with `python -m search run`"
        )
    kept = {file.relative_to(good) for file in state_files(good)}
    for file in state_files(project_dir):
        if file.relative_to(project_dir) not in kept:
            file.unlink()  # a trial created after the copy: the oracle creates it again
    for relative in kept:
        partial = (project_dir / relative).with_suffix(".json.restoring")
        shutil.copyfile(good / relative, partial)
        os.replace(partial, project_dir / relative)
    return f"tuner state {damaged[0].relative_to(project_dir)} was damaged; restored the state saved after the last trial that ended"


def _parses(file: Path) -> bool:
    try:
        json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return True
