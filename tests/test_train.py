"""Model tests of the training path: the data pipeline, the schedule, retraining the winner."""

import statistics

import keras
import keras_tuner as kt
import numpy as np
import pytest

from model_zoo import PlainCNN, make_cnn, precision_policy
from search.augment import jitter, robust
from search.data import Split
from search.train import Recipe, WarmupCosine, evaluation_dataset, train_final, training_dataset


def random_split(n: int = 256) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.random((n, 28, 28, 1), dtype=np.float32), np.arange(n) % 10)


def test_train_final_reports_every_epoch_and_keeps_a_working_model(capsys):
    split = random_split()
    hp = kt.HyperParameters()
    hp.Fixed("conv_filters_0", 16)
    seen = []
    run = train_final(
        PlainCNN(),
        hp,
        split,
        Split(split.x[:64], split.y[:64]),
        Recipe(epochs=3, batch_size=64, augment="robust", seed=1),
        on_epoch_end=lambda epoch, logs: seen.append((epoch, sorted(logs))),
    )
    assert [epoch for epoch, _ in seen] == [0, 1, 2] and run.epochs == 3 and len(run.epoch_seconds) == 3
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("final training:")]
    assert [line.split(",")[0] for line in printed] == [
        "final training: epoch 1/3",
        "final training: epoch 2/3",
        "final training: epoch 3/3",
    ]
    assert printed[-1].endswith("about 0s left") and " left" in printed[0]
    assert run.epoch_estimate_s is None  # no budget, nothing estimated
    assert seen[0][1] == ["accuracy", "loss", "val_accuracy", "val_loss"]
    assert run.model.predict(split.x[:5], verbose=0).shape == (5, 10)
    # The schedule peaked at the searched learning rate (1e-3) and has decayed to 0.
    assert float(keras.ops.convert_to_numpy(run.model.optimizer.learning_rate)) == pytest.approx(0.0, abs=1e-9)


def rates_of_a_fit(schedule: WarmupCosine, epochs: int, steps: int, initial_epoch: int = 0) -> list[float]:
    """The learning rate of every batch of a real fit of `steps` batches per epoch under `schedule`."""
    model = make_cnn(conv_filters=(4,), learning_rate=2e-3)
    rates = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: rates.append(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))
    )
    split = random_split(steps * 16)
    model.fit(split.x, split.y, batch_size=16, epochs=epochs, initial_epoch=initial_epoch, callbacks=[schedule, record], verbose=0)
    return rates


def test_warmup_cosine_rises_over_the_first_epoch_then_decays_to_zero():
    rates = rates_of_a_fit(WarmupCosine(peak=3e-3), epochs=4, steps=10)
    assert len(rates) == 40
    assert rates[0] == pytest.approx(3e-4)
    assert all(a < b for a, b in zip(rates[:10], rates[1:11])) and rates[10] == pytest.approx(3e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[-1] == pytest.approx(0.0, abs=1e-9)
    # No peak given: the rate the model was compiled with; a fit that starts at a later
    # epoch (Hyperband continuing a trial) runs a whole schedule over its own epochs.
    rates = rates_of_a_fit(WarmupCosine(), epochs=3, steps=10, initial_epoch=1)
    assert len(rates) == 20 and rates[10] == pytest.approx(2e-3) and rates[-1] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.alone
def test_the_final_training_budget_comes_from_the_first_epoch_and_holds():
    split = random_split(8192)
    validation = Split(split.x[:1024], split.y[:1024])

    def train(budget_s: float):
        return train_final(PlainCNN(), kt.HyperParameters(), split, validation, Recipe(epochs=4, batch_size=64, budget_s=budget_s))

    unlimited = train(budget_s=1e6)
    # The estimate (the first epoch with its first batches left out) is the epoch time later epochs measure.
    later = statistics.median(unlimited.epoch_seconds[1:])
    assert unlimited.epochs == 4 and abs(unlimited.epoch_estimate_s - later) <= 0.25 * later, (
        unlimited.epoch_estimate_s,
        unlimited.epoch_seconds,
    )
    budget_s = unlimited.epoch_seconds[0] + 1.5 * later  # two epochs' worth
    limited = train(budget_s)
    # Settled from the first epoch, then again from the second (search/budget.py's EpochBudget):
    # whatever the count, the training ends within its budget.
    assert limited.epoch_estimate_s is not None and 1 <= limited.epochs
    assert sum(limited.epoch_seconds) <= 1.25 * budget_s
    # The cosine still ended at zero: the schedule was settled to the epochs that fit. Only
    # where later epochs ran much slower than the first one's estimate (another process took
    # the cores) did the schedule have to stop short of its end, which no schedule can foresee.
    later_limited = statistics.median(limited.epoch_seconds[1:]) if limited.epochs > 1 else 0.0
    if later_limited <= 1.25 * limited.epoch_estimate_s:
        assert float(keras.ops.convert_to_numpy(limited.model.optimizer.learning_rate)) == pytest.approx(0.0, abs=1e-9)


def test_training_dataset_batches_every_example_once_per_epoch():
    split = random_split(100)
    batches = list(training_dataset(split, batch_size=32, seed=0))
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    assert sorted(np.concatenate([y.numpy() for _, y in batches])) == sorted(split.y)


def test_evaluation_dataset_is_the_split_in_order():
    split = random_split(100)
    batches = list(evaluation_dataset(split, batch_size=32))
    assert [len(y) for _, y in batches] == [32, 32, 32, 4]
    np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in batches]), split.x)
    np.testing.assert_array_equal(np.concatenate([y.numpy() for _, y in batches]), split.y)


