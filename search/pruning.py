"""Stop hopeless trials early: the median-stopping rule.

A trial whose best `val_accuracy` after epoch k is below the median of the
finished trials' best `val_accuracy` after their epoch k stops there, as
Optuna's `MedianPruner` and Ray Tune's median stopping rule decide. Keras
Tuner has no pruner and keeps no per-epoch scores in its oracle, so this one
keeps the curves itself; a resumed search seeds it from the logged runs.
"""

from __future__ import annotations

import statistics


class MedianStopping:
    """`report(trial_id, epoch, val_accuracy)` at each epoch's end (0-based, as Keras
    counts) says whether the trial should stop; `end(trial_id)` makes its curve one
    of those the next trials are held against."""

    def __init__(self, min_trials: int, grace_epochs: int):
        self.min_trials = min_trials  # no median of fewer finished trials than this
        self.grace_epochs = grace_epochs  # every trial trains at least this many epochs
        self.finished: dict[str, dict[int, float]] = {}  # trial id -> {epoch: val_accuracy}
        self.running: dict[str, dict[int, float]] = {}
        self.pruned: dict[str, int] = {}  # trial id -> epochs it trained before it stopped

    def report(self, trial_id: str, epoch: int, value: float, last: bool = False) -> bool:
        """Record the trial's val_accuracy after `epoch`; whether it should stop there
        (never after its `last` planned epoch: stopping would save nothing)."""
        curve = self.running.setdefault(trial_id, {})
        curve[epoch] = value
        if last or epoch + 1 < self.grace_epochs:
            return False
        reached = [best_until(c, epoch) for c in self.finished.values() if epoch in c]
        if len(reached) < self.min_trials or best_until(curve, epoch) >= statistics.median(reached):
            return False
        self.pruned[trial_id] = epoch + 1
        return True

    def end(self, trial_id: str, failed: bool = False) -> None:
        curve = self.running.pop(trial_id, {})
        if curve and not failed:
            self.finished[trial_id] = curve

    def seed(self, trial_id: str, curve: dict[int, float], pruned_after: int | None) -> None:
        """A trial finished before a resume: its logged curve, and where it was pruned."""
        self.finished[trial_id] = dict(curve)
        if pruned_after:
            self.pruned[trial_id] = pruned_after


def best_until(curve: dict[int, float], epoch: int) -> float:
    return max(value for step, value in curve.items() if step <= epoch)
