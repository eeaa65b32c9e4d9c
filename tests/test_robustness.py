"""Data tests of the robustness suite: its one table of kinds, deterministic, in range, every kind a change;
and the gate, which counts held-out kinds only."""

import dataclasses

import numpy as np
import pytest

from search import robustness
from search.data import Split, load_mnist
from tests.helpers import write_npz
from tests.test_evaluate import assert_png


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.test


def test_the_suite_declares_each_kind_its_family_and_whether_training_may_imitate_it():
    kinds = robustness.KINDS
    assert len(kinds) >= 24 and len(robustness.FAMILIES) >= 6
    for family in robustness.FAMILIES:
        members = [name for name, kind in kinds.items() if kind.family == family]
        assert any(not kinds[name].trained for name in members), f"family {family} keeps no held-out kind"
    whole = [f for f in robustness.FAMILIES if not any(k.trained for k in kinds.values() if k.family == f)]
    assert len(whole) >= 2, "whole families are held out too"
    assert set(robustness.HELD_OUT) | set(robustness.TRAINED) == set(kinds)
    assert not set(robustness.HELD_OUT) & set(robustness.TRAINED)


def test_the_suite_key_names_the_data_the_digits_per_kind_and_what_each_kind_does(mnist, monkeypatch):
    """Runs with one key measure on the same digits (a champion's kept figures stand for it); a
    change of the data, of the suite's size or of any kind's change gives another key."""
    key = robustness.suite_key(mnist.train, mnist.digest, 500)
    assert key == robustness.suite_key(mnist.train, mnist.digest, 500)
    assert key != robustness.suite_key(mnist.train, mnist.digest, 501)
    assert key != robustness.suite_key(mnist.train, "another digest", 500)
    kind = robustness.KINDS["gaussian_blur"]
    changed = dataclasses.replace(kind, corrupt=lambda x, rng: kind.corrupt(x, rng) * 0.99)
    monkeypatch.setitem(robustness.KINDS, "gaussian_blur", changed)
    assert key != robustness.suite_key(mnist.train, mnist.digest, 500)
    assert robustness.digits_per_kind(0, 10_000) == 10_000 and robustness.digits_per_kind(20_000, 10_000) == 10_000
    assert robustness.digits_per_kind(500, 10_000) == 500


def test_the_same_digits_twice_in_range_and_each_corruption_changes_them(digits):
    first, again = robustness.suite(digits, seed=42, size=300), robustness.suite(digits, seed=42, size=300)
    other_seed = robustness.suite(digits, seed=43, size=300)
    clean = digits.x[:300]
    for name, split in first.items():
        np.testing.assert_array_equal(split.x, again[name].x, err_msg=name)
        np.testing.assert_array_equal(split.y, digits.y[:300])
        assert split.x.dtype == np.float32 and split.x.shape == clean.shape
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0, name
        changed = np.abs(split.x - clean).reshape(300, -1).max(axis=1) > 0.05
        assert changed.mean() > 0.95, f"{name} leaves {1 - changed.mean():.0%} of the digits as they were"
    # Corruptions with a random part draw it from the seed.
    assert not np.array_equal(first["gaussian_noise"].x, other_seed["gaussian_noise"].x)
    np.testing.assert_array_equal(first["gaussian_blur"].x, other_seed["gaussian_blur"].x)


def test_geometry_moves_ink_without_losing_much_of_it(digits):
    clean = digits.x[:200]
    for name in ("rotation", "shear", "translation"):
        moved = robustness.corrupt(type(digits)(clean, digits.y[:200]), name, seed=0).x
        ink = moved.sum(axis=(1, 2, 3)) / clean.sum(axis=(1, 2, 3))
        assert np.median(ink) > 0.85, name


def test_an_unknown_corruption_is_refused(digits):
    with pytest.raises(ValueError, match="unknown kind of change 'fog': choose one of gaussian_noise, "):
        robustness.corrupt(digits, "fog", seed=0)


