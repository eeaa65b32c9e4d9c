"""Keras Tuner's tuners, keeping the search's books, and the choice of the winner.

The hypermodel decides what to build, the oracle what to try next; the driver
(search/driver.py) runs the trials on a backend. The tuner keeps the books: what
each trial is told before it starts (`trial_spec`), what it cost and how it ended
(`trial_ended`), when the search's share of the budget is spent, and a copy of
its state that a half-written file cannot damage.
"""

from __future__ import annotations

import functools
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras_tuner as kt

from experiments import TUNERS, SearchConfig
from model_zoo import CNNZoo, multiply_adds
from search.budget import Plan, RunBudget
from search.hyperparameters import active_values, fixed_hyperparameters
from search.pruning import MedianStopping
from search.reporting.progress import Progress
from search.tracking import SearchTracker
from search.trial import MedianRule, TrialResult, TrialSpec
from search.tuner_state import keep_good_copy


class TrackedTuner:
    """Mixin: the books of a search whose trials log under `tracker`'s run: a line per trial
    (its `progress`, counting down `trials` or Hyperband's own schedule), the median rule
    (`pruner`, which the driver shares with the trials), each trial's cost. `trial_epochs`:
    a trial's epochs where Hyperband does not set them.

    With a `plan` of a limited budget, no trial starts that would end past the
    search's share of it, and a trial whose measured cost per image would leave its
    final training fewer than the plan's `min_final_epochs` in the time after the
    search is cut in its first epoch: it cannot win (`pick_winner`)."""

    def __init__(
        self,
        *,
        tracker: SearchTracker,
        pruner: MedianStopping | None,
        trial_epochs: int,
        trials: int,
        batch_size: int,
        plan: Plan | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.tracker, self.pruner, self.max_epochs, self.batch_size, self.plan = tracker, pruner, trial_epochs, batch_size, plan
        self.progress = Progress(planned_trials(self.oracle, trials), budget=plan.budget if plan else None)
        self.costs = TrialCosts()

    def search(self, *args, **kwargs) -> None:
        raise TypeError("a tracked tuner's trials run in search/driver.py's loop: drive(tuner, backend, config, train, validation)")

    def pre_create_trial(self) -> None:
        super().pre_create_trial()
        budget = self.plan.budget if self.plan else None
        if len(self.oracle.trials) < (self.oracle.max_trials or math.inf) and self.costs.out_of_search_time(budget):
            # Keras Tuner's own way to end a search: the next trial it creates is STOPPED.
            self.oracle.max_trials = len(self.oracle.trials)
            print(f"search: stopping after {len(self.oracle.trials)} trials, its share of the budget spent; {budget.status()}", flush=True)

    def save(self) -> None:
        """Keras Tuner's save (at the start and after each trial, on every backend), and a copy
        of the whole state that a half-written file cannot damage (search/tuner_state.py)."""
        super().save()
        keep_good_copy(Path(self.project_dir))

    def trial_spec(self, trial: kt.engine.trial.Trial, pruner: MedianRule | None = None) -> TrialSpec:
        """What the trial's lifecycle needs, the progress line said; `pruner`: the median rule
        as the trial reaches it (search/driver.py)."""
        values = active_values(trial.hyperparameters)
        self.progress.trial_started(trial.trial_id, values)
        max_cost = self.plan.max_seconds_per_image() if self.plan else math.inf
        return TrialSpec(trial.trial_id, values, planned_epochs(trial, self.max_epochs), self.batch_size, max_cost, pruner)

    def trial_ended(self, result: TrialResult) -> None:
        """Book how a trial ended: its cost, the progress line."""
        if result.cut:
            self.costs.cut[result.trial_id] = result.cut
        self.costs.trial_ended(result.trial_id, result.seconds, result.seconds_per_image)
        self.progress.trial_ended(result.trial_id, result.score, result.seconds, result.reason, result.pruned, result.cut)


class TrialCosts:
    """What the trials cost here: each one's seconds per training image (measured), its wall
    time, and the trials cut as too costly for the final training the budget leaves."""

    def __init__(self):
        self.seconds_per_image: dict[str, float] = {}
        self.wall_seconds: list[float] = []
        self.cut: dict[str, str] = {}  # trial id -> why

    def trial_ended(self, trial_id: str, wall_seconds: float, seconds_per_image: float | None) -> None:
        self.wall_seconds.append(wall_seconds)
        if seconds_per_image is not None:
            self.seconds_per_image[trial_id] = seconds_per_image

    def seed(self, records: list[dict]) -> None:
        """A resumed search's costs, from the trials logged before (SearchTracker.trial_records)."""
        for record in records:
            if record["status"] == "FINISHED":
                self.trial_ended(record["trial_id"], record["wall_time_s"] or 0.0, record.get("seconds_per_image"))
                if record.get("cut"):
                    self.cut[record["trial_id"]] = record["cut"]

    def out_of_search_time(self, budget: RunBudget | None) -> bool:
        """Whether a trial of the median duration so far would end past the search's share."""
        if not (budget and budget.limited and self.wall_seconds):
            return False  # the first trial always runs: it is what measures the machine
        return budget.search_left() < statistics.median(self.wall_seconds)


TUNER_SEED_STRIDE = 10_007  # a prime larger than any search's trial count


@functools.cache
def tuner_class(name: str, tracked: bool = True) -> type[kt.Tuner]:
    """The tuner named `name` in experiments' TUNERS: Keras Tuner's own class, or
    (`tracked`) that class with this module's bookkeeping mixed in."""
    keras_tuner_class = getattr(kt, TUNERS[name])
    if not tracked:
        return keras_tuner_class
    return type(f"Tracked{keras_tuner_class.__name__}", (TrackedTuner, keras_tuner_class), {})


def make_tuner(
    config: SearchConfig,
    tracker: SearchTracker | None,
    directory: Path,
    project_name: str,
    hypermodel: kt.HyperModel | None = None,
    resume: bool = False,
    dtype_policy: str | None = None,
    pruner: MedianStopping | None = None,
    plan: Plan | None = None,
) -> kt.Tuner:
    """The configured tuner over `hypermodel` (default: the model zoo's families,
    built under `dtype_policy`), scored on `val_accuracy`; hopeless trials are stopped
    by `pruner` (default: the median rule, where `config.prune` is on).

    With `resume`, Keras Tuner reloads the oracle from `directory`: completed
    trials are kept and the interrupted one runs again. With no `tracker`,
    Keras Tuner's own tuner runs the same search untracked. `plan`: see `TrackedTuner`.
    """
    hypermodel = hypermodel or CNNZoo(config.families, dtype_policy=dtype_policy)
    common = dict(
        overwrite=not resume,
        hypermodel=hypermodel,
        hyperparameters=fixed_hyperparameters(hypermodel, config.fixed),
        tune_new_entries=True,
        objective=kt.Objective(config.objective, direction="max"),
        # Keras Tuner samples trial k with seed + k: seeds 42 and 43 would draw the same
        # trials shifted by one. Spread apart, each seed draws trials of its own.
        seed=config.seed * TUNER_SEED_STRIDE,
        directory=str(directory),
        project_name=project_name,
    )
    if tracker:
        rule = (pruner or MedianStopping(config.prune_min_trials, config.prune_grace_epochs)) if config.prune else None
        common |= dict(
            tracker=tracker,
            pruner=rule,
            trial_epochs=config.max_epochs,
            trials=config.max_trials,
            batch_size=config.batch_size,
            plan=plan,
        )
    tuner_type = tuner_class(config.tuner, tracked=tracker is not None)
    if config.tuner == "hyperband":
        tuner = tuner_type(max_epochs=config.max_epochs, factor=config.hyperband_factor, **common)
        tuner.oracle.max_trials = config.max_trials  # Hyperband has no trial cap of its own
    else:
        tuner = tuner_type(max_trials=config.max_trials, **common)
    return tuner


@dataclass(frozen=True)
class Winner:
    trial: kt.engine.trial.Trial  # the configuration the pipeline keeps
    best: kt.engine.trial.Trial  # the highest val_accuracy among the trials whose final training fits
    multiply_adds: int  # the winner's, per digit
    standard_error: float  # of the best val_accuracy on the validation split
    seconds_per_image: float | None = None  # the winner's, measured in its trial
    final_epochs_fit: float = math.inf  # final-training epochs the plan expects to fit here
    left_out: tuple[tuple[str, float, float], ...] = ()  # (trial id, score, epochs that fit) of better trials too costly to win

    def describe(self) -> str:
        line = f"winner: trial {self.trial.trial_id}, val_accuracy {self.trial.score:.2%}, {self.multiply_adds / 1e6:.1f} M multiply-adds per digit"
        if self.seconds_per_image is not None:
            line += f", {self.seconds_per_image * 1e6:.0f} us per training image here"
        if math.isfinite(self.final_epochs_fit):
            line += f", about {self.final_epochs_fit:.0f} final epochs fit"
        if self.trial is not self.best:
            line += f"; the cheapest within {100 * self.standard_error:.2f} points of the best, trial {self.best.trial_id} ({self.best.score:.2%})"
        for trial_id, score, fit in self.left_out:
            line += f"; trial {trial_id} ({score:.2%}) left out: {fit:.1f} final epochs would fit"
        return line


def pick_winner(
    tuner: kt.Tuner,
    validation_size: int,
    within_se: float,
    epochs_that_fit: Callable[[float], float] | None = None,
    min_epochs: int = 1,
) -> Winner:
    """The configuration to retrain: among the completed trials whose final training gets at
    least `min_epochs` epochs here (`epochs_that_fit(seconds per image)`, from each trial's
    measured cost; None: no limit), the cheapest whose val_accuracy is within `within_se`
    standard errors of their best (the one-standard-error rule); 0: their best trial.

    A two-epoch score says how good a network is after two epochs, not after the final
    training this machine can afford: a network that would get only a few epochs there
    loses to a cheaper one that gets many. Scores closer than the validation split's
    sampling noise do not tell the trials apart, and a cheaper network retrains more
    epochs in the same minutes and serves faster. Cost is the measured seconds per
    training image (multiply-adds where a trial has no measurement); ties go to the higher score.
    """
    costs = getattr(tuner, "costs", TrialCosts())
    completed = [t for t in tuner.oracle.trials.values() if t.status == "COMPLETED"]
    uncut = [t for t in completed if t.trial_id not in costs.cut] or completed
    adds = {t.trial_id: multiply_adds(tuner.hypermodel.build(t.hyperparameters.copy())) for t in uncut}
    seconds = _seconds_per_image(costs.seconds_per_image, adds)
    fit = {t.trial_id: epochs_that_fit(seconds[t.trial_id]) if epochs_that_fit and seconds else math.inf for t in uncut}
    cost = seconds or adds
    eligible = [t for t in uncut if fit[t.trial_id] >= min_epochs] or [min(uncut, key=lambda t: cost[t.trial_id])]
    best = max(eligible, key=lambda t: t.score)
    standard_error = math.sqrt(best.score * (1 - best.score) / validation_size)
    close = [t for t in eligible if t.score >= best.score - within_se * standard_error]
    winner = min(close, key=lambda t: (cost[t.trial_id], -t.score, t.trial_id))
    left_out = tuple((t.trial_id, t.score, fit[t.trial_id]) for t in uncut if t not in eligible and t.score > best.score)
    return Winner(winner, best, adds[winner.trial_id], standard_error, seconds.get(winner.trial_id), fit[winner.trial_id], left_out)


def _seconds_per_image(measured: dict[str, float], adds: dict[str, int]) -> dict[str, float]:
    """Each trial's measured seconds per training image; one without a measurement gets the
    median seconds per multiply-add of those with one. Empty where none was measured."""
    rates = [measured[i] / adds[i] for i in adds if i in measured and adds[i]]
    if not rates:
        return {}
    rate = statistics.median(rates)
    return {i: measured.get(i, adds[i] * rate) for i in adds}


def seed_from_records(tuner: kt.Tuner, records: list[dict]) -> None:
    """A resumed search's pruner learns the curves of the trials that finished before
    (`SearchTracker.trial_records`), and its costs their measured costs: Keras Tuner's
    oracle keeps no per-epoch scores."""
    if getattr(tuner, "pruner", None):
        for record in records:
            if record["status"] == "FINISHED" and record["curve"] and not record.get("cut"):
                tuner.pruner.seed(record["trial_id"], dict(record["curve"]), record["pruned"])
    if hasattr(tuner, "costs"):
        tuner.costs.seed(records)


def planned_epochs(trial: kt.engine.trial.Trial, max_epochs: int) -> int:
    """The epochs a trial was to train: Hyperband's `tuner/epochs`, else `max_epochs`."""
    return int(trial.hyperparameters.values.get("tuner/epochs", max_epochs))


def failed_in_a_row(oracle: kt.Oracle) -> bool:
    """Whether the oracle's last `max_consecutive_failed_trials` trials all failed: the state in
    which Keras Tuner stops a search (with a plain RuntimeError, so it is told by the state)."""
    last = oracle.end_order[-oracle.max_consecutive_failed_trials :]
    return len(last) == oracle.max_consecutive_failed_trials and all(
        oracle.trials[t].status == kt.engine.trial.TrialStatus.FAILED for t in last
    )


def planned_trials(oracle: kt.Oracle, max_trials: int) -> int:
    """How many trials the oracle will run: Hyperband's schedule (its brackets and rounds,
    capped at max_trials), else max_trials. What the progress lines count down."""
    if isinstance(oracle, kt.oracles.HyperbandOracle):
        per_iteration = hyperband_trials(oracle.max_epochs, oracle.min_epochs, oracle.factor)
        return min(max_trials, per_iteration * oracle.hyperband_iterations)
    return max_trials


def hyperband_trials(max_epochs: int, min_epochs: int, factor: int) -> int:
    """The trials of one Hyperband iteration (Li et al., as Keras Tuner schedules it): a bracket
    for each division of max_epochs by factor down to min_epochs; bracket b starts
    ceil(s / (b + 1) * factor**b) trials, s = ceil(1 + log_factor(max_epochs)), and each of
    its b later rounds a factor fewer. tests/test_tuner.py counts what a real oracle creates."""
    brackets, epochs = 0, max_epochs
    while epochs >= min_epochs:
        epochs, brackets = epochs / factor, brackets + 1
    first = math.ceil(1 + math.log(max_epochs, factor))
    return sum(math.ceil(first / (b + 1) * factor ** (b - r)) for b in range(brackets) for r in range(b + 1))
