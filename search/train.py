"""The training path: data as an in-memory tf.data pipeline, the warm-up + cosine
schedule, and retraining the winning configuration for longer than any trial."""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable

import keras
import keras_tuner as kt
import tensorflow as tf

from experiments import SearchConfig
from model_zoo.cnn import average_of
from search.augment import augmenter
from search.budget import EpochBudget, duration
from search.data import MnistData, Split
from search.evaluate import evaluate

PREFETCH_BATCHES = 2  # one training while the next is prepared, and one spare


def training_dataset(
    split: Split, batch_size: int, seed: int, augment: str = "none", switch: tf.Variable | None = None, leave_out: tuple[str, ...] = ()
) -> tf.data.Dataset:
    """`split` as shuffled batches, from memory, with the next batch prepared while one
    trains; `augment` (search/augment.py) changes every epoch's digits anew, while
    the boolean variable `switch` (if given) is True, without the changes of the suite's
    families in `leave_out`."""
    dataset = tf.data.Dataset.from_tensor_slices((split.x, split.y))
    dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True).batch(batch_size)
    change = augmenter(augment, seed, leave_out)
    if change:
        # A stateless seed per batch, itself drawn from `seed`: the same digits for the same seed.
        seeds = tf.data.Dataset.random(seed, rerandomize_each_iteration=True).batch(2)
        # AUTOTUNE without the autotuner: as many parallel calls as cores.
        if switch is not None:
            change = functools.partial(_while_on, switch, change)
        dataset = tf.data.Dataset.zip(dataset, seeds).map(lambda xy, s: (change(xy[0], s), xy[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return _fixed(dataset.prefetch(PREFETCH_BATCHES))


def augmentation_seconds_per_image(split: Split, batch_size: int, augment: str, seed: int, batches: int = 16) -> float:
    """What `augment` costs per image on this machine, timed through the training dataset
    (its parallel map, as in training) over `batches` batches after a first one that traces it."""
    if not augmenter(augment, seed):
        return 0.0
    images = min(len(split), batch_size * (batches + 1))
    dataset = training_dataset(Split(split.x[:images], split.y[:images]), batch_size, seed, augment)
    iterator = iter(dataset)
    next(iterator)
    started, timed = time.perf_counter(), 0
    for x, _ in iterator:
        timed += len(x)
    return (time.perf_counter() - started) / max(1, timed)


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


class WarmupCosine(keras.callbacks.Callback):
    """A one-cycle learning rate, set before every batch: a linear warm-up over the
    first epoch from a tenth of the peak to the peak, then a cosine to zero by the
    end of the last of `epochs`.

    `peak` None: the rate the model was compiled with (a trial's searched
    `learning_rate`); `epochs` None: the epochs of the `fit` call, counted from
    the first one it runs (a Hyperband round that continues a trial runs a
    schedule of its own). The schedule follows `epochs` as it stands at each
    batch: a training's time budget (search/budget.py's `EpochBudget`) settles it.
    """

    def __init__(self, peak: float | None = None, epochs: int | None = None):
        super().__init__()
        self.peak, self.most = peak, epochs

    def on_train_begin(self, logs=None) -> None:
        self.steps_per_epoch = int(self.params["steps"])
        self.rate_peak = self.peak or float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.first_epoch, self.step = None, 0

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

    def on_train_batch_begin(self, batch: int, logs=None) -> None:
        self.model.optimizer.learning_rate.assign(self.rate(self.step))
        self.step += 1


@dataclass(frozen=True)
class FinalTraining:
    model: keras.Model
    epochs: int  # run
    epoch_estimate_s: float | None  # seconds per epoch the budget was settled with
    epoch_seconds: tuple[float, ...]  # measured, each


@dataclass(frozen=True)
class Recipe:
    """How the final training trains a configuration (the settings' final_* values, one model's seed)."""

    epochs: int  # at most; the budget may settle fewer
    batch_size: int
    augment: str = "none"  # search/augment.py
    seed: int = 0
    peak_learning_rate: float = 0.0  # 0: the configuration's searched learning_rate
    clean_epochs: int = 0  # last epochs on the original digits (at most half of them)
    budget_s: float = 0.0  # seconds the training may take (0: no limit; see seconds_left)

    @classmethod
    def of(cls, config: SearchConfig, model_index: int = 0) -> Recipe:
        """The settings' recipe for the `model_index`-th model the final training averages."""
        return cls(
            epochs=config.final_epochs,
            batch_size=config.batch_size,
            augment=config.augment,
            seed=config.seed + model_index,
            peak_learning_rate=config.final_learning_rate,
            clean_epochs=config.clean_final_epochs,
        )


def train_final(
    hypermodel: kt.HyperModel,
    hyperparameters: kt.HyperParameters,
    train: Split,
    validation: Split,
    recipe: Recipe,
    on_epoch_end: Callable[[int, dict], None] = lambda epoch, logs: None,
    seconds_left: Callable[[float, float], float] | None = None,
) -> FinalTraining:
    """A fresh model of the best configuration, trained as `recipe` says on `train`.

    The learning rate follows `WarmupCosine`, peaking at the recipe's `peak_learning_rate`,
    over as many of its `epochs` as fit in its `budget_s` seconds (or as `seconds_left`
    says after the first epoch: see search/budget.py's `EpochBudget`); the training digits
    are augmented as its `augment` says, except in the last `clean_epochs` epochs (at most
    half of them: a schedule the budget cut to one epoch is augmented) of the schedule.
    The weights of the best validation epoch are kept. `on_epoch_end(epoch, logs)` sees
    every epoch, for tracking.
    """
    epochs, clean_epochs, seed = recipe.epochs, recipe.clean_epochs, recipe.seed
    keras.utils.set_random_seed(seed)
    model = hypermodel.build(hyperparameters.copy())
    schedule = WarmupCosine(recipe.peak_learning_rate or None, epochs)
    timing = EpochBudget(schedule, recipe.budget_s, seconds_left)
    augmenting = tf.Variable(True, trainable=False)
    callbacks = [
        schedule,
        timing,  # after the schedule's hooks: it settles the epochs the schedule then follows
        # After the budget's hook: the first epoch settles how many epochs there are.
        keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: augmenting.assign(epoch < augmented_epochs(schedule.epochs, clean_epochs))
        ),
        keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end),
        # After the budget's hook, which settles how many epochs fit the budget.
        keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: print(final_progress(timing, epoch, logs), flush=True)),
        # Patience = epochs: never stops early (the schedule must run to its
        # end), but restores the best validation epoch's weights.
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=epochs, restore_best_weights=True),
    ]
    model.fit(
        training_dataset(train, recipe.batch_size, seed, recipe.augment, augmenting),
        validation_data=evaluation_dataset(validation, recipe.batch_size),
        epochs=epochs,
        callbacks=callbacks,
        shuffle=False,  # the dataset shuffles
        verbose=2,
    )
    return FinalTraining(model, len(timing.epoch_seconds), timing.estimate_s, tuple(timing.epoch_seconds))


