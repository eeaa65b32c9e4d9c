"""Evaluate a trained model on the test split, once, and draw its confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from search.data import Split
from search.plots import plt, save


@dataclass(frozen=True)
class TestReport:
    accuracy: float
    loss: float
    confusion: np.ndarray  # (10, 10): rows true digit, columns predicted digit

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """Recall of each digit: correct / images of that digit."""
        return np.diag(self.confusion) / np.maximum(self.confusion.sum(axis=1), 1)

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: test_accuracy, test_loss, test_accuracy_digit_<d>."""
        per_digit = {f"test_accuracy_digit_{d}": float(a) for d, a in enumerate(self.per_class_accuracy)}
        return {"test_accuracy": self.accuracy, "test_loss": self.loss, **per_digit}


def evaluate(model: keras.Model, test: Split, batch_size: int = 1024) -> TestReport:
    """Accuracy, cross-entropy loss and confusion matrix of `model` on `test`."""
    probabilities = model.predict(test.x, batch_size=batch_size, verbose=0).astype(np.float64)
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(test)), test.y]
    loss = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())  # as Keras clips
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (test.y, predicted), 1)
    return TestReport(accuracy=float((predicted == test.y).mean()), loss=loss, confusion=confusion)


def plot_confusion_matrix(report: TestReport, path: Path) -> Path:
    """The confusion matrix with counts in every non-empty cell."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(np.log1p(report.confusion), cmap="Blues")
    for (true, pred), count in np.ndenumerate(report.confusion):
        if count:
            color = "white" if true == pred else "black"
            ax.text(pred, true, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(f"Test confusion matrix (accuracy {report.accuracy:.2%})")
    fig.colorbar(image, ax=ax, label="log(1 + images)")
    return save(fig, path)
