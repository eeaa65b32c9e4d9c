"""The one loop of a search, whichever backend runs its trials.

Keras Tuner's own loop (`pre_create_trial`, `oracle.create_trial`, the trial,
`oracle.end_trial`, `save`), with one slot per trial that may run at once: one in
this process (search/in_process.py), several on Ray (search/scaleout.py). The
driver alone talks to the oracle, checks the disk, writes the checkpoints where
Keras Tuner keeps them, and owns the median rule, which the running trials ask
live. Every trial runs `search/trial.py`'s `run_trial`, on either backend.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import keras_tuner as kt
import numpy as np

from experiments import SearchConfig
from search import faults, interrupts
from search.data import Split
from search.robustness import heldout_probe
from search.trial import (
    MedianRule,
    SearchStopped,
    TrialData,
    TrialJob,
    TrialOutcome,
    check_room,
    checkpoint_bytes,
    weight_bytes,
)

# Keras Tuner's names for a trial's best weights and its model's build config (tests/test_scaleout.py).
CHECKPOINT, BUILD_CONFIG = "checkpoint.weights.h5", "build_config.json"
RUNNING, STOPPED = kt.engine.trial.TrialStatus.RUNNING, kt.engine.trial.TrialStatus.STOPPED
COMPLETED, FAILED = kt.engine.trial.TrialStatus.COMPLETED, kt.engine.trial.TrialStatus.FAILED


class Backend(Protocol):
    """Where trials run: `start` returns its slots (one per trial at once, by the tuner id
    the oracle knows it by) and the median rule as the trials reach it; `submit` starts a trial and returns its handle; `wait` returns the
    handles of trials that ended (waiting a while); `outcome` is how one ended."""

    verbose: int

    def start(self, tuner: kt.Tuner, data: TrialData) -> tuple[list[str], MedianRule | None]: ...
    def submit(self, job: TrialJob) -> object: ...
    def wait(self, handles: list) -> list: ...
    def outcome(self, handle: object, trial_id: str) -> TrialOutcome: ...
    def cancel(self, handle: object) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Running:
    trial: kt.engine.trial.Trial
    slot: str  # the tuner id Keras Tuner's oracle knows it by
    checkpoint_bytes: float  # the room its checkpoint will need


def drive(tuner: kt.Tuner, backend: Backend, config: SearchConfig, train: Split, validation: Split) -> None:
    """Every trial the tuner's oracle hands out, run by `backend`; returns once all have ended."""
    slots, rule = backend.start(tuner, TrialData(train, validation, heldout_probe(validation, config.seed)))
    try:
        _loop(tuner, backend, config, slots, rule)
    finally:
        backend.close()


def _loop(tuner: kt.Tuner, backend: Backend, config: SearchConfig, free: list[str], rule: MedianRule | None) -> None:
    oracle = tuner.oracle
    oracle.verbose = 0  # Keras Tuner's own tables: the progress lines say it
    tuner.save()  # a resume reloads the oracle only where the tuner was saved
    running: dict[object, Running] = {}
    stopped = False
    try:
        while True:
            interrupts.raise_if_requested()
            while free and not stopped:
                tuner.pre_create_trial()  # the budget's check
                trial = oracle.create_trial(free[0])
                if trial.status == STOPPED:
                    stopped = True
                elif trial.status == RUNNING:
                    job = trial_job(tuner, trial, config, rule, backend.verbose)
                    slot = Running(trial, free.pop(0), checkpoint_room(tuner, trial))
                    check_disk(tuner, [*running.values(), slot])
                    running[backend.submit(job)] = slot
                else:
                    break  # Hyperband waits for the round's running trials
            if not running:
                break
            for handle in backend.wait(list(running)):
                ended = running.pop(handle)
                free.append(ended.slot)
                end_trial(tuner, ended.trial, backend.outcome(handle, ended.trial.trial_id), rule)
            check_disk(tuner, running.values())
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"  # as tracking.tracked_run ends the search run
        for handle, each in running.items():
            backend.cancel(handle)
            with contextlib.suppress(Exception):  # the store may be what failed
                tuner.tracker.end_trial_runs(each.trial.trial_id, status, "the search stopped")
        raise


def trial_job(tuner: kt.Tuner, trial: kt.engine.trial.Trial, config: SearchConfig, rule: MedianRule | None, verbose: int) -> TrialJob:
    """What the trial needs: its spec (the progress line said), and Hyperband's earlier round's weights."""
    earlier = trial.hyperparameters.values.get("tuner/trial_id")
    return TrialJob(
        spec=tuner.trial_spec(trial, rule),
        hyperparameters=trial.hyperparameters.copy(),
        hypermodel=tuner.hypermodel,
        config=config,
        weights=tuner.load_model(tuner.oracle.get_trial(earlier)).get_weights() if earlier else None,
        verbose=verbose,
        parent_run_id=tuner.tracker.run_id,
    )


def checkpoint_room(tuner: kt.Tuner, trial: kt.engine.trial.Trial) -> float:
    """The room the trial's checkpoint will need; none for a configuration that cannot be
    built, which the trial itself then fails with its reason."""
    try:
        return checkpoint_bytes(weight_bytes(tuner.hypermodel.build(trial.hyperparameters.copy())))
    except Exception:
        return 0.0


def check_disk(tuner: kt.Tuner, running) -> None:
    """A disk without room for the running trials' checkpoints stops the search before any is written."""
    running = list(running)
    if running:
        try:
            check_room(Path(tuner.project_dir), sum(each.checkpoint_bytes for each in running))
        except OSError as full:
            raise SearchStopped(running[-1].trial.trial_id, full, "no space left on device") from full


def end_trial(tuner: kt.Tuner, trial: kt.engine.trial.Trial, outcome: TrialOutcome, rule: MedianRule | None) -> None:
    """Tell the oracle how the trial ended, keep its weights as Keras Tuner's checkpoint, and
    make its curve one the median rule holds the next trials against."""
    if outcome.stopped is not None:
        raise SearchStopped(trial.trial_id, outcome.stopped, "a fault that stops the search")
    result = outcome.result
    if rule:
        rule.end(trial.trial_id, result.failed or bool(result.cut))  # a cut trial's partial epoch is no reference
    if not result.failed:
        tuner.oracle.update_trial(trial.trial_id, outcome.metrics, step=outcome.best_epoch)
        save_checkpoint(tuner, trial, outcome.weights)
    trial.status = FAILED if result.failed else COMPLETED
    trial.message = result.reason
    # The trial's run ended before the oracle saves the trial as ended: a kill between the
    # two leaves a trial the oracle runs again and a FINISHED run that the resume marks as
    # run again, never a trial the oracle counts and MLflow lost.
    faults.at("trial_run_ended")
    tuner.oracle.end_trial(trial)
    tuner.save()  # what a resume reloads
    if not result.failed:
        result.score = tuner.oracle.get_trial(trial.trial_id).score
    tuner.trial_ended(result)


def save_checkpoint(tuner: kt.Tuner, trial: kt.engine.trial.Trial, weights: list[np.ndarray]) -> None:
    """The trial's weights where `tuner.load_model(trial)` (and Hyperband's next round) reads them."""
    model = tuner.hypermodel.build(trial.hyperparameters.copy())
    model.set_weights(weights)
    folder = Path(tuner.get_trial_dir(trial.trial_id))
    check_room(folder, checkpoint_bytes(sum(w.nbytes for w in weights)))
    model.save_weights(folder / CHECKPOINT)
    (folder / BUILD_CONFIG).write_text(json.dumps(model.get_build_config()))
