"""Every MLflow call of the search: the parent run, one nested run per trial, the registry.

The parent run is the one `mlflow run` started (it passes MLFLOW_RUN_ID, which
the first `mlflow.start_run()` adopts); outside `mlflow run` it is a new run.
Trial runs are created with the client, not the fluent API, so they never
become the process's active run and can be ended from any hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Iterator, Mapping

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

# What the logged model needs to be loaded and served; given explicitly
# because inferring it costs seconds per call.
MODEL_REQUIREMENTS = tuple(f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "tensorflow", "keras"))
MODEL_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1), "digits")]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities")]),
)
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class RegistryDecision:
    registered: bool
    reason: str  # one line for people: stdout and the parent run's tag
    version: str | None = None
    champion: bool = False  # whether the alias now points to this version


class SearchTracker:
    """The search's parent run and the open trial runs under it."""

    def __init__(self, parent: mlflow.entities.Run):
        self.client = mlflow.MlflowClient()
        self.run_id = parent.info.run_id
        self.experiment_id = parent.info.experiment_id
        self._trial_runs: dict[str, str] = {}  # trial id -> open child run id

    # --- parent run ---------------------------------------------------------
    def log_params(self, params: Mapping[str, object]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    # --- one nested run per trial ---------------------------------------------
    def start_trial(self, trial_id: str, hyperparameters: Mapping[str, object]) -> None:
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"trial-{trial_id}",
            tags={MLFLOW_PARENT_RUN_ID: self.run_id, "trial_id": trial_id},
        )
        self._trial_runs[trial_id] = run.info.run_id
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in hyperparameters.items()])

    def log_epoch(self, trial_id: str, epoch: int, logs: Mapping[str, float]) -> None:
        now = _now_ms()
        metrics = [Metric(k, float(logs[k]), now, epoch) for k in EPOCH_METRICS if k in logs]
        self.client.log_batch(self._trial_runs[trial_id], metrics=metrics)

    def end_trial(self, trial_id: str, failed: bool, summary: Mapping[str, float], reason: str = "") -> None:
        run_id = self._trial_runs.pop(trial_id)
        metrics = [Metric(k, float(v), _now_ms(), 0) for k, v in summary.items() if v is not None]
        tags = [mlflow.entities.RunTag("failure_reason", reason[:5000])] if reason else []
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def end_open_trials(self, status: str) -> None:
        """End trial runs left open by an interruption (`KILLED`) or a crash (`FAILED`)."""
        for run_id in self._trial_runs.values():
            self.client.set_terminated(run_id, status)
        self._trial_runs.clear()

    # --- registry -------------------------------------------------------------
    def register_if_better(self, model, test_accuracy: float, threshold: float, model_name: str, alias: str) -> RegistryDecision:
        """Register `model` if it clears `threshold`; move `alias` to it unless the champion is better."""
        if test_accuracy < threshold:
            return self._decided(RegistryDecision(False, f"not registered: test_accuracy {test_accuracy:.4f} < threshold {threshold:.4f}"))
        import mlflow.keras  # noqa: PLC0415 - loads TensorFlow glue only when a model is logged

        info = mlflow.keras.log_model(
            model,
            name="model",
            signature=MODEL_SIGNATURE,
            pip_requirements=list(MODEL_REQUIREMENTS),
            registered_model_name=model_name,
        )
        version = str(info.registered_model_version)
        self.client.set_model_version_tag(model_name, version, "test_accuracy", f"{test_accuracy:.6f}")
        self.client.set_model_version_tag(model_name, version, "search_run_id", self.run_id)
        champion_accuracy = self._alias_accuracy(model_name, alias)
        if champion_accuracy is not None and champion_accuracy > test_accuracy:
            return self._decided(
                RegistryDecision(True, f"registered {model_name} version {version}; {alias} stays (test_accuracy {champion_accuracy:.4f} > {test_accuracy:.4f})", version)
            )
        self.client.set_registered_model_alias(model_name, alias, version)
        return self._decided(RegistryDecision(True, f"registered {model_name} version {version} as @{alias} (test_accuracy {test_accuracy:.4f})", version, True))

    def _alias_accuracy(self, model_name: str, alias: str) -> float | None:
        try:
            current = self.client.get_model_version_by_alias(model_name, alias)
        except mlflow.exceptions.MlflowException:
            return None  # no champion yet
        return float(current.tags.get("test_accuracy", "nan"))

    def _decided(self, decision: RegistryDecision) -> RegistryDecision:
        self.set_tag("registry_decision", decision.reason)
        return decision


@contextlib.contextmanager
def search_run(experiment_name: str) -> Iterator[SearchTracker]:
    """The parent run of a search; ended FINISHED, KILLED on Ctrl-C, FAILED on an error."""
    if "MLFLOW_RUN_ID" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment_name))
    parent = mlflow.start_run()
    tracker = SearchTracker(parent)
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end_open_trials("KILLED")
        mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        tracker.end_open_trials("FAILED")
        mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    mlflow.end_run()


def config_params(config: object) -> dict[str, object]:
    """The resolved config as flat params `config.<field>` (sequences joined by commas).

    Prefixed because `mlflow run` has already logged the raw entry-point
    parameters (blank = "the profile's") under the plain names, and MLflow
    params cannot change.
    """
    return {f"config.{k}": ",".join(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _now_ms() -> int:
    return int(time.time() * 1000)
