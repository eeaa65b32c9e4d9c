"""The whole run's time budget, planned from what this machine measures.

The clock starts with the process (Python's start-up and imports count), or
with the `mlflow run` that launched it (its own start-up counts too). The
trials may spend `search_share` of the budget; what is left goes to the final
training and to the evaluation and registry after it. Costs are measured, never
assumed: each trial's seconds per training image (`TrainingClock`), the final
training's augmentation per image (timed at the start), and in the final
training's first epoch its own epoch and inference times. One ratio is a
planning estimate only, corrected by that first epoch before anything is
settled: inference against training per image.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

# Inference of an image against one training step of it (forward only, large batches).
INFERENCE_SHARE = 0.35
# Kept back from the budget: the process's exit, and `mlflow run`'s after it.
END_MARGIN = 0.03
# After the final training: figures drawn, the int8 form converted, the model saved, logged
# and registered, its speed measured, the report written: several times the set-up's own
# figures and logging, which the run times first, and more where TensorFlow gets one core
# (the conversion and saving slow down with it, the figures do not).
AFTER_TRAINING_PER_SETUP = 8.0
# A budgeted training's last epoch may end this far past its budget: timing noise
# must not cut the cosine short of its end.
OVERRUN = 1.03
# After the final training the model is traced again: the evaluation's predictions, the
# int8 conversion, the registry's copy. Each costs about what the final training's first
# epoch spent over the others (its tracing and warm-up), measured then, on this model.
TRACINGS_AFTER_TRAINING = 3


def process_started() -> float:
    """The `time.monotonic()` at which the user's command started, so that start-up and
    imports count against the budget: this process's start (Linux's /proc), or, where
    `mlflow run` launched it, that process's (its own start-up and the run it creates
    count too); elsewhere, now."""
    launcher = _mlflow_run_ancestor(os.getpid())
    starts = [t for t in (started_at(os.getpid()), started_at(launcher) if launcher else None) if t is not None]
    return min(starts, default=time.monotonic())


def started_at(pid: int) -> float | None:
    """The `time.monotonic()` at which process `pid` started (at most 10 minutes ago: a clock
    older than that is not this run's); None where /proc cannot tell."""
    try:
        started_s = int(_stat(pid)[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks since boot
        running_s = time.clock_gettime(time.CLOCK_BOOTTIME) - started_s
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.monotonic() - min(max(running_s, 0.0), 600.0)


def _mlflow_run_ancestor(pid: int, generations: int = 2) -> int | None:
    """The `mlflow run` process among the nearest `generations` ancestors of `pid` (MLflow
    starts its command through `bash -c`, which may or may not exec it), if any."""
    for _ in range(generations):
        try:
            pid = int(_stat(pid)[1])  # field 4: the parent
            names = [Path(arg).name for arg in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")]
        except (OSError, ValueError, IndexError):
            return None
        if "mlflow" in names and "run" in names[names.index("mlflow") + 1 :]:
            return pid
    return None


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command's name (field 3 on)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


class RunBudget:
    """`minutes` from `started` (0: no limit), of which the trials may spend `search_share`."""

    def __init__(self, minutes: float, search_share: float, started: float | None = None):
        self.total_s = minutes * 60
        self.search_share = search_share
        self.started = process_started() if started is None else started

    @classmethod
    def of(cls, config, started: float | None = None) -> RunBudget:
        """The budget a search's settings give it (`budget_minutes`, `search_share`), from `started`."""
        return cls(config.budget_minutes, config.search_share, started)

    @property
    def limited(self) -> bool:
        return self.total_s > 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def left(self) -> float:
        """Seconds until the run should be done (inf without a budget)."""
        return self.total_s * (1 - END_MARGIN) - self.elapsed() if self.limited else math.inf

    def search_left(self) -> float:
        """Seconds the trials may still spend (inf without a budget)."""
        return self.total_s * self.search_share - self.elapsed() if self.limited else math.inf

    def status(self) -> str:
        """The run's time so far and, with a budget, the time left: for the terminal's lines."""
        used = duration(self.elapsed())
        if not self.limited:
            return f"run {used} so far"
        return f"run {used} of {duration(self.total_s)}, {duration(max(0.0, self.left()))} left"


@dataclass(frozen=True)
class CostModel:
    """What the final training and evaluation will cost here, in terms of a configuration's
    measured seconds per trial training image."""

    train_images: int  # of the final training, each epoch
    validation_images: int  # scored after each epoch
    evaluated_images: int  # after the training, by the new model: test split, robustness suite
    augment_seconds_per_image: float = 0.0  # the final training's augmentation, on the same cores
    # The champion's evaluation on the same digits, timed on the champion itself: its
    # network is not the new one, and may cost several times as much per digit.
    champion_seconds: float = 0.0

    def epoch_seconds(self, seconds_per_image: float) -> float:
        """A final-training epoch: its images, their augmentation and the validation pass."""
        return (
            self.train_images * (seconds_per_image + self.augment_seconds_per_image)
            + self.validation_images * seconds_per_image * INFERENCE_SHARE
        )

    def evaluation_seconds(self, inference_seconds_per_image: float) -> float:
        return inference_seconds_per_image * self.evaluated_images + self.champion_seconds

    def final_seconds(self, seconds_left: float, seconds_per_image: float) -> float:
        """Of `seconds_left` in the run, what the final training of such a configuration may spend."""
        return seconds_left - self.evaluation_seconds(seconds_per_image * INFERENCE_SHARE)

    def epochs_that_fit(self, seconds_left: float, seconds_per_image: float) -> float:
        """Final-training epochs of a configuration costing `seconds_per_image` (in a trial) that fit in `seconds_left`."""
        return max(0.0, self.final_seconds(seconds_left, seconds_per_image)) / self.epoch_seconds(seconds_per_image)

    def max_seconds_per_image(self, seconds_left: float, min_epochs: int) -> float:
        """The costliest configuration (seconds per trial image) whose final training still
        gets `min_epochs` epochs in `seconds_left`."""
        fixed = self.train_images * self.augment_seconds_per_image * min_epochs + self.champion_seconds
        per_image = (self.train_images + self.validation_images * INFERENCE_SHARE) * min_epochs + self.evaluated_images * INFERENCE_SHARE
        return max(0.0, seconds_left - fixed) / per_image


@dataclass(frozen=True)
class Plan:
    """The run's plan of its budget: what the final training and evaluation cost here, and
    the seconds kept after the final training (the suite made, figures, registry, report)."""

    budget: RunBudget
    cost: CostModel
    after_training_s: float
    min_final_epochs: int  # a configuration whose final training gets fewer cannot win

    @property
    def limited(self) -> bool:
        return self.budget.limited

    def final_seconds(self) -> float:
        """Seconds left now for the final training and the evaluation's inference."""
        return self.budget.left() - self.after_training_s

    def max_seconds_per_image(self) -> float:
        """The costliest trial (seconds per training image) whose final training still gets
        `min_final_epochs`, in the time the budget leaves once the search's share is spent."""
        if not self.limited:
            return math.inf
        return self.cost.max_seconds_per_image(self.final_seconds() - max(0.0, self.budget.search_left()), self.min_final_epochs)

    def epochs_that_fit(self, seconds_per_image: float) -> float:
        """Final-training epochs, in the time left now, of a configuration costing `seconds_per_image` in its trial."""
        return self.cost.epochs_that_fit(self.final_seconds(), seconds_per_image) if self.limited else math.inf

    def training_seconds_left(self, validation_s: float, warmup_s: float = 0.0) -> float:
        """Told what one validation pass took and what the first epoch spent warming up: the
        seconds left to train, the evaluation's inference and the tracing after it kept out."""
        inference_s = self.cost.evaluation_seconds(validation_s / self.cost.validation_images)
        return self.final_seconds() - inference_s - TRACINGS_AFTER_TRAINING * warmup_s


class TrainingClock:
    """Seconds per training image of one training, timed over its first epoch's batches after
    the first `WARM` (tracing and warm-up); `batch_begins(batch)` is told of every batch."""

    WARM = 3
    ENOUGH = 12  # timed batches before the cost can be judged

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.epoch = 0
        self.timed_from: float | None = None
        self.batches = 0  # timed so far, in the first epoch
        self.seconds_per_image: float | None = None

    def batch_begins(self, batch: int) -> None:
        if self.epoch or self.seconds_per_image is not None:
            return
        now = time.perf_counter()
        if batch == self.WARM:
            self.timed_from = now
        elif self.timed_from is not None:
            self.batches = batch - self.WARM
            if self.batches >= self.ENOUGH:
                self.seconds_per_image = (now - self.timed_from) / (self.batches * self.batch_size)

    def epoch_ends(self, epoch_seconds: float, images: int) -> None:
        """After the first epoch: a short one is timed as a whole (tracing included)."""
        if self.epoch == 0 and self.seconds_per_image is None:
            self.seconds_per_image = epoch_seconds / max(1, images)
        self.epoch += 1

    @property
    def measured(self) -> bool:
        return self.seconds_per_image is not None


class EpochBudget(keras.callbacks.Callback):
    """How many epochs a training gets in its time, settled for `schedule` (a learning-rate
    schedule whose `epochs` it sets, and which follows them); every epoch timed.

    With `budget_s`, the epochs are settled once the first is timed: as many as fit
    in the budget (at most the schedule's own), so that the cosine still ends at
    zero; should later epochs run slower, the count shrinks to the epochs that still
    fit. `seconds_left(validation_s, warmup_s)` instead of `budget_s`: the seconds
    left for training once the first epoch is done, told what one validation pass
    took then and what the first epoch spent over the others (tracing and warm-up),
    so that the caller keeps time for the inference and tracing after the training,
    measured on this model. Comes after the schedule among the callbacks.
    """

    def __init__(self, schedule, budget_s: float = 0.0, seconds_left: Callable[[float, float], float] | None = None):
        super().__init__()
        self.schedule, self.budget_s, self.seconds_left_after_first = schedule, budget_s, seconds_left

    @property
    def epochs(self) -> int:
        return self.schedule.epochs

    def on_train_begin(self, logs=None) -> None:
        self.steps_per_epoch = int(self.params["steps"])
        self.started = time.perf_counter()
        self.most: int | None = None  # the schedule's own epochs, the most a budget allows
        self.epoch_seconds: list[float] = []
        self.estimate_s: float | None = None  # seconds per epoch, from the first one
        self.training_s = self.validation_started = None
        self.validation_batches = 0
        self.validation_s: float | None = None  # one validation pass, timed in the first epoch

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.most is None:
            self.most = self.schedule.epochs
        self.epoch_started = self.timed_from = time.perf_counter()
        self.timed_batches = self.steps_per_epoch

    # Begin hooks only: a batch-end hook turns off Keras' asynchronous dispatch of each batch's logs.
    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        warm = TrainingClock.WARM
        if batch == warm and self.training_s is None and self.steps_per_epoch > 2 * warm:
            self.timed_from, self.timed_batches = time.perf_counter(), self.steps_per_epoch - warm

    def on_test_begin(self, logs=None) -> None:
        if self.training_s is None:  # the first epoch's training, its first batches left out
            self.training_s = (time.perf_counter() - self.timed_from) * self.steps_per_epoch / self.timed_batches
            self.validation_started = self.validation_timed_from = time.perf_counter()
            self.validation_batches = 0

    def on_test_batch_begin(self, batch: int, logs=None) -> None:
        if self.estimate_s is None and self.validation_started is not None:
            self.validation_batches = batch + 1
            if batch == 1:  # the first validation batch traces the evaluation: left out too
                self.validation_timed_from = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        now = time.perf_counter()
        self.epoch_seconds.append(now - self.epoch_started)
        if (self.budget_s or self.seconds_left_after_first) and self.estimate_s is None:
            self.validation_s = 0.0
            if self.training_s is None:  # no validation: the whole first epoch
                self.estimate_s = self.epoch_seconds[0]
            else:
                timed = self.validation_batches - 1
                self.validation_s = (
                    (now - self.validation_timed_from) * self.validation_batches / timed if timed > 0 else now - self.validation_started
                )
                self.estimate_s = self.training_s + self.validation_s
            if self.seconds_left_after_first:
                warmup_s = max(0.0, self.epoch_seconds[0] - self.estimate_s)
                self.budget_s = now - self.started + max(0.0, self.seconds_left_after_first(self.validation_s, warmup_s))
            # The first epoch (tracing included) is spent; the rest run at the estimate.
            self.schedule.epochs = max(1, min(self.epochs, 1 + int((self.budget_s - self.epoch_seconds[0]) / self.estimate_s)))
        done = len(self.epoch_seconds)
        if self.budget_s and done > 1:
            # Later epochs run at their own pace (the first one's warm-up can mislead): the
            # second epoch settles the count again, either way; after it, the count only
            # shrinks to the epochs that still fit, so that the cosine still ends at zero in
            # time. A last epoch that would end just past the budget (timing noise) still runs.
            next_s = statistics.median(self.epoch_seconds[1:])
            elapsed = now - self.started
            fit = done + int((self.budget_s - elapsed) / next_s)
            if fit <= done and elapsed + next_s <= OVERRUN * self.budget_s:
                fit = done + 1
            most = self.most if done == 2 else self.epochs
            self.schedule.epochs = min(most, max(fit, done))
        if done >= self.epochs:
            self.model.stop_training = True

    def seconds_left(self) -> float:
        """The epochs still planned, at the median epoch time so far."""
        return max(0, self.epochs - len(self.epoch_seconds)) * statistics.median(self.epoch_seconds)


def too_costly(seconds_per_image: float, limit: float) -> str:
    """Why a trial is cut ("" if it is not): its measured cost against the most that leaves
    its final training the epochs it needs (CostModel.max_seconds_per_image)."""
    if seconds_per_image <= limit:
        return ""
    return f"too costly here: {seconds_per_image * 1e6:.0f} us per training image, the final training allows {limit * 1e6:.0f}"


def duration(seconds: float) -> str:
    """12s, 3m05s."""
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
