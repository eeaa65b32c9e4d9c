"""The search, top to bottom: data, EDA, tuner search, one test evaluation, registry gate."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import keras

from experiments import SearchConfig
from search import data as data_module
from search import eda, evaluate, tracking
from search.data import Split
from search.train import train_final
from search.tuner import make_tuner, write_trials_csv


class SearchFailed(RuntimeError):
    """The search ran but produced nothing to evaluate (every trial failed)."""


@dataclass(frozen=True)
class SearchResult:
    run_id: str
    trials: int
    completed_trials: int
    best_val_accuracy: float
    best_hyperparameters: dict
    test: evaluate.TestReport
    decision: tracking.RegistryDecision


def run_search(config: SearchConfig, verbose: int | None = None) -> SearchResult:
    """Run the whole search described by `config` and return what it found."""
    verbose = (1 if sys.stdout.isatty() else 2) if verbose is None else verbose

    # 1. Data: loaded and validated before anything trains.
    data = data_module.load_mnist(data_module.data_source(config.data), config.validation_size)
    train = _subset(data.train, config.train_subset)
    precision = set_precision(config.precision)
    keras.utils.set_random_seed(config.seed)

    with tracking.search_run(config.experiment_name) as tracker:
        out = Path(config.output_dir) / tracker.run_id
        tracker.log_params(tracking.config_params(config))
        tracker.log_params({"data_source": data.source, "data_sha256": data.digest, "precision_used": precision, "train_images": len(train), "validation_images": len(data.validation)})

        # 2. EDA figures.
        tracker.log_artifact(eda.sample_grid(data.train, out / "eda" / "sample_digits.png", config.seed), "eda")
        tracker.log_artifact(eda.label_distribution(data, out / "eda" / "label_distribution.png"), "eda")

        # 3. The search, scored on the validation split.
        tuner = make_tuner(config, tracker, out, project_name="tuner")
        tuner.search(
            train.x,
            train.y,
            validation_data=(data.validation.x, data.validation.y),
            epochs=config.max_epochs,
            batch_size=config.batch_size,
            callbacks=_early_stopping(config),
            verbose=verbose,
        )
        tracker.log_artifact(write_trials_csv(tuner, out / "trials.csv"))
        trials = list(tuner.oracle.trials.values())
        completed = [t for t in trials if t.status == "COMPLETED"]
        if not completed:
            raise SearchFailed(f"all {len(trials)} trials failed; see the failure_reason tags of the trial runs")
        best_trial = tuner.oracle.get_best_trials(1)[0]
        tracker.log_metrics({"best_val_accuracy": best_trial.score})
        tracker.set_tag("best_trial_id", best_trial.trial_id)

        # 4. The model: the best trial's checkpoint, or its configuration retrained longer.
        if config.final_epochs:
            best_model = train_final(
                tuner.hypermodel, best_trial.hyperparameters, data.train, data.validation,
                config.final_epochs, config.batch_size, config.early_stopping_patience,
                on_epoch_end=lambda epoch, logs: tracker.log_metrics({f"final_{k}": v for k, v in logs.items()}, step=epoch),
            )
        else:
            best_model = tuner.load_model(best_trial)

        # 5. The test split, touched once, after the search.
        report = evaluate.evaluate(best_model, data.test)
        tracker.log_metrics(report.metrics())
        tracker.log_artifact(evaluate.plot_confusion_matrix(report, out / "evaluation" / "confusion_matrix.png"), "evaluation")

        # 6. Registry gate.
        decision = tracker.register_if_better(best_model, report.accuracy, config.threshold, config.model_name, config.champion_alias)
        print(f"test_accuracy {report.accuracy:.4f} - {decision.reason}")

    return SearchResult(
        run_id=tracker.run_id,
        trials=len(trials),
        completed_trials=len(completed),
        best_val_accuracy=best_trial.score,
        best_hyperparameters=best_trial.hyperparameters.values,
        test=report,
        decision=decision,
    )


def set_precision(precision: str) -> str:
    """Set Keras' global dtype policy; `auto` picks bf16 where the CPU computes it natively."""
    if precision == "auto":
        precision = "mixed_bfloat16" if cpu_has_bf16() else "float32"
    keras.mixed_precision.set_global_policy(precision)
    return precision


def cpu_has_bf16() -> bool:
    """Whether the CPU advertises native bf16 (AVX-512 BF16 or AMX) on Linux."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _subset(split: Split, n: int) -> Split:
    return split if not n or n >= len(split) else Split(split.x[:n], split.y[:n])


def _early_stopping(config: SearchConfig) -> list[keras.callbacks.Callback]:
    if not config.early_stopping_patience:
        return []
    return [keras.callbacks.EarlyStopping(monitor=config.objective, mode="max", patience=config.early_stopping_patience)]
