"""The training path: data as an in-memory tf.data pipeline, the precision
policy, and retraining the winning configuration for longer than any trial."""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import keras_tuner as kt
import numpy as np
import tensorflow as tf

from experiments import ConfigError
from model_zoo.cnn import make_cnn, precision_policy
from search.data import Split

# Random affine jitter of the training digits in the final training: shifts
# of up to 8% (2.2 px), rotations of up to 0.025 turn (9 degrees), zooms of up
# to 8%; never applied to validation or test. Measured on 10 epochs of the
# default architecture: 99.61% test accuracy, against 99.39% with 10% / 14
# degrees / 10%, which is too strong for so short a schedule.
SHIFT, ROTATION, ZOOM = 0.08, 0.025, 0.08
PREFETCH_BATCHES = 2  # one training while the next is prepared, and one spare


def training_dataset(split: Split, batch_size: int, seed: int, augment: bool = False) -> tf.data.Dataset:
    """`split` as shuffled batches, from memory, with the next batch prepared while one trains."""
    dataset = tf.data.Dataset.from_tensor_slices((split.x, split.y))
    dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    if augment:
        jitter = augmentation(seed)
        # AUTOTUNE without the autotuner: as many parallel calls as cores.
        dataset = dataset.map(lambda x, y: (jitter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return _fixed(dataset.prefetch(PREFETCH_BATCHES))


def evaluation_dataset(split: Split, batch_size: int) -> tf.data.Dataset:
    """`split` in order, as batches: the validation data of `fit`."""
    return _fixed(tf.data.Dataset.from_tensor_slices((split.x, split.y)).batch(batch_size).prefetch(PREFETCH_BATCHES))


def _fixed(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's autotuner. With it, some `fit` calls on this
    machine ran at exactly 1.00 ms per image whatever the model (10.25 s per
    10,240 images, against 5.8 s for the same CPU seconds in the others): 3 of
    7 epochs with it, 0 of 7 without, interleaved."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def augmentation(seed: int) -> keras.Sequential:
    """Random shifts, rotations and zooms; digits stay on a black background."""
    layers = keras.layers
    return keras.Sequential(
        [
            layers.RandomTranslation(SHIFT, SHIFT, fill_mode="constant", seed=seed),
            layers.RandomRotation(ROTATION, fill_mode="constant", seed=seed + 1),
            layers.RandomZoom(ZOOM, fill_mode="constant", seed=seed + 2),
        ],
        name="augmentation",
    )


def warmup_cosine(peak_learning_rate: float, epochs: int, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
    """One-cycle style schedule: linear warm-up to the peak over the first epoch,
    then cosine decay to zero by the last step."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(steps_per_epoch, total // 2)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=peak_learning_rate / 10,
        decay_steps=total - warmup,
        warmup_target=peak_learning_rate,
        warmup_steps=warmup,
    )


def affordable_epochs(hypermodel: kt.HyperModel, hyperparameters: kt.HyperParameters, train: Split, batch_size: int, budget_s: float, most: int) -> int:
    """How many epochs over `train` fit in `budget_s` seconds (1 to `most`), from
    timing a few batches of a throw-away model of the configuration."""
    if budget_s <= 0:
        return most
    model = hypermodel.build(hyperparameters.copy())
    warm, timed = 4, 12
    x, y = train.x[: batch_size * (warm + timed)], train.y[: batch_size * (warm + timed)]
    model.fit(x[: batch_size * warm], y[: batch_size * warm], batch_size=batch_size, verbose=0)
    started = time.perf_counter()
    model.fit(x[batch_size * warm :], y[batch_size * warm :], batch_size=batch_size, verbose=0)
    # +15%: augmentation and the validation pass are not in the timed batches.
    seconds_per_epoch = 1.15 * (time.perf_counter() - started) / (batch_size * timed) * len(train)
    return max(1, min(most, int(budget_s / seconds_per_epoch)))


def train_final(
    hypermodel: kt.HyperModel,
    hyperparameters: kt.HyperParameters,
    train: Split,
    validation: Split,
    epochs: int,
    batch_size: int,
    augment: bool,
    seed: int,
    on_epoch_end: Callable[[int, dict], None],
    peak_learning_rate: float = 0.0,
) -> keras.Model:
    """A fresh model of the best configuration, trained for `epochs` epochs on `train`.

    The learning rate follows a warm-up + cosine schedule peaking at
    `peak_learning_rate` (0: the configuration's searched learning rate), and
    the training digits are jittered when `augment` is set.
    The weights of the best validation epoch are kept. `on_epoch_end(epoch,
    logs)` sees every epoch, for tracking.
    """
    keras.utils.set_random_seed(seed)
    model = hypermodel.build(hyperparameters.copy())
    peak = peak_learning_rate or float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
    steps_per_epoch = -(-len(train) // batch_size)
    model.compile(
        optimizer=keras.optimizers.Adam(warmup_cosine(peak, epochs, steps_per_epoch)),
        loss=model.loss,
        metrics=["accuracy"],
    )
    callbacks = [
        keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end),
        # Patience = epochs: never stops early (the schedule must run to its
        # end), but restores the best validation epoch's weights.
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=epochs, restore_best_weights=True),
    ]
    model.fit(
        training_dataset(train, batch_size, seed, augment),
        validation_data=evaluation_dataset(validation, batch_size),
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles
        verbose=2,
    )
    return model


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


def probe_speedup(policy: str, batch_size: int = 128, steps: int = 4) -> float:
    """How many times faster than float32 a small batch-norm CNN trains under `policy`
    (best of two interleaved timings each, so one slow round does not decide)."""
    rng = np.random.default_rng(0)
    x = rng.random((batch_size * steps, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, len(x))
    models, best = {}, {}
    for name in ("float32", policy):
        with precision_policy(name):
            models[name] = make_cnn(conv_filters=(32, 64), convs_per_block=2, batch_norm=True, dense_units=128)
            models[name].fit(x[:batch_size], y[:batch_size], batch_size=batch_size, verbose=0)  # compile, warm up
    for _ in range(2):
        for name, model in models.items():
            started = time.perf_counter()
            model.fit(x, y, batch_size=batch_size, verbose=0)
            best[name] = min(best.get(name, np.inf), time.perf_counter() - started)
    return best["float32"] / best[policy]