def test_datasets_run_without_the_tf_data_autotuner():
    # With it, some epochs ran at exactly 1 ms per image on this project's machine (search/train.py).
    split = random_split(10)
    for dataset in (
        training_dataset(split, 4, seed=0),
        training_dataset(split, 4, seed=0, augment="jitter"),
        training_dataset(split, 4, seed=0, augment="robust"),
        evaluation_dataset(split, 4),
    ):
        assert dataset.options().autotune.enabled is False


def a_bar(n: int = 8) -> np.ndarray:
    digit = np.zeros((n, 28, 28, 1), np.float32)
    digit[:, 10:18, 12:16] = 1.0
    return digit


def test_jitter_moves_pixels_but_keeps_shape_range_and_ink():
    digit = a_bar()
    jittered = keras.ops.convert_to_numpy(jitter(seed=0)(digit, training=True))
    assert jittered.shape == digit.shape
    assert jittered.min() >= 0.0 and jittered.max() <= 1.0 + 1e-6
    assert not np.allclose(jittered, digit)
    assert np.all(jittered.sum(axis=(1, 2, 3)) > 0.5 * digit[0].sum())  # the digit stays in the frame
    # At inference the layers do nothing.
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(jitter(seed=0)(digit, training=False)), digit)


def test_robust_augmentation_is_deterministic_in_range_and_changes_each_image_its_own_way():
    digits = a_bar(64)
    seed = np.array([3, 4], np.int64)
    changed = robust(digits, seed).numpy()
    np.testing.assert_array_equal(robust(digits, seed).numpy(), changed)
    assert not np.array_equal(robust(digits, np.array([3, 5], np.int64)).numpy(), changed)
    assert changed.shape == digits.shape and changed.min() >= 0.0 and changed.max() <= 1.0
    assert all(not np.allclose(image, digits[0]) for image in changed)  # every image is moved
    assert len({image.tobytes() for image in changed}) == len(changed)
    # The pipeline gives each batch its own seed, the same ones for the same seed.
    first, again = (next(iter(training_dataset(random_split(), 32, seed=7, augment="robust")))[0].numpy() for _ in range(2))
    np.testing.assert_array_equal(first, again)


class _SeesItsDigits(keras.Model):
    """A linear model that records, per training batch, whether its digits are the originals."""

    def __init__(self, originals: np.ndarray):
        super().__init__()
        self.dense, self.originals, self.clean = keras.layers.Dense(10, activation="softmax"), originals, []

    def call(self, x):
        return self.dense(keras.ops.reshape(x, (-1, 784)))

    def train_step(self, data):
        x = data[0].numpy()
        self.clean.append(all(np.isclose(image, self.originals).all(axis=(1, 2, 3)).any() for image in x))
        return super().train_step(data)


class _SeeingHyperModel(kt.HyperModel):
    def __init__(self, originals):
        super().__init__()
        self.originals = originals

    def build(self, hp):
        model = _SeesItsDigits(self.originals)
        model.compile(
            optimizer=keras.optimizers.SGD(hp.Float("learning_rate", 1e-3, 1e-2)),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            run_eagerly=True,
        )
        return model


def test_the_last_clean_epochs_of_the_final_training_see_unchanged_digits():
    split = random_split(64)
    hypermodel = _SeeingHyperModel(split.x)
    run = train_final(hypermodel, kt.HyperParameters(), split, split, Recipe(epochs=4, batch_size=16, augment="robust", clean_epochs=1))
    assert run.model.clean == [False] * 12 + [True] * 4  # 4 batches per epoch: only the last epoch's are the originals


def test_an_unknown_augmentation_is_refused():
    with pytest.raises(ValueError, match="unknown augmentation 'mixup': choose one of none, jitter, robust, gentle, pixels"):
        training_dataset(random_split(8), 4, seed=0, augment="mixup")


def test_precision_policy_is_put_back_even_when_the_block_fails():
    with pytest.raises(RuntimeError):
        with precision_policy("mixed_bfloat16"):
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            raise RuntimeError("a trial failed")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_the_augmentations_cost_per_image_is_measured_here(mnist_npz):
    from search.train import augmentation_seconds_per_image

    with np.load(mnist_npz) as d:
        split = Split(d["x_train"][:1_000, :, :, None].astype("float32") / 255, d["y_train"][:1_000])
    robust = augmentation_seconds_per_image(split, batch_size=64, augment="robust", seed=0, batches=4)
    assert 0 < robust < 0.01  # per image: measured, and not the whole run
    assert augmentation_seconds_per_image(split, batch_size=64, augment="none", seed=0) == 0.0


def test_the_clean_epochs_are_the_schedules_last_and_at_most_half_of_it():
    from search.train import augmented_epochs

    assert [augmented_epochs(epochs, clean_epochs=2) for epochs in (1, 2, 3, 4, 11)] == [1, 1, 2, 2, 9]
    assert augmented_epochs(5, clean_epochs=0) == 5
