"""The MLflow adapter: every MLflow call of the project (the parent run, one nested run
per trial, logged models, the registry's primitives); it imports nothing of the project,
and what to register is search/registry.py's decision.

The parent run is the one `mlflow run` started (it passes MLFLOW_RUN_ID, which
the first `mlflow.start_run()` adopts); outside `mlflow run` it is a new run.
Trial runs are created with the client, not the fluent API, so they never
become the process's active run and can be ended from any hook.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Iterator, Mapping

import mlflow
import numpy as np
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema, TensorSpec
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_PARENT_RUN_ID

# What the logged model needs to be loaded and served; given explicitly
# because inferring it costs seconds per call.
MODEL_REQUIREMENTS = tuple(f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "tensorflow", "keras"))
# The Keras model's own tensors (mlflow.keras.save_model requires an input schema).
KERAS_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1), "digits")]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities")]),
)
# The registered model's pyfunc (search/serving/pyfunc_model.py): its input is left open, as it takes
# (N, 28, 28), (N, 28, 28, 1) or (N, 784) digits, integers 0..255 or floats 0..1.
MODEL_SIGNATURE = ModelSignature(
    inputs=None,
    outputs=Schema([ColSpec("long", "digit"), *(ColSpec("float", f"probability_{d}") for d in range(10))]),
)
COMMAND_TAG = "command"  # of a parent run: search (resumable) or evaluate
EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
# Waits between retries while another process holds the sqlite write lock
# (MLflow already waits 20 s inside each attempt).
LOCK_RETRY_DELAYS_S = (0.5, 1, 2, 4, 8)
# The reachability probe gives up within ~30 s rather than MLflow's minutes of retries.
KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"  # where keras.datasets.mnist reads
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# During a search, MLflow's own HTTP retries give up within seconds (not its default
# minutes of silence), so that the search's own wait, which says so, takes over.
SEARCH_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
SERVER_RETRY_DELAY_S = 3  # between attempts while the tracking server does not answer


class TrackingError(RuntimeError):
    """The tracking store cannot be used, or the run asked for cannot be resumed."""


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering mid-search for longer than the search waits."""


class _ServerWait:
    """How long calls wait for a tracking server that stops answering, saying so once per
    outage; after one outage outlasts `limit_s`, later calls fail at once."""

    limit_s = 600.0
    gave_up = False

    def wait(self, since: float | None) -> float:
        """Sleep before the next attempt of a call that found the server gone at `since`
        (None: just now); raise TrackingUnavailable when the limit is reached."""
        now = time.monotonic()
        if since is None and not self.gave_up:
            print(
                f"tracking server {mlflow.get_tracking_uri()} does not answer: waiting up to {self.limit_s:.0f} s for it",
                file=sys.stderr,
                flush=True,
            )
            since = now
        if self.gave_up or now - since >= self.limit_s:
            self.gave_up = True
            raise TrackingUnavailable(f"tracking server {mlflow.get_tracking_uri()} did not answer for {self.limit_s:.0f} s")
        time.sleep(SERVER_RETRY_DELAY_S)
        return since

    @staticmethod
    def back(since: float) -> None:
        print(f"tracking server answers again after {time.monotonic() - since:.0f} s", file=sys.stderr, flush=True)