def augmented_epochs(epochs: int, clean_epochs: int) -> int:
    """The first epochs of a schedule of `epochs` that train on augmented digits: all but the last
    `clean_epochs`, and at least half of them (a schedule the budget cut to one epoch is augmented)."""
    return epochs - min(clean_epochs, epochs // 2)


def final_progress(timing: EpochBudget, epoch: int, logs: dict) -> str:
    """The terminal's line after each epoch of the final training: where it is and the time left."""
    left = duration(timing.seconds_left())
    return (
        f"final training: epoch {epoch + 1}/{timing.epochs}, val_accuracy {logs.get('val_accuracy', float('nan')):.4f}, about {left} left"
    )


def retrain_winner(
    hypermodel: kt.HyperModel,
    hyperparameters: kt.HyperParameters,
    data: MnistData,
    config: SearchConfig,
    log_metrics: Callable[..., None],
    seconds_left: Callable[[float, float], float] | None = None,
) -> keras.Model:
    """The winner's configuration retrained on all training images, `final_models` times
    with seeds seed, seed+1, ..., averaged into one model. `seconds_left(validation_s, warmup_s)`
    (None: no limit) is the run's time left for training, asked after each model's
    first epoch, which the models still to train share.
    `log_metrics(metrics, step=None)` records each epoch and each training's timing."""
    models = []
    for i in range(config.final_models):
        # One model keeps the metric names final_<metric>; several are final_<i>_<metric>.
        prefix = "final_" if config.final_models == 1 else f"final_{i}_"
        # This model's part of the time left: an equal share with the models still to train.
        share = (
            (lambda validation_s, warmup_s, n=config.final_models - i: seconds_left(validation_s, warmup_s) / n) if seconds_left else None
        )
        print(
            f"retraining the winner's configuration on {len(data.train)} images for up to {config.final_epochs} epochs"
            + (", as many as fit in the time left" if share else "")
            + (f" (model {i + 1} of {config.final_models})" if config.final_models > 1 else ""),
            flush=True,
        )
        run = train_final(
            hypermodel,
            hyperparameters,
            data.train,
            data.validation,
            Recipe.of(config, model_index=i),
            on_epoch_end=lambda epoch, logs, prefix=prefix: log_metrics({prefix + k: v for k, v in logs.items()}, step=epoch),
            seconds_left=share,
        )
        timing = {prefix + "epochs_run": run.epochs, prefix + "epoch_seconds": sum(run.epoch_seconds) / run.epochs}
        if run.epoch_estimate_s is not None:
            timing[prefix + "epoch_estimate_seconds"] = run.epoch_estimate_s
        log_metrics(timing)
        models.append(run.model)
    model = average_of(models)
    if len(models) > 1:
        validation = evaluate(model, data.validation)
        log_metrics({"final_average_val_accuracy": validation.accuracy})
        print(f"average of {len(models)} models: val_accuracy {validation.accuracy:.4f}", flush=True)
    return model
