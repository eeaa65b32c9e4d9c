"""Model tests of the test-set evaluation, and data tests of the EDA figures."""

from pathlib import Path

import numpy as np
import pytest

from model_zoo import make_cnn
from search.data import load_mnist
from search.evaluate import (
    calibration,
    compare,
    evaluate,
    mcnemar_p_value,
    plot_confusion_matrix,
    plot_misclassified,
    plot_reliability,
    report,
)
from search.reporting import eda
from tests.helpers import write_npz

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path, min_bytes: int = 5_000):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) >= min_bytes


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = write_npz(tmp_path_factory.mktemp("data") / "small.npz", n_train=200, n_test=300)
    return load_mnist(str(path), validation_size=50)


def test_evaluation_agrees_with_keras(small):
    model = make_cnn(conv_filters=(8,))
    result = evaluate(model, small.test)
    keras_loss, keras_accuracy = model.evaluate(small.test.x, small.test.y, verbose=0)
    assert result.accuracy == pytest.approx(keras_accuracy, abs=1e-6)
    assert result.loss == pytest.approx(keras_loss, rel=1e-4)
    assert result.confusion.sum() == len(small.test)
    np.testing.assert_array_equal(result.confusion.sum(axis=1), np.bincount(small.test.y, minlength=10))
    np.testing.assert_allclose(result.recall, np.diag(result.confusion) / result.confusion.sum(axis=1))
    metrics = result.metrics()
    assert set(metrics) == {"test_accuracy", "test_loss", *(f"test_{k}_digit_{d}" for k in ("recall", "precision") for d in range(10))}
    per_digit_correct = sum(metrics[f"test_recall_digit_{d}"] * 30 for d in range(10))  # 30 test images per digit
    assert per_digit_correct == pytest.approx(result.accuracy * 300)
    np.testing.assert_array_equal(result.predicted, model.predict(small.test.x, verbose=0).argmax(axis=1))


def test_figures_are_pngs(small, tmp_path):
    result = evaluate(make_cnn(conv_filters=(8,)), small.test)
    assert_png(plot_confusion_matrix(result, tmp_path / "evaluation" / "confusion_matrix.png"))
    assert_png(plot_misclassified(small.test, result, tmp_path / "evaluation" / "misclassified.png"))
    assert_png(eda.sample_grid(small.train, tmp_path / "eda" / "sample.png", seed=0))
    assert_png(eda.label_distribution(small, tmp_path / "eda" / "labels.png"))


GATES = (0.5, 0.5)  # (threshold, robust_threshold) that both models clear


def report_of(predicted, labels):
    predicted = np.asarray(predicted)
    return report(np.eye(10)[predicted], labels)


def test_mcnemar_counts_discordant_pairs_and_gives_the_exact_p_value():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    challenger = report_of([0, 1, 2, 3, 4, 5, 6, 7, 8, 0], labels)  # 9 right
    champion = np.array([0, 1, 2, 3, 4, 5, 0, 0, 0, 9])  # 7 right
    result = compare(challenger, champion, labels, 0.95, 0.95, GATES)
    assert (result.challenger_only_right, result.champion_only_right) == (3, 1)
    assert (result.challenger_accuracy, result.champion_accuracy) == (0.9, 0.7)
    assert result.p_value == pytest.approx(2 * (1 + 4) / 16)  # binomial(4, 1/2): P(X <= 1) twice


def test_a_challenger_must_be_no_worse_on_clean_and_corrupted_digits_and_better_on_one():
    labels = np.arange(10)
    nine, seven = report_of([0, 1, 2, 3, 4, 5, 6, 7, 8, 0], labels), report_of([0, 1, 2, 3, 4, 5, 0, 0, 0, 9], labels)
    assert compare(nine, seven.predicted, labels, 0.95, 0.95, GATES).challenger_wins  # better clean, same robust
    assert compare(seven, seven.predicted, labels, 0.96, 0.95, GATES).challenger_wins  # same clean, better robust
    assert not compare(seven, nine.predicted, labels, 0.95, 0.95, GATES).challenger_wins  # worse clean
    assert not compare(nine, seven.predicted, labels, 0.94, 0.95, GATES).challenger_wins  # better clean, worse robust
    assert not compare(nine, nine.predicted, labels, 0.95, 0.95, GATES).challenger_wins  # a tie keeps the champion
    # A champion below today's gates (here the robust one) gives way to any challenger that clears them.
    beaten = compare(seven, nine.predicted, labels, 0.93, 0.80, (0.5, 0.9))
    assert not beaten.champion_clears_gates and beaten.challenger_wins


def test_mcnemar_p_value_reference_values():
    assert mcnemar_p_value(0, 0) == 1.0
    assert mcnemar_p_value(5, 5) == 1.0
    assert mcnemar_p_value(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p_value(30, 12) == pytest.approx(0.00792, abs=1e-5)  # exact binomial, as scipy's binomtest


def test_calibration_is_zero_when_confidence_matches_accuracy_and_measures_overconfidence():
    labels = np.zeros(1000, dtype=int)
    probabilities = np.full((1000, 10), 0.1 / 9)
    probabilities[:, 0] = 0.9  # every answer "0" with 90% confidence...
    wrong = np.arange(1000) % 10 == 0
    labels[wrong] = 1  # ...and right 90% of the time: calibrated
    calibrated = calibration(probabilities, labels)
    assert calibrated.accuracy == pytest.approx(0.9) and calibrated.expected_calibration_error == pytest.approx(0.0, abs=1e-9)
    assert calibrated.bins == [(0.9, 0.95, 1000, pytest.approx(0.9), pytest.approx(0.9))]

    labels[np.arange(1000) % 2 == 0] = 1  # now right half of the time, still 90% sure: 40 points overconfident
    assert calibration(probabilities, labels).expected_calibration_error == pytest.approx(0.4)


def test_the_reliability_diagram_is_written(tmp_path):
    probabilities = np.random.default_rng(0).dirichlet(np.ones(10) * 0.2, size=500)
    labels = np.random.default_rng(1).integers(0, 10, 500)
    path = plot_reliability(calibration(probabilities, labels), tmp_path / "reliability.png")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