SERVER = _ServerWait()


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

    def end_trial(self, trial_id: str, failed: bool, summary: Mapping[str, float], reason: str = "", pruned: int | None = None) -> None:
        """End the trial's run FINISHED (tag `pruned` = epochs trained when the median rule stopped it) or FAILED."""
        metrics = [Metric(k, float(v), _now_ms(), 0) for k, v in summary.items() if v is not None]
        tags = [mlflow.entities.RunTag("failure_reason", reason[:5000])] if reason else []
        tags += [mlflow.entities.RunTag("pruned", str(pruned))] if pruned else []
        run_id = self._trial_runs.pop(trial_id)
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")

    def trial_records(self) -> list[dict]:
        """Every trial run of this search as logged: trial_id, status, hyperparameters,
        val_accuracy (best), param_count, multiply_adds, wall_time_s, pruned, epochs_saved
        and the val_accuracy curve [(epoch, value)]."""
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
                    "wall_time_s": run.data.metrics.get("wall_time_s"),
                    "pruned": int(run.data.tags["pruned"]) if "pruned" in run.data.tags else None,
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
        self, keras_model, loader: Path, loader_module: str, files: Mapping[str, bytes], card: str, loader_config: Mapping[str, str]
    ) -> str:
        """Log `keras_model` as an MLflow logged model of this run, named `model`: MLflow's
        keras flavor, and a pyfunc flavor served by `loader` (a module shipped with the
        model as `code/<loader_module>.py`, reading `files` under `data/`, configured by
        `loader_config`, which `load_model(..., model_config=)` can override); `card`
        beside it as `model_card.md`. MLflow links the run's metrics of step 0 (the
        test and robustness metrics) to it. Returns its `models:/` URI."""
        info = _patient(Model.log)(
            artifact_path=None,
            name="model",
            flavor=_KerasWithPyfunc,
            run_id=self.run_id,
            keras_model=keras_model,
            loader=loader,
            loader_module=loader_module,
            files=files,
            card=card,
            loader_config=loader_config,
        )
        return info.model_uri

    def register(self, model_uri: str, name: str) -> str:
        """A new version of registered model `name` from `model_uri`; its version number."""
        return str(_patient(mlflow.register_model)(model_uri, name).version)

    def tag_version(self, name: str, version: str, tags: Mapping[str, str], description: str = "") -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)
        if description:
            self.client.update_model_version(name, version, description=description)

    def alias_version(self, name: str, alias: str) -> str | None:
        """The version `alias` of model `name` points to, or None (no such model or alias)."""
        try:
            return str(self.client.get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException:
            return None

    def registered_version(self, name: str) -> str | None:
        """The version of model `name` this search run registered already (a search
        stopped after registering), or None."""
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        return str(min(int(v.version) for v in versions)) if versions else None

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)


class _KerasWithPyfunc:
    """A flavor for `mlflow.models.Model.log`: MLflow's keras flavor (float32, for
    `mlflow.keras.load_model`), with a pyfunc flavor whose loader module is shipped with the model."""

    @staticmethod
    def save_model(
        path,
        mlflow_model: Model,
        keras_model,
        loader: Path,
        loader_module: str,
        files: Mapping[str, bytes],
        card: str,
        loader_config: Mapping[str, str],
    ) -> None:
        import mlflow.keras  # noqa: PLC0415 - TensorFlow glue only when a model is logged

        mlflow.keras.save_model(
            keras_model, path, mlflow_model=mlflow_model, signature=KERAS_SIGNATURE, pip_requirements=list(MODEL_REQUIREMENTS)
        )
        folder = Path(path)
        for name, content in files.items():
            (folder / "data" / name).write_bytes(content)
        (folder / "code").mkdir()
        shutil.copy(loader, folder / "code" / f"{loader_module}.py")
        if card:
            (folder / "model_card.md").write_text(card)
        keras_env = mlflow_model.flavors["python_function"]["env"]
        mlflow.pyfunc.add_to_model(
            mlflow_model,
            loader_module=loader_module,
            code="code",
            data="data",
            conda_env=keras_env["conda"],
            python_env=keras_env["virtualenv"],
            model_config=dict(loader_config),
        )
        mlflow_model.signature = MODEL_SIGNATURE
        mlflow_model.save(str(folder / "MLmodel"))


