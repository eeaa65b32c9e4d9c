"""Trials one at a time, in this process: the driver's one slot (search/driver.py), each
trial run the moment the driver waits for it, asking the driver's own median rule."""

from __future__ import annotations

import itertools

import keras_tuner as kt

from experiments import SearchConfig
from search.trial import MedianRule, TrialData, TrialJob, TrialOutcome, run_trial


class InProcess:
    """A backend of one slot, in this process; `verbose`: Keras' progress bars (a terminal)."""

    def __init__(self, config: SearchConfig, verbose: int = 0):
        self.config, self.verbose = config, verbose
        self.jobs: dict[int, TrialJob] = {}
        self.outcomes: dict[int, TrialOutcome] = {}
        self.handles = itertools.count()

    def start(self, tuner: kt.Tuner, data: TrialData) -> tuple[list[str], MedianRule | None]:
        self.tracker, self.data = tuner.tracker, data
        return [tuner.tuner_id], tuner.pruner  # Keras Tuner's own name for its one loop

    def submit(self, job: TrialJob) -> int:
        handle = next(self.handles)
        self.jobs[handle] = job
        return handle

    def wait(self, handles: list) -> list:
        handle = handles[0]
        self.outcomes[handle] = run_trial(self.jobs.pop(handle), self.data, self.tracker)
        return [handle]

    def outcome(self, handle: object, trial_id: str) -> TrialOutcome:
        return self.outcomes.pop(handle)

    def cancel(self, handle: object) -> None:
        self.jobs.pop(handle, None)

    def close(self) -> None:
        pass
