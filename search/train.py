"""The training path: data as an in-memory tf.data pipeline, the precision
policy, and retraining the winning configuration for longer than any trial."""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from experiments import ConfigError
from model_zoo.cnn import make_cnn
from search.augment import augmenter
from search.data import Split

PREFETCH_BATCHES = 2  # one training while the next is prepared, and one spare


def training_dataset(split: Split, batch_size: int, seed: int, augment: str = "none", switch: tf.Variable | None = None) -> tf.data.Dataset:
    """`split` as shuffled batches, from memory, with the next batch prepared while one
    trains; `augment` (search/augment.py) changes every epoch's digits anew, while
    the boolean variable `switch` (if given) is True."""
    dataset = tf.data.Dataset.from_tensor_slices((split.x, split.y))
    dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    change = augmenter(augment, seed)
    if change:
        # A stateless seed per batch, itself drawn from `seed`: the same digits for the same seed.
        seeds = tf.data.Dataset.random(seed, rerandomize_each_iteration=True).batch(2)
        # AUTOTUNE without the autotuner: as many parallel calls as cores.
        if switch is not None:
            change = functools.partial(_while_on, switch, change)
        dataset = tf.data.Dataset.zip(dataset, seeds).map(lambda xy, s: (change(xy[0], s), xy[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return _fixed(dataset.prefetch(PREFETCH_BATCHES))


def _while_on(switch: tf.Variable, change: Callable, x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    return tf.cond(switch, lambda: change(x, seed), lambda: x)


def evaluation_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    """`split` in order, as batches: the validation data of `fit`."""
    return _fixed(tf.data.Dataset.from_tensor_slices((split.x, split.y)).batch(batch_size).prefetch(PREFETCH_BATCHES))


def _fixed(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's autotuner: with it, some `fit` calls on 2-core
    machines stalled at a fixed time per image whatever the model (benchmarks/RESULTS.md,
    the tf.data row)."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


# A budgeted training stops before its planned epochs only if the next epoch
# would end more than this far past the budget: timing noise must not cut the
# cosine short of its end.
OVERRUN = 1.1


class WarmupCosine(keras.callbacks.Callback):
    """A one-cycle learning rate, set before every batch: a linear warm-up over the
    first epoch from a tenth of the peak to the peak, then a cosine to zero by the
    end of the last epoch.

    `peak` None: the rate the model was compiled with (a trial's searched
    `learning_rate`); `epochs` None: the epochs of the `fit` call, counted from
    the first one it runs (a Hyperband round that continues a trial runs a
    schedule of its own). With `budget_s`, the epochs are settled once the first
    is timed: as many as fit in the budget (at most `epochs`), so the cosine
    still ends at zero; should later epochs run slower, training stops when the
    next one would overrun the budget.
    """

    WARM_BATCHES = 3  # batches left out of the timing: tracing and warm-up

    def __init__(self, peak: float | None = None, epochs: int | None = None, budget_s: float = 0.0):
        super().__init__()
        self.peak, self.most, self.budget_s = peak, epochs, budget_s

    def on_train_begin(self, logs=None) -> None:
        self.steps_per_epoch = int(self.params["steps"])
        self.rate_peak = self.peak or float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.first_epoch, self.step = None, 0
        self.started = time.perf_counter()
        self.epoch_seconds: list[float] = []
        self.estimate_s: float | None = None  # seconds per epoch, from the first one
        self.training_s = self.validation_started = None
        self.validation_batches = 0

    def rate(self, step: int) -> float:
        total = max(1, self.epochs * self.steps_per_epoch)
        warmup = min(self.steps_per_epoch, total // 2)
        if step < warmup:
            return self.rate_peak * (0.1 + 0.9 * step / warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))  # the last batch's rate is 0
        return 0.5 * self.rate_peak * (1 + math.cos(math.pi * progress))

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        if self.first_epoch is None:
            self.first_epoch = epoch
            # Keras Tuner's Hyperband passes epochs=final epoch with initial_epoch: count what this fit runs.
            self.epochs = self.most or int(self.params["epochs"]) - epoch
        self.epoch_started = self.timed_from = time.perf_counter()
        self.timed_batches = self.steps_per_epoch

    # Begin hooks only: a batch-end hook turns off Keras' asynchronous dispatch of each batch's logs.
    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        if batch == self.WARM_BATCHES and self.training_s is None and self.steps_per_epoch > 2 * self.WARM_BATCHES:
            self.timed_from, self.timed_batches = time.perf_counter(), self.steps_per_epoch - self.WARM_BATCHES
        self.model.optimizer.learning_rate.assign(self.rate(self.step))
        self.step += 1

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
        if self.budget_s and self.estimate_s is None:
            if self.training_s is None:  # no validation: the whole first epoch
                self.estimate_s = self.epoch_seconds[0]
            else:
                timed = self.validation_batches - 1
                validation_s = (
                    (now - self.validation_timed_from) * self.validation_batches / timed if timed > 0 else now - self.validation_started
                )
                self.estimate_s = self.training_s + validation_s
            # The first epoch (tracing included) is spent; the rest run at the estimate.
            self.epochs = max(1, min(self.epochs, 1 + int((self.budget_s - self.epoch_seconds[0]) / self.estimate_s)))
        if len(self.epoch_seconds) >= self.epochs:
            self.model.stop_training = True
        elif self.budget_s:
            next_s = statistics.median(self.epoch_seconds[1:]) if len(self.epoch_seconds) > 1 else self.estimate_s
            if now - self.started + next_s > OVERRUN * self.budget_s:
                self.model.stop_training = True  # later epochs ran slower than the first: the budget holds

    def seconds_left(self) -> float:
        """The epochs still planned, at the median epoch time so far."""
        return max(0, self.epochs - len(self.epoch_seconds)) * statistics.median(self.epoch_seconds)


@dataclass(frozen=True)
class FinalTraining:
    model: keras.Model
    epochs: int  # run
    epoch_estimate_s: float | None  # seconds per epoch the budget was settled with
    epoch_seconds: tuple[float, ...]  # measured, each


def train_final(
    hypermodel: kt.HyperModel,
    hyperparameters: kt.HyperParameters,
    train: Split,
    validation: Split,
    epochs: int,
    batch_size: int,
    augment: str,
    seed: int,
    on_epoch_end: Callable[[int, dict], None],
    peak_learning_rate: float = 0.0,
    budget_s: float = 0.0,
    clean_epochs: int = 0,
) -> FinalTraining:
    """A fresh model of the best configuration, trained for up to `epochs` epochs on `train`.

    The learning rate follows `WarmupCosine`, peaking at `peak_learning_rate`
    (0: the configuration's searched learning rate), over as many epochs as
    fit in `budget_s` seconds (0: no limit); the training digits are augmented
    as `augment` says (search/augment.py), except in the last `clean_epochs` epochs of
    the schedule. The weights of the best validation epoch are kept.
    `on_epoch_end(epoch, logs)` sees every epoch, for tracking.
    """
    keras.utils.set_random_seed(seed)
    model = hypermodel.build(hyperparameters.copy())
    schedule = WarmupCosine(peak_learning_rate or None, epochs, budget_s)
    augmenting = tf.Variable(True, trainable=False)
    callbacks = [
        schedule,
        # After the schedule's hook: the first epoch settles how many epochs there are.
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda epoch, logs: augmenting.assign(epoch < schedule.epochs - clean_epochs)),
        keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end),
        # After the schedule's own hook, which settles how many epochs fit the budget.
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(final_progress(schedule, epoch, logs), flush=True)),
        # Patience = epochs: never stops early (the schedule must run to its
        # end), but restores the best validation epoch's weights.
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=epochs, restore_best_weights=True),
    ]
    model.fit(
        training_dataset(train, batch_size, seed, augment, augmenting),
        validation_data=evaluation_dataset(validation, batch_size),
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles
        verbose=2,
    )
    return FinalTraining(model, len(schedule.epoch_seconds), schedule.estimate_s, tuple(schedule.epoch_seconds))


def final_progress(schedule: WarmupCosine, epoch: int, logs: dict) -> str:
    """The terminal's line after each epoch of the final training: where it is and the time left."""
    seconds = round(schedule.seconds_left())
    left = f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
    return (
        f"final training: epoch {epoch + 1}/{schedule.epochs}, val_accuracy {logs.get('val_accuracy', float('nan')):.4f}, about {left} left"
    )


# What `precision=auto` resolves to on this machine without running the probe
# (float32 or mixed_bfloat16): for CI and tests, which must cover both choices
# on any CPU, and for a cluster whose machines should all agree.
AUTO_PRECISION_ENV = "SEARCH_AUTO_PRECISION"
# bf16 is chosen only when the probe times it at least this much faster: a
# margin, so that a probe near 1.0x on a noisy machine does not flip between runs.
BF16_MIN_SPEEDUP = 1.2


@dataclass(frozen=True)
class Precision:
    """The Keras dtype policy a search trains with, and why."""

    policy: str  # float32 or mixed_bfloat16
    reason: str  # e.g. "pinned", "probe: bf16 0.61x float32's speed"
    probe_speedup: float | None = None  # bf16 against float32, where the probe ran

    def params(self) -> dict[str, str]:
        logged = {"precision_used": self.policy, "precision_reason": self.reason}
        if self.probe_speedup is not None:
            logged["precision_probe_speedup"] = f"{self.probe_speedup:.3f}"
        return logged


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises native bf16 (AVX-512 BF16 or AMX) on Linux."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_precision(precision: str, native_bf16: bool | None = None) -> Precision:
    """The Keras dtype policy to train with: `precision` itself unless it is `auto`.

    `auto` is float32 where the CPU has no native bf16. Elsewhere it is
    `mixed_bfloat16` only if a short probe measures it `BF16_MIN_SPEEDUP` times
    faster than float32: on CPUs with AMX it is; on an Intel Xeon with
    AVX512-BF16 and no AMX, oneDNN's native avx512_core_bf16 convolution
    kernels are slower than its float32 ones, so bf16 loses there. The probe
    runs once per process; `$SEARCH_AUTO_PRECISION` replaces it.
    """
    if precision != "auto":
        return Precision(precision, "pinned")
    forced = os.environ.get(AUTO_PRECISION_ENV, "")
    if forced:
        if forced not in ("float32", "mixed_bfloat16"):
            raise ConfigError(f"${AUTO_PRECISION_ENV} is {forced!r}: use float32 or mixed_bfloat16")
        return Precision(forced, f"${AUTO_PRECISION_ENV}")
    if not (cpu_has_bf16() if native_bf16 is None else native_bf16):
        return Precision("float32", "no native bf16 on this CPU")
    speedup = _probe_once()
    policy = "mixed_bfloat16" if speedup >= BF16_MIN_SPEEDUP else "float32"
    return Precision(policy, f"probe: bf16 {speedup:.2f}x float32's speed (bf16 needs {BF16_MIN_SPEEDUP}x)", speedup)


@functools.cache
def _probe_once() -> float:
    return probe_speedup("mixed_bfloat16")


def probe_speedup(policy: str, batch_size: int = 128, steps: int = 8, rounds: int = 3) -> float:
    """How many times faster than float32 a small batch-norm CNN trains under `policy`,
    along the project's training path (tf.data without its autotuner, whose stalls
    would time the pipeline instead of the arithmetic); the best of `rounds`
    interleaved timings each, so one slow round does not decide."""
    rng = np.random.default_rng(0)
    split = Split(rng.random((batch_size * steps, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, batch_size * steps))
    models, best = {}, {}
    for name in ("float32", policy):
        models[name] = make_cnn(conv_filters=(32, 64), convs_per_block=2, batch_norm=True, dense_units=128, dtype_policy=name)
        models[name].fit(training_dataset(split, batch_size, seed=0).take(2), verbose=0)  # compile, warm up
    for _ in range(rounds):
        for name, model in models.items():
            started = time.perf_counter()
            model.fit(training_dataset(split, batch_size, seed=0), verbose=0)
            best[name] = min(best.get(name, np.inf), time.perf_counter() - started)
    return best["float32"] / best[policy]