@contextlib.contextmanager
def tracked_run(
    experiment_name: str, resume_run_id: str = "", server_wait_s: float = SERVER.limit_s, command: str = "search"
) -> Iterator[SearchTracker]:
    """The parent run of a search (tag `command`: what made it); ended FINISHED, KILLED on
    Ctrl-C or SIGTERM, FAILED on an error.

    With `resume_run_id` the search's existing parent run is reopened, and trial
    runs a killed process left RUNNING are marked KILLED. A tracking server that
    stops answering is waited for up to `server_wait_s`, then the search stops
    with TrackingUnavailable, its runs left for resume to mark.
    """
    check_reachable()
    for key, value in SEARCH_HTTP_ENV.items():
        os.environ.setdefault(key, value)
    SERVER.limit_s, SERVER.gave_up = server_wait_s, False
    if resume_run_id:
        parent = _patient(mlflow.start_run)(run_id=resume_run_id)
    else:
        if "MLFLOW_RUN_ID" not in os.environ and "MLFLOW_EXPERIMENT_ID" not in os.environ:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment_name))
        parent = _patient(mlflow.start_run)(tags={COMMAND_TAG: command})
    tracker = SearchTracker(parent)
    end_run = _patient(mlflow.end_run)
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
        end_run(RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        tracker.end_open_trials("FAILED")
        end_run(RunStatus.to_string(RunStatus.FAILED))
        raise
    end_run()


def attach(parent_run_id: str, trial_tags: Mapping[str, str]) -> SearchTracker:
    """Another process's tracker of search run `parent_run_id` (a Ray task): it logs
    trial runs under it, tagged `trial_tags`, without becoming that run's owner."""
    check_reachable()
    return SearchTracker(PatientClient().get_run(parent_run_id), trial_tags)


def tracking_uri() -> str:
    """This process's tracking URI, as another process started elsewhere must be given it
    (a relative sqlite path made absolute)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    return uri


def load_keras_model(model_uri: str):
    """The Keras model at `model_uri` (e.g. `models:/mnist-cnn@champion`), loaded with Keras' safe mode."""
    import mlflow.keras  # noqa: PLC0415 - TensorFlow glue only when a model is loaded

    return _load(mlflow.keras.load_model, model_uri)


def load_pyfunc_model(model_uri: str):
    """The model at `model_uri` as MLflow's generic pyfunc, as a serving process loads it."""
    return _load(mlflow.pyfunc.load_model, model_uri)


def _load(loader, model_uri: str):
    check_reachable()
    try:
        return loader(model_uri)
    except Exception as err:  # MLflow raises several types for a missing model or alias
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrackingError(f"cannot load model {model_uri!r}: {first_line[:300]}") from None


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


def end_run(run_id: str, status: str) -> None:
    """End run `run_id` with `status` (e.g. KILLED), from any process."""
    PatientClient().set_terminated(run_id, status)


def check_reachable() -> None:
    """Fail fast, with one clear error, if the tracking store cannot be reached."""
    saved = {k: os.environ.get(k) for k in PROBE_ENV}
    os.environ.update({k: os.environ.get(k) or v for k, v in PROBE_ENV.items()})
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as err:
        text = str(err)
        for code, what in (("401", "refused the credentials"), ("403", "refused this user")):
            if f"error code {code} " in text:
                raise TrackingError(
                    f"tracking server {mlflow.get_tracking_uri()} {what} (HTTP {code}): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
                ) from None
        reason = (
            "no connection"
            if "Max retries exceeded" in text or "Connection" in text
            else (text.strip().splitlines() or [type(err).__name__])[0][:200]
        )
        raise TrackingError(f"tracking store {mlflow.get_tracking_uri()} is unreachable ({reason})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class PatientClient:
    """`MlflowClient` whose calls wait and retry while another process holds the sqlite lock,
    so two searches sharing one sqlite store lose no metric."""

    def __init__(self) -> None:
        self._client = mlflow.MlflowClient()

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        return _patient(attribute) if callable(attribute) else attribute


def _patient(call):
    """`call`, retried while another process holds the sqlite lock and while the tracking
    server does not answer (SERVER says how long)."""

    def patient_call(*args, **kwargs):
        lock_delays, server_gone_since = iter(LOCK_RETRY_DELAYS_S), None
        while True:
            try:
                result = call(*args, **kwargs)
            except Exception as err:
                if "database is locked" in str(err) and (delay := next(lock_delays, None)) is not None:
                    time.sleep(delay)
                elif _server_gone(err):
                    server_gone_since = SERVER.wait(server_gone_since)
                else:
                    raise
                continue
            if server_gone_since is not None:
                SERVER.back(server_gone_since)
            return result

    return patient_call


def _server_gone(err: Exception) -> bool:
    """Whether `err` says the tracking server could not be reached (refused, reset, or
    answering 5xx while it starts), not that it refused the request."""
    import requests  # noqa: PLC0415 - installed with MLflow, which raises its errors

    text = str(err)
    return isinstance(err, requests.exceptions.ConnectionError) or "Max retries exceeded" in text or "Connection aborted" in text


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
