"""Model tests of the test-set evaluation, and data tests of the EDA figures."""

from pathlib import Path

import numpy as np
import pytest

from model_zoo import make_cnn
from search import eda
from search.data import load_mnist
from search.evaluate import evaluate, plot_confusion_matrix
from tests.conftest import write_npz

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
    report = evaluate(model, small.test)
    keras_loss, keras_accuracy = model.evaluate(small.test.x, small.test.y, verbose=0)
    assert report.accuracy == pytest.approx(keras_accuracy, abs=1e-6)
    assert report.loss == pytest.approx(keras_loss, rel=1e-4)
    assert report.confusion.sum() == len(small.test)
    np.testing.assert_array_equal(report.confusion.sum(axis=1), np.bincount(small.test.y, minlength=10))
    metrics = report.metrics()
    assert set(metrics) == {"test_accuracy", "test_loss", *(f"test_accuracy_digit_{d}" for d in range(10))}
    per_digit_correct = sum(metrics[f"test_accuracy_digit_{d}"] * 30 for d in range(10))  # 30 test images per digit
    assert per_digit_correct == pytest.approx(report.accuracy * 300)


def test_figures_are_pngs(small, tmp_path):
    report = evaluate(make_cnn(conv_filters=(8,)), small.test)
    assert_png(plot_confusion_matrix(report, tmp_path / "evaluation" / "confusion_matrix.png"))
    assert_png(eda.sample_grid(small.train, tmp_path / "eda" / "sample.png", seed=0))
    assert_png(eda.label_distribution(small, tmp_path / "eda" / "labels.png"))