def test_evaluation_counts_right_answers_per_corruption_and_the_figure_is_a_png(tmp_path):
    test = load_mnist(write_npz(tmp_path / "tiny.npz", n_train=200, n_test=50), validation_size=50).test
    corrupted = robustness.suite(test, seed=0)
    always_zero = robustness.evaluate(lambda x: np.tile(np.eye(10)[0], (len(x), 1)), corrupted)
    assert set(always_zero.accuracy) == set(robustness.KINDS)
    assert all(value == pytest.approx(0.1) for value in always_zero.accuracy.values())  # 5 of each digit: 5 zeros of 50
    assert always_zero.metrics()["robust_heldout_accuracy_mean"] == pytest.approx(0.1)
    means = {"robust_heldout_accuracy_mean", "robust_trained_accuracy_mean"}
    assert set(always_zero.metrics()) == {f"robust_accuracy_{name}" for name in robustness.KINDS} | means
    assert_png(robustness.plot_examples(corrupted, always_zero, tmp_path / "robustness.png"))


@pytest.mark.parametrize("digits_per_call", [1, 7, 10_000])
def test_kinds_predicted_together_are_counted_each_on_its_own_digits(digits_per_call):
    """Each kind's digits of one class (kind i: class i, i + 1 digits), the model always
    saying 3: only the fourth kind is right, whichever kinds share a call."""
    corrupted = {f"kind_{i}": Split(np.full((i + 1, 28, 28, 1), i / 10, np.float32), np.full(i + 1, i)) for i in range(6)}
    calls = []

    def threes(x):
        calls.append(len(x))
        return np.tile(np.eye(10)[3], (len(x), 1))

    report = robustness.evaluate(threes, corrupted, digits_per_call=digits_per_call)
    assert report.accuracy == {f"kind_{i}": float(i == 3) for i in range(6)}
    assert sum(calls) == 21 and len(calls) == {1: 6, 7: 2, 10_000: 1}[digits_per_call], calls


def test_the_held_out_mean_counts_held_out_kinds_only_and_the_worst_is_one_of_them():
    trained, held = robustness.TRAINED, robustness.HELD_OUT
    report = robustness.RobustnessReport({**{name: 1.0 for name in trained}, **{name: 0.5 for name in held}, held[0]: 0.25})
    assert report.trained_mean == 1.0
    assert report.heldout_mean == pytest.approx((0.5 * (len(held) - 1) + 0.25) / len(held))
    assert report.worst == (held[0], 0.25)
    assert [row[:3] for row in report.rows] == [(n, robustness.KINDS[n].family, robustness.KINDS[n].trained) for n in report.accuracy]


def test_the_suite_can_be_made_of_some_kinds_only(digits):
    some = robustness.suite(digits, seed=0, size=20, names=robustness.HELD_OUT[:2])
    assert list(some) == list(robustness.HELD_OUT[:2]) and all(len(s) == 20 for s in some.values())


def test_a_model_trained_without_augmentation_is_refused_by_the_gate_for_its_held_out_kinds(mnist):
    """A real network of clean digits clears the clean gate (at least 98%) and fails the
    registry's robustness gate, which counts only kinds of change no training imitates."""
    import keras  # noqa: PLC0415

    from experiments import SearchConfig  # noqa: PLC0415
    from model_zoo import make_cnn  # noqa: PLC0415
    from search import assessment, registry  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    model = make_cnn(input_norm="none", batch_norm=True, dropout=0.25)
    # One epoch, annealed: clean accuracy near its ceiling for the time.
    annealed = keras.optimizers.schedules.CosineDecay(3e-3, len(mnist.train) // 128)
    model.compile(optimizer=keras.optimizers.Adam(annealed), loss="sparse_categorical_crossentropy")
    model.fit(mnist.train.x, mnist.train.y, batch_size=128, epochs=1, verbose=0)
    predict = lambda x: model.predict(x, batch_size=1024, verbose=0)  # noqa: E731
    clean = float((predict(mnist.test.x).argmax(1) == mnist.test.y).mean())
    report = robustness.evaluate(predict, robustness.suite(mnist.test, seed=42, size=500))
    scores = {"test_accuracy": clean, "robust_heldout_accuracy_mean": report.heldout_mean}
    refused = registry.shortfalls(scores, assessment.gates(SearchConfig()))
    assert clean >= 0.98, clean
    assert refused == [f"robust_heldout_accuracy_mean {report.heldout_mean:.2%} < 90.00%"], (refused, report.rows)
