"""Named points of a search where a test makes a fault happen, as a real one would.

With SEARCH_FAULT_AT=<point> the process kills itself there (SIGKILL: nothing runs
after it, as with an out-of-memory kill or a node lost); with
SEARCH_FAULT_AT=<point>:pause=<seconds> it says so on stdout and waits, so that a
test can stop the tracking server at that very moment. Unset (always, outside
tests), nothing happens.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "SEARCH_FAULT_AT"
POINTS = (
    "trial_run_ended",  # a trial's run ended in MLflow, the oracle not yet told (nor its state saved)
    "search_end",  # everything done, the search run about to be ended
    "registered",  # a new version registered, not yet tagged or made champion
    "compared",  # the new version compared with the champion and tagged, the alias not yet moved
    "champion_moved",  # the champion alias moved to the new version, previous_champion not yet set
)


def at(point: str) -> None:
    """The fault SEARCH_FAULT_AT names, if it names `point` (one of POINTS)."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}: add it to POINTS")
    name, _, action = os.environ.get(ENV, "").partition(":")
    if name != point:
        return
    if action.startswith("pause="):
        seconds = float(action.removeprefix("pause="))
        print(f"fault point {point}: pausing {seconds:g} s", flush=True)
        time.sleep(seconds)
        return
    print(f"fault point {point}: killed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
