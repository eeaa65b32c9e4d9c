"""One trial, the same wherever it trains, in this process or in a Ray worker: `run_trial`,
its lifecycle driven by a Keras callback.

`begin` opens the trial's nested run. In the first epoch its training is timed
until its cost per image is measured; a trial too costly for the final training
this machine can afford is cut there. Each epoch is logged, the disk is checked
for room for the epoch's checkpoint where checkpoints are written, and the
median rule decides whether the trial goes on. `end` fails a trial whose loss
became NaN, logs its summary and closes the run.

A fault that must stop the search rather than fail the trial (a tracking store that
stopped answering, a full disk) is `SearchStopped`, wherever it happens.
"""

from __future__ import annotations

import errno
import math
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol

import keras
import keras_tuner as kt
import numpy as np

from experiments import SearchConfig
from model_zoo import multiply_adds
from search import interrupts
from search.budget import TrainingClock, too_costly
from search.data import Split
from search.tracking import SearchTracker
from search.train import WarmupCosine, evaluation_dataset, training_dataset

CHECKPOINT_HEADROOM_BYTES = 1 << 20  # beyond the weights: HDF5's own structures, the tuner's JSON files


class SearchStopped(kt.errors.FatalError):
    """An error inside a trial that must stop the search, not just fail the trial: a tracking
    call that failed, a full disk (a FatalError, as Keras Tuner names what stops a search).
    `error` is the original (Keras drops the exception's cause)."""

    def __init__(self, trial_id: str, error: Exception, what: str):
        super().__init__(f"{what} in trial {trial_id}: {error}")
        self.trial_id, self.error = trial_id, error


def checkpoint_bytes(weight_bytes: int) -> float:
    """The room a checkpoint of `weight_bytes` of weights needs on disk."""
    return weight_bytes * 1.1 + CHECKPOINT_HEADROOM_BYTES


def weight_bytes(model: keras.Model) -> int:
    return sum(math.prod(w.shape) * np.dtype(w.dtype).itemsize for w in model.weights)


def check_room(folder: Path, needed: float) -> None:
    """ENOSPC before a checkpoint is written to a disk without room for it: an HDF5 write
    that fails on a full disk leaves a file the process cannot even exit cleanly from."""
    if shutil.disk_usage(folder).free < needed:
        raise OSError(errno.ENOSPC, f"no room for a {needed / 1e6:.1f} MB checkpoint", str(folder))


def failure_reason(traceback_text: str) -> str:
    """A failed trial's reason: the last line of its traceback, the error's class without
    its module (`FailedTrialError: loss became NaN after 2 epoch(s)`)."""
    lines = [line.strip() for line in (traceback_text or "").splitlines() if line.strip()]
    if not lines:
        return "the trial failed without a message"
    kind, colon, message = lines[-1].partition(": ")
    if colon and kind.replace(".", "").replace("_", "").isalnum():
        return f"{kind.rsplit('.', 1)[-1]}: {message}"[:300]
    return lines[-1][:300]


class MedianRule(Protocol):
    """search/pruning.py's `MedianStopping`, or a Ray worker's handle to the driver's."""

    def report(self, trial_id: str, epoch: int, value: float, last: bool = False) -> bool:
        """Record the trial's val_accuracy after `epoch`; whether it should stop there."""

    def end(self, trial_id: str, failed: bool = False) -> None:
        """The trial ended: its curve is a reference for the next trials, unless it `failed`."""


@dataclass(frozen=True)
class TrialSpec:
    """What a trial's lifecycle needs to know, from the tuner (picklable: it travels to Ray workers)."""

    trial_id: str
    hyperparameters: Mapping[str, object]  # the active values, as logged
    planned_epochs: int
    batch_size: int
    max_seconds_per_image: float = math.inf  # costlier, and the trial is cut in its first epoch
    # The median rule, live: the driver's own (search/pruning.py), or on Ray a handle to it.
    pruner: MedianRule | None = None


@dataclass
class TrialResult:
    """How a trial ended: what the tuner books (costs, the median rule's reference, progress)."""

    trial_id: str
    failed: bool
    reason: str = ""  # why it failed
    score: float | None = None  # best val_accuracy
    curve: dict[int, float] = field(default_factory=dict)  # val_accuracy per epoch
    pruned: int | None = None  # epochs trained when the median rule stopped it
    cut: str = ""  # why it was cut as too costly to win
    seconds: float = 0.0
    seconds_per_image: float | None = None  # training, measured in its first epoch


@dataclass(frozen=True)
class TrialData:
    """The digits every trial trains and is scored on, and the held-out kinds' probe."""

    train: Split
    validation: Split
    probe: Split  # validation digits under held-out kinds of change (search/robustness.py)


