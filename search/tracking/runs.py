"""Runs: the search's parent run, one nested run per trial, the registry's primitives, and
reading a run back for resume.

The parent run is the one `mlflow run` started (it passes MLFLOW_RUN_ID, which
the first `mlflow.start_run()` adopts); outside `mlflow run` it is a new run.
Trial runs are created with the client, not the fluent API, so they never
become the process's active run and can be ended from any hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, Mapping

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

from .models import log_keras_with_pyfunc
from .store import DEFAULT_SERVER_WAIT_S, PatientClient, TrackingError, TrackingUnavailable, check_reachable, patient, wait_for_server

KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"  # where keras.datasets.mnist reads
COMMAND_TAG = "command"  # of a parent run: search (resumable) or evaluate
MAX_DESCRIPTION = 5000  # characters of a model version's description (MLflow's column)
DESCRIPTION_CUT = "\n\n(The rest: `model_card.md` among the model's files.)\n"
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy", "val_heldout_accuracy")


class SearchTracker:
    """The search's parent run and the open trial runs under it."""

    def __init__(self, parent: mlflow.entities.Run, trial_tags: Mapping[str, str] | None = None):
        self.client = PatientClient()
        self.run_id = parent.info.run_id
        self.experiment_id = parent.info.experiment_id
        self.trial_tags = dict(trial_tags or {})  # of every trial run, e.g. the Ray node it ran on
        self.trials_logged = 0
        self._trial_runs: dict[str, str] = {}  # trial id -> open child run id
        self._dataset: DatasetInput | None = None  # the data, logged as each trial run's input too

    # --- parent run ---------------------------------------------------------
    def log_params(self, params: Mapping[str, object]) -> None:
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = _now_ms()
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_dataset(self, name: str, digest: str, source: str) -> None:
        """The data as an MLflow dataset input (name, digest, source) of the search run and,
        from now on, of every trial run: the UI's Dataset column."""
        self._dataset = _dataset_input(name, digest, source)
        self.client.log_inputs(self.run_id, datasets=[self._dataset])

    def metric(self, key: str) -> float | None:
        """The parent run's latest value of metric `key`, or None."""
        return self.client.get_run(self.run_id).data.metrics.get(key)

    def history(self, key: str) -> list[tuple[int, float]]:
        """The parent run's metric `key` as [(step, value)], by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_artifacts(self, folder: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_dir)

    # --- one nested run per trial ---------------------------------------------
    # Trial calls are synchronous: a few per epoch, each a small fraction of the epoch
    # (benchmarks: tracking overhead), and an error stops the search where it happened.
    def start_trial(self, trial_id: str, hyperparameters: Mapping[str, object]) -> None:
        tags = {MLFLOW_PARENT_RUN_ID: self.run_id, "trial_id": trial_id, **self.trial_tags}
        run = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_id}", tags=tags)
        self._trial_runs[trial_id] = run.info.run_id
        self.trials_logged += 1
        self.client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in hyperparameters.items()])
        if self._dataset is not None:
            self.client.log_inputs(run.info.run_id, datasets=[self._dataset])

    def log_epoch(self, trial_id: str, epoch: int, logs: Mapping[str, float]) -> None:
        now = _now_ms()
        metrics = [Metric(k, float(logs[k]), now, epoch) for k in EPOCH_METRICS if k in logs]
        self.client.log_batch(self._trial_runs[trial_id], metrics=metrics)

    def end_trial(
        self, trial_id: str, failed: bool, summary: Mapping[str, float], reason: str = "", pruned: int | None = None, cut: str = ""
    ) -> None:
        """End the trial's run FINISHED (tag `pruned` = epochs trained when the median rule stopped it;
        tag `cut` = why it was stopped as too costly to win) or FAILED."""
        metrics = [Metric(k, float(v), _now_ms(), 0) for k, v in summary.items() if v is not None]
        tags = [mlflow.entities.RunTag("failure_reason", reason[:5000])] if reason else []
        tags += [mlflow.entities.RunTag("pruned", str(pruned))] if pruned else []
        tags += [mlflow.entities.RunTag("cut", cut[:5000])] if cut else []
        run_id = self._trial_runs.pop(trial_id)
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def trial_records(self) -> list[dict]:
        """Every trial run of this search as logged: trial_id, status, hyperparameters,
        val_accuracy (best), param_count, multiply_adds, seconds_per_image (training, measured),
        wall_time_s, pruned, cut (why, or ""), epochs_saved and the val_accuracy curve [(epoch, value)]."""
        runs = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}'", max_results=10_000)
        records = []
        for run in runs:
            curve = self.client.get_metric_history(run.info.run_id, "val_accuracy")
            records.append(
                {
                    "trial_id": run.data.tags.get("trial_id", ""),
                    "status": run.info.status,
                    "hyperparameters": run.data.params,
                    "val_accuracy": run.data.metrics.get("best_val_accuracy"),
                    "param_count": run.data.metrics.get("param_count"),
                    "multiply_adds": run.data.metrics.get("multiply_adds"),
                    "seconds_per_image": run.data.metrics.get("train_seconds_per_image"),
                    "wall_time_s": run.data.metrics.get("wall_time_s"),
                    "pruned": int(run.data.tags["pruned"]) if "pruned" in run.data.tags else None,
                    "cut": run.data.tags.get("cut", ""),
                    "epochs_saved": run.data.metrics.get("epochs_saved"),
                    "curve": sorted((m.step, m.value) for m in curve),
                }
            )
        return sorted(records, key=lambda r: r["trial_id"])

    def artifact_uri(self, path: str = "") -> str:
        root = self.client.get_run(self.run_id).info.artifact_uri
        return f"{root}/{path}" if path else root

    def end_orphaned_trials(self) -> int:
        """Mark KILLED the trial runs a killed process left RUNNING; how many there were."""
        orphans = self.client.search_runs(
            [self.experiment_id], f"tags.mlflow.parentRunId = '{self.run_id}' and attributes.status = 'RUNNING'"
        )
        for run in orphans:
            self.client.set_terminated(run.info.run_id, "KILLED")
        return len(orphans)

    def end_trial_runs(self, trial_id: str, status: str, reason: str, finished_too: bool = False) -> int:
        """End the RUNNING runs of trial `trial_id` (another process's, e.g. a dead
        worker's) with `status` and a `failure_reason`; with `finished_too`, its FINISHED
        runs as well (a result the search never recorded, so the trial runs again); how many."""
        query = f"tags.mlflow.parentRunId = '{self.run_id}' and tags.trial_id = '{trial_id}'"
        ended = ("RUNNING", "FINISHED") if finished_too else ("RUNNING",)
        runs = [run for run in self.client.search_runs([self.experiment_id], query) if run.info.status in ended]
        for run in runs:
            self.client.set_tag(run.info.run_id, "failure_reason", reason)
            self.client.set_terminated(run.info.run_id, status)
        return len(runs)

    def end_open_trials(self, status: str) -> None:
        """End trial runs left open by an interruption (`KILLED`) or a crash (`FAILED`)."""
        for run_id in self._trial_runs.values():
            self.client.set_terminated(run_id, status)
        self._trial_runs.clear()

    # --- models and the registry ---------------------------------------------
    def log_model(
        self,
        keras_model,
        code: Mapping[str, Path],
        loader_module: str,
        files: Mapping[str, bytes],
        card: str,
        loader_config: Mapping[str, str],
    ) -> str:
        """`keras_model` logged as this run's model `model` (models.log_keras_with_pyfunc); its `models:/` URI."""
        return log_keras_with_pyfunc(self.run_id, keras_model, code, loader_module, files, card, loader_config)

    def register(self, model_uri: str, name: str) -> str:
        """A new version of registered model `name` from `model_uri`; its version number."""
        return str(patient(mlflow.register_model, find=lambda: self._version_of_this_run(name))(model_uri, name).version)

    def tag_version(self, name: str, version: str, tags: Mapping[str, str], description: str = "") -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        if description:
            self.client.update_model_version(name, version, description=fit_description(description))

    def version_tag(self, name: str, version: str, key: str) -> str | None:
        """Tag `key` of version `version` of model `name`, or None."""
        return self.client.get_model_version(name, version).tags.get(key)

    def version_description(self, name: str, version: str) -> str:
        """The description of version `version` of model `name` (its model card)."""
        return self.client.get_model_version(name, version).description or ""

    def version_run_file(self, name: str, version: str, path: str) -> bytes | None:
        """The artifact `path` of the run that logged version `version` of model `name`, or
        None where that run has no such file."""
        run_id = self.client.get_model_version(name, version).run_id
        if not run_id:
            return None
        with tempfile.TemporaryDirectory() as folder:
            try:
                return Path(self.client.download_artifacts(run_id, path, folder)).read_bytes()
            except (mlflow.exceptions.MlflowException, OSError):
                return None

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` of model `name` points to, or None (no such model or alias)."""
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException:
            return None

    def registered_version(self, name: str) -> str | None:
        """The version of model `name` this search run registered already (a search
        stopped after registering), or None."""
        version = self._version_of_this_run(name)
        return str(version.version) if version else None

    def _version_of_this_run(self, name: str) -> mlflow.entities.model_registry.ModelVersion | None:
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        return min(versions, key=lambda v: int(v.version)) if versions else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


def fit_description(text: str) -> str:
    """`text` as a version's description: MLflow's stores hold at most MAX_DESCRIPTION
    characters (PostgreSQL refuses more), so a longer text is cut at a line and says where
    the whole is."""
    if len(text) <= MAX_DESCRIPTION:
        return text
    kept = text[: MAX_DESCRIPTION - len(DESCRIPTION_CUT)].rsplit("\n", 1)[0]
    return kept + DESCRIPTION_CUT


@contextlib.contextmanager
def tracked_run(
    experiment_name: str, resume_run_id: str = "", server_wait_s: float = DEFAULT_SERVER_WAIT_S, command: str = "search"
) -> Iterator[SearchTracker]:
    """The parent run of a search (tag `command`: what made it); ended FINISHED, KILLED on
    Ctrl-C or SIGTERM, FAILED on an error.

    With `resume_run_id` the search's existing parent run is reopened, and trial
    runs a killed process left RUNNING are marked KILLED. A tracking server that
    stops answering is waited for up to `server_wait_s`, then the search stops
    with TrackingUnavailable, its runs left for resume to mark.
    """
    check_reachable()
    wait_for_server(server_wait_s)
    if resume_run_id:
        parent = patient(mlflow.start_run)(run_id=resume_run_id)
    elif "MLFLOW_RUN_ID" in os.environ:  # the run `mlflow run` made
        parent = patient(mlflow.start_run)(tags={COMMAND_TAG: command})
    else:
        parent = _start_new_run(experiment_name, {COMMAND_TAG: command})
    tracker = SearchTracker(parent)
    try:
        if resume_run_id:
            tracker.end_orphaned_trials()
        yield tracker
    except TrackingUnavailable as err:
        with contextlib.suppress(Exception):  # off the active-run stack, or MLflow ends it FINISHED at exit
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
        raise TrackingUnavailable(
            f"{err}: the search stopped; once it is back, continue with `python -m search resume {tracker.run_id}`"
        ) from None
    except KeyboardInterrupt:
        tracker.end_open_trials("KILLED")
        _end_parent(tracker, "KILLED")
        raise
    except BaseException:
        tracker.end_open_trials("FAILED")
        _end_parent(tracker, "FAILED")
        raise
    _end_parent(tracker, "FINISHED")


def _start_new_run(experiment_name: str, tags: Mapping[str, str]) -> mlflow.ActiveRun:
    """A new parent run, made the process's active run; created once even when the answer
    to a creation is lost (PatientClient.create_run), as is its experiment."""
    experiment_id = (
        os.environ.get("MLFLOW_EXPERIMENT_ID")
        or patient(mlflow.set_experiment)(os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment_name)).experiment_id
    )
    run = PatientClient().create_run(experiment_id, tags=resolve_tags(tags))
    return patient(mlflow.start_run)(run_id=run.info.run_id)


def _end_parent(tracker: SearchTracker, status: str) -> None:
    """End the search run with `status`, waiting out a server that does not answer.
    MLflow's `end_run` forgets the active run before it sets the status, so a retry of
    it would do nothing: the status is set by the (patient) client first."""
    tracker.client.set_terminated(tracker.run_id, status)
    with contextlib.suppress(Exception):  # off MLflow's active-run stack; the status is set already
        mlflow.end_run(status)


def attach(parent_run_id: str, trial_tags: Mapping[str, str], server_wait_s: float = DEFAULT_SERVER_WAIT_S) -> SearchTracker:
    """Another process's tracker of search run `parent_run_id` (a Ray task): it logs
    trial runs under it, tagged `trial_tags`, without becoming that run's owner, and
    waits for a server that stops answering as the search's own process does."""
    wait_for_server(server_wait_s)
    return SearchTracker(PatientClient().get_run(parent_run_id), trial_tags)


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What resume reads of a run: its params, tags and experiment's name."""

    params: dict[str, str]
    tags: dict[str, str]
    experiment: str


def run_record(run_id: str) -> RunRecord:
    """Run `run_id` as logged, from any process; TrackingError if there is none."""
    check_reachable()
    client = PatientClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise TrackingError(f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()}") from None
    return RunRecord(dict(run.data.params), dict(run.data.tags), client.get_experiment(run.info.experiment_id).name)


def _dataset_input(name: str, digest: str, source: str) -> DatasetInput:
    """A dataset input for training, of `source`: a local file, else what Keras downloads."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source  # noqa: PLC0415
    from mlflow.data.http_dataset_source import HTTPDatasetSource  # noqa: PLC0415
    from mlflow.data.meta_dataset import MetaDataset  # noqa: PLC0415

    if Path(source).is_file():
        with warnings.catch_warnings():  # two registered sources both read local files: either will do
            warnings.simplefilter("ignore", UserWarning)
            origin = resolve_dataset_source(str(Path(source).resolve()))
    else:
        origin = HTTPDatasetSource(KERAS_MNIST_URL)
    dataset = MetaDataset(source=origin, name=name, digest=digest[:16])
    return DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])


def _now_ms() -> int:
    return int(time.time() * 1000)
