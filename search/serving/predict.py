"""Classify digits with a logged or registered model, as MLflow serves it: one line per input."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from search.serving.pyfunc_model import MAX_DIGITS, probabilities_of


@dataclass(frozen=True)
class Prediction:
    input: str  # file name, or `array.npy[i]`
    digit: int
    probability: float

    def line(self, as_json: bool = False) -> str:
        return json.dumps(asdict(self)) if as_json else f"{self.input}\t{self.digit}\t{self.probability:.4f}"


def predict(model, names: list[str], digits: np.ndarray) -> list[Prediction]:
    """The most probable digit of each of `digits` (float32 (N, 28, 28, 1) in [0, 1]) and its
    probability, from `model` as MLflow's pyfunc serves it (the registered model's served form)."""
    answers = [model.predict(digits[i : i + MAX_DIGITS]) for i in range(0, len(digits), MAX_DIGITS)]
    probabilities = np.concatenate([probabilities_of(answer) for answer in answers])
    best = np.concatenate([np.asarray(answer["digit"]) for answer in answers])
    return [Prediction(name, int(d), float(p[d])) for name, d, p in zip(names, best, probabilities)]