@dataclass(frozen=True)
class TrialJob:
    """What one trial needs besides the data (picklable: it travels to Ray workers)."""

    spec: TrialSpec  # what its lifecycle needs
    hyperparameters: kt.HyperParameters
    hypermodel: kt.HyperModel
    config: SearchConfig
    weights: list[np.ndarray] | None = None  # Hyperband: the earlier round's weights it continues
    verbose: int = 0  # Keras' progress bars (in a terminal, in this process)
    parent_run_id: str = ""  # the search run a Ray worker logs under
    # The tracking store's credentials, as task arguments: Ray lists a job's runtime_env
    # (`ray list jobs`), not its tasks' arguments.
    credentials: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass
class TrialOutcome:
    """How a trial ended, its best epoch and that epoch's weights, or the fault that must
    stop the search (`stopped`)."""

    result: TrialResult
    metrics: dict[str, float] = field(default_factory=dict)  # at the best val_accuracy epoch
    best_epoch: int = 0
    weights: list[np.ndarray] | None = None  # of the best epoch
    stopped: Exception | None = None  # a fault that stops the search (SearchStopped.error)


def run_trial(job: TrialJob, data: TrialData, tracker: SearchTracker) -> TrialOutcome:
    """One trial, the same wherever it runs: its lifecycle around its training. The run stays
    open when a fault stops the search: the resume ends it and runs the trial again."""
    settings, spec = job.config, job.spec
    keras.backend.clear_session()  # a process runs many trials: free the last one's graph
    lifecycle = TrialLifecycle(tracker, spec)
    try:
        lifecycle.begin()
        failed, reason, watch = True, "", LifecycleCallback(lifecycle)
        try:
            keras.utils.set_random_seed(settings.seed)
            model = job.hypermodel.build(job.hyperparameters.copy())
            if job.weights is not None:
                model.set_weights(job.weights)
            history = job.hypermodel.fit(  # Keras Tuner's hook: model.fit, unless the hypermodel says otherwise
                job.hyperparameters,
                model,
                training_dataset(data.train, settings.batch_size, settings.seed),
                validation_data=evaluation_dataset(data.validation, settings.batch_size),
                initial_epoch=int(job.hyperparameters.values.get("tuner/initial_epoch", 0)),
                epochs=spec.planned_epochs,
                callbacks=[*trial_callbacks(settings, data.probe), watch],
                verbose=job.verbose,
            )
            lifecycle.check_losses(getattr(history, "history", {}).get("loss", []))
            failed = False
        except SearchStopped:
            raise
        except Exception:
            # A Ctrl-C that lands inside TensorFlow can come out as another exception (seen:
            # TypeError from convert_to_tensor). It is the interrupt, not the trial's failure.
            interrupts.raise_if_requested()
            reason = failure_reason(traceback.format_exc())
        result = lifecycle.end(failed, reason, None if failed else lifecycle.best_logs["val_accuracy"])
    except SearchStopped as stop:
        return TrialOutcome(TrialResult(spec.trial_id, True, str(stop)), stopped=stop.error)
    return TrialOutcome(result, lifecycle.best_logs, lifecycle.best_epoch, watch.best_weights)


