"""The search, top to bottom, as phases that take and return values: prepare the data,
record the setup (and EDA), search, pick the winner, build the model, evaluate it once,
promote it (the registry), report. Each phase takes the tracker, the settings and the data
first, and anything else by name."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_tuner as kt

from experiments import SearchConfig, to_params
from model_zoo import CNNZoo, precision_policy
from search import assessment, evaluate, faults, locking, registry, robustness, tracking
from search import data as data_module
from search.assessment import Evaluation, evaluate_once, write_model_card, write_search_report
from search.budget import AFTER_TRAINING_PER_SETUP, CostModel, Plan, RunBudget, duration
from search.data import DataError
from search.driver import Backend, drive
from search.executors import executor_for
from search.hyperparameters import fixed_hyperparameters
from search.outputs import check_writable, naming_a_full_disk
from search.precision import Precision, choose_precision
from search.reporting import eda, report
from search.reporting.model_card import machine
from search.reporting.progress import top_table
from search.train import augmentation_seconds_per_image, retrain_winner
from search.trial import SearchStopped, failure_reason
from search.tuner import (
    Winner,
    failed_in_a_row,
    make_tuner,
    pick_winner,
    seed_from_records,
)
from search.tuner_state import restore_if_damaged


@dataclass(frozen=True)
class Resume:
    """What a resumed search continues from (search/resume.py decides which runs can be resumed)."""

    run_id: str  # the search's parent run
    data_sha256: str  # the data it started with
    precision: str  # the dtype policy it started with: a resumed search never re-measures it


SUITE_PROBE_DIGITS = 200  # corrupted at the start to time the robustness suite


class SearchFailed(RuntimeError):
    """The search ran but produced nothing to evaluate (every trial failed)."""


@dataclass(frozen=True)
class SearchResult:
    run_id: str
    trials: int
    completed_trials: int
    best_val_accuracy: float
    winner_hyperparameters: dict  # of the trial kept (see pick_winner), not always the best score's
    test: evaluate.TestReport
    decision: registry.RegistryDecision


def run_search(
    config: SearchConfig,
    verbose: int | None = None,
    resume: Resume | None = None,
    hypermodel: kt.HyperModel | None = None,
    started: float | None = None,
) -> SearchResult:
    """Run the whole search described by `config` (or continue one) and return what it found,
    within its time budget (search/budget.py) counted from `started` (a `time.monotonic()`; default: now).

    The trials run where `executor_for(config)` runs them (here, or as Ray tasks);
    everything else happens here, once.
    """
    budget = RunBudget.of(config, time.monotonic() if started is None else started)
    # Keras' progress bars and Keras Tuner's tables in a terminal; in logs, our lines only.
    verbose = (1 if sys.stdout.isatty() else 0) if verbose is None else verbose
    data = prepare_data(config, resume)
    check_writable(Path(config.output_dir))
    fixed_hyperparameters(hypermodel or CNNZoo(config.families), config.fixed)  # a pin outside the space: before a run opens
    executor = executor_for(config, verbose)  # before a run opens: a Ray address that does not answer is one line

    # Models are built under the search's policy (make_tuner), never Keras' global
    # one, which Keras Tuner resets before each build: the caller's is put back after.
    # tracked_run checks the store (and its credentials) before anything trains.
    run = tracking.tracked_run(config.experiment_name, resume.run_id if resume else "", config.tracking_wait_s)
    with precision_policy(None), run as tracker, contextlib.ExitStack() as held:
        out = Path(config.output_dir) / tracker.run_id
        if not resume:  # a resume holds the lock already (resume_search)
            held.enter_context(locking.holding(out, tracker.run_id))
        held.enter_context(naming_a_full_disk(out, tracker.run_id))
        # Chosen once per search; a resumed search keeps the one it started with.
        precision = Precision(resume.precision, "resumed") if resume and resume.precision else choose_precision(config.precision)
        keras.utils.set_random_seed(config.seed)
        setup_started = time.monotonic()
        record_setup(tracker, config, data, precision, resume, out)
        planned = plan(tracker, config, data, budget=budget, setup_s=time.monotonic() - setup_started, precision=precision)
        tuner, records = search(
            tracker,
            config,
            data,
            dtype_policy=precision.policy,
            resume=resume,
            hypermodel=hypermodel,
            executor=executor,
            out=out,
            planned=planned,
        )
        winner = pick(tracker, config, tuner=tuner, validation_images=len(data.validation), planned=planned)
        registered = tracker.registered_version(config.model_name) if resume else None  # stopped after registering
        model = build_model(tracker, config, data, tuner=tuner, winner=winner, registered=registered, planned=planned)
        evaluation = evaluate_once(tracker, model, data, config, out)
        decision = promote(tracker, config, data, model=model, evaluation=evaluation, winner=winner, registered=registered)
        write_search_report(
            tracker,
            config,
            decision=decision,
            records=records,
            out=out,
            winner=winner.describe().removeprefix("winner: "),
            evaluation=evaluation,
            run_time=planned.budget.status(),
            machine=f"{machine()}, {precision.policy}",
        )
        tracker.log_metrics({"run_seconds": budget.elapsed()})
        print(f"done: {budget.status()}", flush=True)
        faults.at("search_end")

    trials = list(tuner.oracle.trials.values())
    return SearchResult(
        run_id=tracker.run_id,
        trials=len(trials),
        completed_trials=sum(t.status == "COMPLETED" for t in trials),
        best_val_accuracy=winner.best.score,
        winner_hyperparameters=winner.trial.hyperparameters.values,
        test=evaluation.test,
        decision=decision,
    )


def prepare_data(config: SearchConfig, resume: Resume | None) -> data_module.MnistData:
    """MNIST loaded, validated and split before anything trains; a resumed search must see the same data."""
    data = data_module.load_mnist(data_module.data_source(config.data), config.validation_size)
    if resume and resume.data_sha256 and resume.data_sha256 != data.digest:
        raise DataError(
            f"{data.source}: not the data search {resume.run_id} started with (sha256 {data.digest[:12]}..., logged {resume.data_sha256[:12]}...)"
        )
    return data


def record_setup(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    data: data_module.MnistData,
    precision: Precision,
    resume: Resume | None,
    out: Path,
) -> None:
    """The resolved settings, the data and the precision as params (a resume logs the same
    values again); the EDA figures, unless a resumed search drew them already."""
    tracker.log_params(to_params(config))
    train_images = len(data_module.subset(data.train, config.train_subset))
    tracker.log_params(
        {"data_source": data.source, "data_sha256": data.digest, "train_images": train_images, "validation_images": len(data.validation)}
    )
    if not (resume and resume.precision):
        tracker.log_params(precision.params())
    tracker.log_dataset("mnist", data.digest, data.source)
    print(f"precision {precision.policy} ({precision.reason})", flush=True)
    if not resume:
        tracker.set_tag("mlflow.runName", f"search-{config.profile}-{config.tuner}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not resume or not (out / "eda" / "label_distribution.png").is_file():
        tracker.log_artifact(eda.sample_grid(data.train, out / "eda" / "sample_digits.png", config.seed), "eda")
        tracker.log_artifact(eda.label_distribution(data, out / "eda" / "label_distribution.png"), "eda")


def plan(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    data: data_module.MnistData,
    *,
    budget: RunBudget,
    setup_s: float,
    precision: Precision,
) -> Plan:
    """What the run will cost here, and the plan it makes of its budget, printed and logged:
    the cost model of the final training and evaluation (the augmentation timed here), and
    the seconds kept after the final training: making the robustness suite (timed on a few
    training digits), and the figures, registry and report (a multiple of the set-up's own
    figures and logging, `setup_s`, which are the same kind of work)."""
    per_kind = robustness.digits_per_kind(config.robust_size, len(data.test))
    evaluated = len(data.test) + len(robustness.KINDS) * per_kind
    # A champion that kept its figures on the same digits is not run again; another is timed on its own network.
    kept = assessment.champion_reference(tracker, config, robustness.suite_key(data.train, data.digest, per_kind))
    champion_images = len(data.test) + len(robustness.HELD_OUT) * per_kind
    timed = budget.limited and not kept and tracker.alias_version(config.model_name, config.champion_alias)
    champion_s = assessment.champion_evaluation_seconds(config, data.train, champion_images) if timed else 0.0
    augment_s = augmentation_seconds_per_image(data.train, config.batch_size, config.augment, config.seed) if config.final_epochs else 0.0
    cost = CostModel(len(data.train), len(data.validation), evaluated, augment_s, champion_s)
    # Making the robustness suite (numpy and scipy, after the training) timed on training digits: the test split is not read yet.
    started = time.monotonic()
    robustness.suite(data_module.subset(data.train, SUITE_PROBE_DIGITS), robustness.SUITE_SEED)
    suite_s = (time.monotonic() - started) * per_kind / SUITE_PROBE_DIGITS
    after_training_s = suite_s + AFTER_TRAINING_PER_SETUP * setup_s
    tracker.log_metrics(
        {
            "setup_seconds": budget.elapsed(),
            "after_training_reserve_seconds": after_training_s,
            "augment_seconds_per_image": augment_s,
            "champion_evaluation_seconds": champion_s,
        }
    )
    if not budget.limited:
        print(f"no time budget: {config.max_trials} trials, then up to {config.final_epochs} final epochs", flush=True)
    else:
        print(
            f"budget {duration(budget.total_s)} on {os.cpu_count()} cores ({precision.policy}): {duration(budget.elapsed())} used starting up; "
            f"trials until {duration(budget.total_s * config.search_share)} (at most {config.max_trials}, each cut in its first epoch if "
            f"its final training could not get {config.min_final_epochs} epochs), then the final training, as many of up to "
            f"{config.final_epochs} epochs as fit, keeping time to evaluate {evaluated:,} digits"
            + (f" (and the champion on the test split and held-out kinds: {duration(champion_s)})" if champion_s else "")
            + (" (the champion's on them kept by its own run)" if kept else "")
            + " and register",
            flush=True,
        )
    return Plan(budget, cost, after_training_s, config.min_final_epochs)


def search(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    data: data_module.MnistData,
    *,
    dtype_policy: str,
    resume: Resume | None,
    hypermodel: kt.HyperModel | None,
    executor: Backend,
    out: Path,
    planned: Plan | None = None,
) -> tuple[kt.Tuner, list[dict]]:
    """The Keras Tuner search, scored on the validation split, within the budget's share;
    trials.csv and the top trials table. Returns the tuner and the trial records the tracker logged."""
    if resume and (restored := restore_if_damaged(out / "tuner")):
        print(restored, flush=True)
    tuner = make_tuner(
        config,
        tracker,
        out,
        project_name="tuner",
        hypermodel=hypermodel,
        resume=resume is not None,
        dtype_policy=dtype_policy,
        plan=planned,
    )
    if resume:
        # Trials the oracle had not seen end run again, under the same ids when its state was
        # never saved: a run one of them finished in the meantime (its result lost with the
        # killed process) must not count twice.
        reason = "the search stopped before it recorded this attempt's result; the trial ran again"
        records = tracker.trial_records()
        unrecorded = {r["trial_id"] for r in records} - set(tuner.oracle.end_order)
        for trial_id in unrecorded:
            tracker.end_trial_runs(trial_id, "KILLED", reason, finished_too=True)
        seed_from_records(tuner, tracker.trial_records() if unrecorded else records)
    train = data_module.subset(data.train, config.train_subset)
    try:
        try:
            drive(tuner, executor, config, train, data.validation)
        except SearchStopped as err:
            if isinstance(err.error, (tracking.TrackingUnavailable, OSError)):
                raise err.error from None
            raise
        except RuntimeError:
            if not failed_in_a_row(tuner.oracle):
                raise
            last = tuner.oracle.trials[tuner.oracle.end_order[-1]]
            raise SearchFailed(
                f"{tuner.oracle.max_consecutive_failed_trials} trials failed in a row, the last with: {failure_reason(last.message)}"
            ) from None
    except BaseException:
        with contextlib.suppress(Exception):  # the table of what ran, if the store still answers
            tracker.log_artifact(report.write_trials_csv(tracker.trial_records(), out / "trials.csv"))
        raise
    records = tracker.trial_records()
    tracker.log_artifact(report.write_trials_csv(records, out / "trials.csv"))
    if planned:
        tracker.log_metrics({"search_seconds": planned.budget.elapsed()})
    print(top_table(records))
    return tuner, records


def pick(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    *,
    tuner: kt.Tuner,
    validation_images: int,
    planned: Plan,
) -> Winner:
    """The trial whose configuration becomes the model: judged by what its final training
    can reach in the time left here (see tuner.pick_winner)."""
    trials = list(tuner.oracle.trials.values())
    if not any(t.status == "COMPLETED" for t in trials):
        raise SearchFailed(f"all {len(trials)} trials failed; see the failure_reason tags of the trial runs")
    fits = planned.epochs_that_fit if planned.limited and config.final_epochs else None
    winner = pick_winner(tuner, validation_images, config.winner_within_se, fits, config.min_final_epochs)
    metrics = {
        "best_val_accuracy": winner.best.score,
        "winner_val_accuracy": winner.trial.score,
        "winner_multiply_adds": winner.multiply_adds,
    }
    if winner.seconds_per_image is not None:
        metrics["winner_train_seconds_per_image"] = winner.seconds_per_image
        metrics["final_epoch_seconds_predicted"] = planned.cost.epoch_seconds(winner.seconds_per_image)
    tracker.log_metrics(metrics)
    tracker.set_tag("best_trial_id", winner.best.trial_id)
    tracker.set_tag("winner_trial_id", winner.trial.trial_id)
    print(winner.describe(), flush=True)
    return winner


def build_model(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    data: data_module.MnistData,
    *,
    tuner: kt.Tuner,
    winner: Winner,
    registered: str | None,
    planned: Plan,
) -> keras.Model:
    """The winner's checkpoint, or its configuration retrained longer (`final_models` times: their average)
    in the time the budget leaves before the evaluation; for a search stopped after it registered its model, that model."""
    if registered:
        print(f"this search registered {config.model_name} version {registered} before it stopped: completing that version", flush=True)
        return tracking.load_keras_model(f"models:/{config.model_name}/{registered}")
    if config.final_epochs:
        if planned.limited:
            print(
                f"final training: {duration(max(0.0, planned.final_seconds()))} until the evaluation; {planned.budget.status()}", flush=True
            )
        # Asked after the first epoch, which times the validation pass: the evaluation's inference is kept out.
        seconds_left = planned.training_seconds_left if planned.limited else None
        return retrain_winner(tuner.hypermodel, winner.trial.hyperparameters, data, config, tracker.log_metrics, seconds_left)
    with warnings.catch_warnings():  # checkpoints hold weights only, not the optimizer state
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return tuner.load_model(winner.trial)


def promote(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    data: data_module.MnistData,
    *,
    model: keras.Model,
    evaluation: Evaluation,
    winner: Winner,
    registered: str | None = None,
) -> registry.RegistryDecision:
    """The registry gates; a challenger is compared with the champion on the same test digits and suite."""
    scores = evaluation.scores
    if registered and tracker.alias_version(config.model_name, config.champion_alias) == registered:
        return registry.decided_before(tracker, config.model_name, config.champion_alias, registered)
    gates = assessment.gates(config)
    clears = evaluation.clears(gates)
    comparison, card = None, ""
    if clears and tracker.alias_version(config.model_name, config.champion_alias):
        kept = assessment.champion_reference(tracker, config, evaluation.suite_key)
        how = "the figures its own run kept on the same digits" if kept else "evaluated here on the test split and the held-out kinds"
        print(f"comparing with @{config.champion_alias}: {how}", flush=True)
        champion = kept or assessment.measure_champion(config, data.test, evaluation.corrupted, evaluation.suite_key)
        comparison = evaluate.compare(
            evaluation.test,
            champion.test_predicted,
            data.test.y,
            evaluation.robust.heldout_mean,
            champion.heldout_mean,
            (config.threshold, config.robust_threshold),
        )
    if clears:
        card = write_model_card(tracker, config, data, winner, model, evaluation, gates)
    candidate = registry.Candidate(model, scores, comparison, evaluation.int8_model, card)
    decision = registry.register_if_better(
        tracker, candidate, registry.Promotion(config.model_name, config.champion_alias, gates), registered
    )
    print(
        f"test_accuracy {scores['test_accuracy']:.4f}, robust_heldout_accuracy_mean {scores['robust_heldout_accuracy_mean']:.4f} - {decision.reason}"
    )
    return decision
