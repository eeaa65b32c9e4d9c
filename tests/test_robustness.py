"""Data tests of the robustness suite: deterministic, in range, every corruption a change."""

import numpy as np
import pytest

from search import robustness
from search.data import load_mnist
from tests.helpers import write_npz
from tests.test_evaluate import assert_png


@pytest.fixture(scope="module")
def digits(mnist):
    return mnist.test


def test_the_suite_covers_the_families_of_change():
    assert len(robustness.CORRUPTIONS) >= 10
    families = {
        "noise": {"gaussian_noise", "impulse_noise"},
        "blur": {"gaussian_blur", "motion_blur"},
        "geometry": {"rotation", "shear", "scale", "translation"},
        "stroke width": {"thick_strokes", "thin_strokes"},
        "contrast": {"low_contrast", "brightness"},
        "occlusion": {"occlusion", "line"},
        "resolution": {"low_resolution"},
    }
    assert set().union(*families.values()) == set(robustness.CORRUPTIONS)


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
    with pytest.raises(ValueError, match="unknown corruption 'fog': choose one of gaussian_noise, "):
        robustness.corrupt(digits, "fog", seed=0)


def test_evaluation_counts_right_answers_per_corruption_and_the_figure_is_a_png(tmp_path):
    test = load_mnist(write_npz(tmp_path / "tiny.npz", n_train=200, n_test=50), validation_size=50).test
    corrupted = robustness.suite(test, seed=0)
    always_zero = robustness.evaluate(lambda x: np.tile(np.eye(10)[0], (len(x), 1)), corrupted)
    assert set(always_zero.accuracy) == set(robustness.CORRUPTIONS)
    assert all(value == pytest.approx(0.1) for value in always_zero.accuracy.values())  # 5 of each digit: 5 zeros of 50
    assert always_zero.metrics()["robust_accuracy_mean"] == pytest.approx(0.1)
    assert set(always_zero.metrics()) == {f"robust_accuracy_{name}" for name in robustness.CORRUPTIONS} | {"robust_accuracy_mean"}
    assert_png(robustness.plot_examples(corrupted, always_zero, tmp_path / "robustness.png"))