class TrialLifecycle:
    """One trial from its run's start to its end."""

    def __init__(self, tracker: SearchTracker, spec: TrialSpec):
        self.tracker, self.spec = tracker, spec
        self.clock = TrainingClock(spec.batch_size)
        self.curve: dict[int, float] = {}
        self.best_logs: dict[str, float] = {}
        self.best_epoch = 0
        self.cut = ""
        self.pruned: int | None = None  # epochs trained when the median rule stopped it
        self.param_count = self.multiply_adds = self.checkpoint_bytes = None
        self._judged, self._batches = False, 0

    def replaces_earlier_attempt(self, reason: str) -> None:
        """End the runs an earlier attempt at this trial left RUNNING (its process died) KILLED."""
        self._tracked(self.tracker.end_trial_runs, self.spec.trial_id, "KILLED", reason)

    def begin(self) -> None:
        self._started, self._cpu_started = time.perf_counter(), time.process_time()
        self._tracked(self.tracker.start_trial, self.spec.trial_id, dict(self.spec.hyperparameters))

    def epoch_begins(self) -> None:
        self._epoch_started, self._batches = time.perf_counter(), 0

    def batch_begins(self, batch: int, model: keras.Model) -> None:
        self._batches = batch + 1
        self.clock.batch_begins(batch)
        self._judge_cost(model)

    def epoch_ends(self, epoch: int, logs: Mapping[str, float] | None, model: keras.Model) -> bool:
        """Log the epoch, keep the curve, ask the median rule; whether this epoch is the
        trial's best so far."""
        logs = {key: float(value) for key, value in (logs or {}).items()}
        self.clock.epoch_ends(time.perf_counter() - self._epoch_started, self._batches * self.spec.batch_size)
        self._judge_cost(model)
        if self.param_count is None:  # once per trial, after its first epoch
            self.param_count, self.multiply_adds = model.count_params(), multiply_adds(model)
            self.checkpoint_bytes = checkpoint_bytes(weight_bytes(model))
        self._tracked(self.tracker.log_epoch, self.spec.trial_id, epoch, logs)
        value = logs.get("val_accuracy", math.nan)
        if math.isnan(value):
            return False
        self.curve[epoch] = value
        best = not self.best_logs or value > self.best_logs["val_accuracy"]
        if best:
            self.best_logs, self.best_epoch = logs, epoch
        last = epoch + 1 >= self.spec.planned_epochs
        if self.spec.pruner and not self.cut and self.spec.pruner.report(self.spec.trial_id, epoch, value, last):
            self.pruned = epoch + 1
            model.stop_training = True  # Keras ends the fit after this epoch
        return best

    def check_losses(self, losses: list[float]) -> None:
        """Accuracy stays a number when the loss diverges (Keras stops on NaN and on infinity): fail the trial explicitly."""
        diverged = [loss for loss in losses if not math.isfinite(loss)]
        if not self.curve or diverged:
            what = "infinite" if diverged and not any(math.isnan(loss) for loss in diverged) else "NaN"
            raise kt.errors.FailedTrialError(f"loss became {what} after {len(losses)} epoch(s)")

    def end(self, failed: bool, reason: str = "", score: float | None = None) -> TrialResult:
        """Log the trial's summary and close its run; how it ended."""
        pruned = self.pruned
        seconds = time.perf_counter() - self._started
        summary = {
            "best_val_accuracy": None if failed else score,
            "param_count": self.param_count,
            "multiply_adds": self.multiply_adds,
            "train_seconds_per_image": self.clock.seconds_per_image,
            "wall_time_s": seconds,
            "cpu_seconds": time.process_time() - self._cpu_started,  # every thread of the process
            "epochs_saved": self.spec.planned_epochs - (pruned or 1) if pruned or self.cut else None,
        }
        self._tracked(self.tracker.end_trial, self.spec.trial_id, failed, summary, reason, pruned=pruned, cut=self.cut)
        return TrialResult(
            self.spec.trial_id,
            failed,
            reason,
            None if failed else score,
            dict(self.curve),
            pruned,
            self.cut,
            seconds,
            self.clock.seconds_per_image,
        )

    def _judge_cost(self, model: keras.Model) -> None:
        """Once the trial's cost is measured: cut it if its final training could not get enough epochs."""
        if self._judged or not self.clock.measured:
            return
        self._judged = True
        self.cut = too_costly(self.clock.seconds_per_image, self.spec.max_seconds_per_image)
        if self.cut:
            model.stop_training = True  # Keras ends the epoch after this batch

    def _tracked(self, call: Callable, *args, **kwargs) -> None:
        # Keras Tuner would swallow an ordinary exception and mark the trial failed;
        # a tracking failure must stop the search instead.
        try:
            call(*args, **kwargs)
        except Exception as err:
            raise SearchStopped(self.spec.trial_id, err, "MLflow logging failed") from err


class LifecycleCallback(keras.callbacks.Callback):
    """A trial's lifecycle driven by Keras' own callbacks, keeping the best epoch's weights,
    which the trial returns to the driver."""

    def __init__(self, lifecycle: TrialLifecycle):
        super().__init__()
        self.lifecycle, self.best_weights = lifecycle, None

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.lifecycle.epoch_begins()

    # A begin hook: a batch-end hook turns off Keras' asynchronous dispatch of each batch's logs.
    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        interrupts.raise_if_requested()  # Ctrl-C in this process: stop at the next batch
        self.lifecycle.batch_begins(batch, self.model)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if self.lifecycle.epoch_ends(epoch, logs, self.model):
            self.best_weights = self.model.get_weights()


def trial_callbacks(config: SearchConfig, heldout: Split | None = None) -> list[keras.callbacks.Callback]:
    """Per-trial callbacks (Keras Tuner deep-copies them for every trial): the trial's own
    learning-rate schedule, stop on NaN, stop early, and `val_heldout_accuracy` measured on
    `heldout` (search/robustness.py's heldout_probe) every epoch, before the epoch is logged."""
    callbacks = [keras.callbacks.TerminateOnNaN()]
    if heldout is not None:
        callbacks.append(HeldoutProbe(heldout))
    if config.trial_schedule:
        callbacks.insert(0, WarmupCosine())  # peaks at the trial's learning_rate, over its own epochs
    if config.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=config.objective, mode="max", patience=config.early_stopping_patience))
    return callbacks


class HeldoutProbe(keras.callbacks.Callback):
    """Adds `val_heldout_accuracy` to each epoch's logs: the trial's accuracy on validation
    digits under kinds of change no training imitates. Shown per trial, never scored: the
    held-out kinds measure, they do not choose."""

    def __init__(self, digits: Split):
        super().__init__()
        self.digits = digits

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        if logs is not None:
            # Called eagerly, in chunks: `predict` would trace a function for each trial's model.
            chunks = [self.model(self.digits.x[i : i + 256], training=False) for i in range(0, len(self.digits), 256)]
            predicted = np.concatenate([np.asarray(c).argmax(1) for c in chunks])
            logs["val_heldout_accuracy"] = float((predicted == self.digits.y).mean())
