"""What the terminal shows while a search runs: a line per trial, the best so far, the time left."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Mapping, Protocol, TextIO


class Clock(Protocol):
    def status(self) -> str: ...  # the run's time used and left (search/budget.py)


def describe(hyperparameters: Mapping[str, object]) -> str:
    """The trial's choices in one line; Hyperband's bookkeeping shown as bracket/round."""
    parts = [f"{name}={readable(value)}" for name, value in hyperparameters.items() if not name.startswith("tuner/")]
    if "tuner/bracket" in hyperparameters:
        parts.append(
            f"(bracket {hyperparameters['tuner/bracket']} round {hyperparameters['tuner/round']}, {hyperparameters['tuner/epochs']} epochs)"
        )
    return " ".join(parts)


class Progress:
    """Prints a line when a trial starts and when it ends; `max_trials` bounds the estimate of
    the search's time left, and `budget` (if given) says the whole run's."""

    def __init__(self, max_trials: int, out: TextIO | None = None, budget: Clock | None = None):
        self.max_trials, self.budget = max_trials, budget
        self.out = out or sys.stdout
        self.durations: list[float] = []
        self.best: float | None = None
        self.started = 0  # trials at once (Ray) start before earlier ones end

    def trial_started(self, trial_id: str, hyperparameters: Mapping[str, object]) -> None:
        self.started += 1
        self._print(f"trial {self.started}/{self.max_trials} (id {trial_id}): {describe(hyperparameters)}")

    def trial_ended(
        self, trial_id: str, val_accuracy: float | None, seconds: float, failure: str = "", pruned: int | None = None, cut: str = ""
    ) -> None:
        self.durations.append(seconds)
        if val_accuracy is not None and (self.best is None or val_accuracy > self.best):
            self.best = val_accuracy
        outcome = f"FAILED ({failure})" if failure else f"val_accuracy {val_accuracy:.4f}"
        if pruned:
            outcome += f", pruned after epoch {pruned} (below the median)"
        if cut:
            outcome += f", cut in its first epoch ({cut})"
        best = f"best so far {self.best:.4f}" if self.best is not None else "no trial completed yet"
        left = max(0, self.max_trials - len(self.durations))
        eta = f", about {_duration(statistics.fmean(self.durations) * left)} left for up to {left} more" if left else ""
        run = f"; {self.budget.status()}" if self.budget else ""
        self._print(f"trial {len(self.durations)}/{self.max_trials} (id {trial_id}) {outcome} in {_duration(seconds)}; {best}{eta}{run}")

    def _print(self, line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", file=self.out, flush=True)


def readable(value: object) -> str:
    """A value as people read it: floats (also as MLflow's param text) to 3 significant
    digits (0.3, 0.00581), anything else as it is."""
    if isinstance(value, int):  # bool too
        return str(value)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if "." not in value and "e" not in value.lower():
            return value  # a whole number as logged
        value = number
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def completed(records: list[Mapping[str, object]]) -> list[Mapping[str, object]]:
    """Trial records (SearchTracker.trial_records) that finished with a score, best first."""
    return sorted((r for r in records if r.get("val_accuracy") is not None), key=lambda r: -float(r["val_accuracy"]))


def top_table(records: list[Mapping[str, object]], k: int = 5) -> str:
    """The `k` best completed trials as a fixed-width table."""
    done = completed(records)[:k]
    lines = [f"top {len(done)} trials", f"{'trial':>6}  {'val_accuracy':>12}  hyperparameters"]
    lines += [f"{r['trial_id']:>6}  {float(r['val_accuracy']):>12.4f}  {describe(r['hyperparameters'])}" for r in done]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
