"""Evaluate a model on the test split; compare a challenger with the champion (McNemar)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from search.data import Split
from search.reporting.plots import mosaic, save, subplots


@dataclass(frozen=True)
class TestReport:
    accuracy: float
    loss: float
    confusion: np.ndarray  # (10, 10): rows true digit, columns predicted digit
    predicted: np.ndarray  # (N,): the predicted digit of each test image
    recall: np.ndarray  # (10,): per digit, correct / images of that digit
    precision: np.ndarray  # (10,): per digit, correct / images predicted as that digit

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: test_accuracy, test_loss, test_recall_digit_<d>, test_precision_digit_<d>."""
        recall = {f"test_recall_digit_{d}": float(v) for d, v in enumerate(self.recall)}
        precision = {f"test_precision_digit_{d}": float(v) for d, v in enumerate(self.precision)}
        return {"test_accuracy": self.accuracy, "test_loss": self.loss, **recall, **precision}


@dataclass(frozen=True)
class Comparison:
    """A challenger against the champion on the same test images (McNemar's exact test)
    and on the same robustness suite."""

    challenger_accuracy: float
    champion_accuracy: float
    challenger_only_right: int  # discordant: the challenger right, the champion wrong
    champion_only_right: int  # discordant: the champion right, the challenger wrong
    p_value: float  # two-sided exact binomial test on the discordant pairs
    challenger_robust_accuracy: float  # robust_heldout_accuracy_mean
    champion_robust_accuracy: float
    champion_clears_gates: bool  # the champion's own figures against today's gates

    @property
    def challenger_wins(self) -> bool:
        """The promotion rule: a champion that fails today's gates always loses; otherwise
        the challenger must be no worse on both the clean test split and the robustness
        suite's mean, and better on one of them."""
        if not self.champion_clears_gates:
            return True
        clean, robust = self.challenger_accuracy - self.champion_accuracy, self.challenger_robust_accuracy - self.champion_robust_accuracy
        return clean >= 0 and robust >= 0 and (clean > 0 or robust > 0)


def evaluate(model: keras.Model, test: Split, batch_size: int = 1024) -> TestReport:
    """Accuracy, cross-entropy loss, confusion matrix and predictions of `model` on `test`."""
    return report(model.predict(test.x, batch_size=batch_size, verbose=0), test.y)


def report(probabilities: np.ndarray, labels: np.ndarray) -> TestReport:
    """The test report of predicted class probabilities (N, 10) against the true digits."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(labels)), labels]
    loss = float(-np.log(np.clip(picked, 1e-7, 1.0)).mean())  # as Keras clips
    confusion = confusion_matrix(labels, predicted, labels=range(10))
    precision, recall, _, _ = precision_recall_fscore_support(labels, predicted, labels=range(10), zero_division=0)
    return TestReport(float((predicted == labels).mean()), loss, confusion, predicted, recall, precision)


def compare(
    challenger: TestReport,
    champion_predicted: np.ndarray,
    labels: np.ndarray,
    challenger_robust: float,
    champion_robust: float,
    gates: tuple[float, float],
) -> Comparison:
    """Two models on the same labelled images (McNemar's exact test: the champion's
    predicted digits against the challenger's) and on the same robustness suite (their
    robust_heldout_accuracy_mean); `gates` = (threshold, robust_threshold)."""
    challenger_right, champion_right = challenger.predicted == labels, champion_predicted == labels
    b = int((challenger_right & ~champion_right).sum())
    c = int((champion_right & ~challenger_right).sum())
    champion_accuracy = float(champion_right.mean())
    clears = champion_accuracy >= gates[0] and champion_robust >= gates[1]
    return Comparison(challenger.accuracy, champion_accuracy, b, c, mcnemar_p_value(b, c), challenger_robust, champion_robust, clears)


def mcnemar_p_value(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: P(as uneven a split of b + c discordant pairs | no difference)."""
    return 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5).pvalue)


def plot_confusion_matrix(report: TestReport, path: Path) -> Path:
    """The confusion matrix with counts in every non-empty cell."""
    fig, ax = subplots(figsize=(6.5, 5.5))
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


def plot_misclassified(test: Split, report: TestReport, path: Path, limit: int = 40, cols: int = 10) -> Path:
    """The first `limit` misclassified test digits, titled true -> predicted."""
    wrong = np.flatnonzero(report.predicted != test.y)[:limit]
    rows = max(1, math.ceil(len(wrong) / cols))
    fig, ax = subplots(figsize=(cols * 1.1, rows * 1.3))
    mosaic(ax, test.x[wrong, :, :, 0], cols, [f"{test.y[i]} -> {report.predicted[i]}" for i in wrong], color="crimson")
    ax.axis("off")
    total = int((report.predicted != test.y).sum())
    fig.suptitle(f"Misclassified test digits (true -> predicted): {len(wrong)} of {total}")
    return save(fig, path)


@dataclass(frozen=True)
class Calibration:
    """How far the served probabilities can be taken at their word: the top probability
    (confidence) against how often that answer is right, in bins of confidence."""

    accuracy: float  # of the served form's answers
    expected_calibration_error: float  # sum over bins of |accuracy - confidence| weighted by the bin's share
    bins: list[tuple[float, float, int, float, float]]  # (low, high, images, mean confidence, accuracy), non-empty bins


def calibration(
    probabilities: np.ndarray, labels: np.ndarray, edges: tuple[float, ...] = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)
) -> Calibration:
    """The calibration of (N, 10) `probabilities` on `labels`; bins finer near 1, where most answers lie."""
    confidence, right = probabilities.max(axis=1), probabilities.argmax(axis=1) == labels
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, len(edges) - 2)
    bins, error = [], 0.0
    for b in range(len(edges) - 1):
        members = index == b
        if members.any():
            mean_confidence, accuracy = float(confidence[members].mean()), float(right[members].mean())
            bins.append((edges[b], edges[b + 1], int(members.sum()), mean_confidence, accuracy))
            error += members.mean() * abs(accuracy - mean_confidence)
    return Calibration(float(right.mean()), float(error), bins)


def plot_reliability(figures: Calibration, path: Path) -> Path:
    """The reliability diagram: each bin's accuracy against its mean confidence."""
    fig, ax = subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", label="perfectly calibrated")
    confidence = [b[3] for b in figures.bins]
    accuracy = [b[4] for b in figures.bins]
    ax.plot(confidence, accuracy, marker="o", label="served model")
    for _, _, images, x, y in figures.bins:
        ax.annotate(f"{images:,}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability on the test set\n(ECE {figures.expected_calibration_error:.2%})")
    ax.legend(loc="upper left", fontsize=8)
    return save(fig, path)
