"""Ctrl-C and SIGTERM stop a search cleanly.

The handler raises KeyboardInterrupt, as Python's own does, and also records
the request: Python drops an exception raised while a finalizer or weakref
callback runs ("Exception ignored in ..."), so the driver and each trial's
callback call `raise_if_requested()` to stop at the next batch all the same.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()


def install() -> None:
    """Route SIGINT and SIGTERM through `_handler` (main thread only, as `signal` requires)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handler)


def raise_if_requested() -> None:
    if _requested.is_set():
        raise KeyboardInterrupt("interrupted")


def clear() -> None:
    """Forget a request: for a process (or a test) that goes on after an interrupt."""
    _requested.clear()


def _handler(signum: int, frame) -> None:
    _requested.set()
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
