"""Tracking tests on a real Keras Tuner search and a real sqlite MLflow store (no mocks)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import keras_tuner as kt
import mlflow
import pytest

from experiments import TUNERS, resolve
from model_zoo import PlainCNN, make_cnn
from search import interrupts, tracking
from search.data import Split
from search.driver import drive
from search.hyperparameters import active_values
from search.in_process import InProcess
from search.pipeline import SearchFailed, run_search
from search.tuner import make_tuner
from tests.helpers import MLFLOW_RUN_ENV, REPO, SMALL_SEARCH, free_port, mlflow_listening, mnist_subset


class FailsOnSecondTrial(kt.HyperModel):
    """PlainCNN that cannot build the second configuration it is asked for: a trial that raises."""

    def __init__(self):
        super().__init__()
        self.configurations = None  # counting starts once the tuner has read the space

    def build(self, hp):
        if self.configurations is not None:
            configuration = sorted(hp.values.items())
            if configuration not in self.configurations:
                self.configurations.append(configuration)
            if self.configurations.index(configuration) == 1:
                raise ValueError("cannot build this one")
        return PlainCNN().build(hp)


@pytest.fixture(scope="module")
def small_mnist(mnist):
    data = mnist
    return data.train.x[:600], data.train.y[:600], data.validation.x[:300], data.validation.y[:300]


def run_tiny_search(tmp_path, small_mnist, hypermodel, max_trials=3, tuner="random"):
    # These hypermodels have spaces of their own: none of the smoke profile's pins.
    config = dataclasses.replace(resolve("smoke", max_trials=max_trials, max_epochs=2, tuner=tuner), fixed=())
    x, y, xv, yv = small_mnist
    with tracking.tracked_run("tiny") as tracker:
        tuner = make_tuner(config, tracker, tmp_path / "tuner", "tiny", hypermodel=hypermodel)
        if isinstance(hypermodel, FailsOnSecondTrial):
            hypermodel.configurations = []
        drive(tuner, InProcess(config), config, Split(x, y), Split(xv, yv))
    return tracker.run_id, tuner


def child_runs(parent_id):
    return mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'", output_format="list")


def test_one_nested_run_per_trial_with_hyperparameters_and_epoch_metrics(tracking_store, tmp_path, small_mnist):
    parent_id, tuner = run_tiny_search(tmp_path, small_mnist, PlainCNN(), max_trials=2)
    children = {run.data.tags["trial_id"]: run for run in child_runs(parent_id)}
    assert set(children) == set(tuner.oracle.trials)
    assert mlflow.get_run(parent_id).info.status == "FINISHED"
    client = mlflow.MlflowClient()
    for trial_id, run in children.items():
        trial = tuner.oracle.trials[trial_id]
        assert run.info.run_name == f"trial-{trial_id}"
        assert run.info.status == "FINISHED"
        assert run.data.params == {k: str(v) for k, v in active_values(trial.hyperparameters).items()}
        for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [0, 1]
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.score)
        assert run.data.metrics["param_count"] > 1000
        assert run.data.metrics["wall_time_s"] > 0


@pytest.mark.parametrize("tuner", TUNERS)
def test_every_tuner_the_settings_name_runs_a_tracked_search(tracking_store, tmp_path, small_mnist, tuner):
    parent_id, keras_tuner = run_tiny_search(tmp_path, small_mnist, PlainCNN(), max_trials=2, tuner=tuner)
    assert type(keras_tuner).__name__ == "Tracked" + TUNERS[tuner]
    assert mlflow.get_run(parent_id).info.status == "FINISHED"
    runs = child_runs(parent_id)
    assert runs and {run.info.status for run in runs} == {"FINISHED"}
    assert {run.data.tags["trial_id"] for run in runs} == set(keras_tuner.oracle.trials)


def test_a_trial_that_raises_is_a_failed_run_with_its_reason(tracking_store, tmp_path, small_mnist):
    parent_id, tuner = run_tiny_search(tmp_path, small_mnist, FailsOnSecondTrial())
    statuses = sorted((run.data.tags["trial_id"], run.info.status, run.data.tags.get("failure_reason")) for run in child_runs(parent_id))
    assert [s[1] for s in statuses] == ["FINISHED", "FAILED", "FINISHED"]
    assert statuses[1][2] == "ValueError: cannot build this one"
    assert "RUNNING" not in {r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


@pytest.mark.parametrize("interrupt, status", [(KeyboardInterrupt, "KILLED"), (RuntimeError, "FAILED")])
def test_interrupted_search_ends_parent_and_open_trial(tracking_store, interrupt, status):
    with pytest.raises(interrupt):
        with tracking.tracked_run("interrupted") as tracker:
            tracker.start_trial("0", {"units": 8})
            raise interrupt()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.status for r in runs) == [status, status]


class InterruptTurnedIntoTypeError(kt.HyperModel):
    """Ctrl-C during a trial, re-raised by TensorFlow as another exception (seen in
    CI: a TypeError out of convert_to_tensor)."""

    def build(self, hp):
        return PlainCNN().build(hp)

    def fit(self, hp, model, *args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises KeyboardInterrupt here
        except KeyboardInterrupt:
            raise TypeError("Failed to convert elements of (None,) to Tensor.") from None
        raise AssertionError("SIGINT did not arrive")


def test_an_interrupt_that_tensorflow_turned_into_another_error_is_still_an_interrupt(tracking_store, tmp_path, small_mnist):
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    interrupts.install()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_tiny_search(tmp_path, small_mnist, InterruptTurnedIntoTypeError())
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        interrupts.clear()
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]  # the parent and its one open trial, not FAILED


def test_parent_adopts_the_run_that_mlflow_run_started(tracking_store, monkeypatch):
    started = mlflow.MlflowClient().create_run(mlflow.create_experiment("projects"))
    monkeypatch.setenv("MLFLOW_RUN_ID", started.info.run_id)
    with tracking.tracked_run("ignored") as tracker:
        assert tracker.run_id == started.info.run_id
    assert mlflow.get_run(started.info.run_id).info.status == "FINISHED"


class NaNLoss(kt.HyperModel):
    """A model whose loss is NaN from the first batch: a diverged trial."""

    def build(self, hp):
        model = make_cnn(conv_filters=(4,), learning_rate=hp.Float("learning_rate", 1e-3, 1e-2))
        model.compile(optimizer="adam", loss=lambda y, p: keras.ops.mean(p) * float("nan"), metrics=["accuracy"])
        return model


class NeverTrains(kt.HyperModel):
    """Builds (so Keras Tuner can read its space) but every trial raises."""

    def build(self, hp):
        return make_cnn(conv_filters=(hp.Int("filters", 4, 8),))

    def fit(self, hp, model, *args, **kwargs):
        raise ValueError("cannot train")


def test_a_trial_whose_loss_goes_nan_is_failed(tracking_store, tmp_path, small_mnist):
    parent_id, _ = run_tiny_search(tmp_path, small_mnist, NaNLoss(), max_trials=2)
    children = child_runs(parent_id)
    assert len(children) == 2
    for run in children:
        assert run.info.status == "FAILED"
        assert run.data.tags["failure_reason"] == "FailedTrialError: loss became NaN after 1 epoch(s)"  # TerminateOnNaN


def test_when_every_trial_fails_the_search_fails(tracking_store, tmp_path, mnist_npz):
    digits = mnist_subset(tmp_path / "digits.npz", mnist_npz, n_train=1_200, n_test=200)
    config = dataclasses.replace(resolve("smoke", data=str(digits), precision="float32", validation_size=200), fixed=())
    with pytest.raises(SearchFailed, match="3 trials failed in a row, the last with: ValueError: cannot train"):
        run_search(config, verbose=0, hypermodel=NeverTrains())
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert sorted(r.info.status for r in runs) == ["FAILED"] * 4  # the parent and its 3 trials


def test_a_failed_logging_call_is_raised_where_it_happens_and_fails_the_run(tracking_store):
    with pytest.raises(KeyError):
        with tracking.tracked_run("failing") as tracker:
            tracker.log_epoch("no-such-trial", 0, {"loss": 1.0})
    assert [r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")] == ["FAILED"]


def test_another_process_logs_tagged_trials_under_the_search_and_the_search_ends_a_lost_one(tracking_store):
    with tracking.tracked_run("scale-out") as search:
        task = tracking.attach(search.run_id, {"ray_node": "10.0.0.7"})
        task.start_trial("7", {"units": 8})
        assert search.end_trial_runs("7", "KILLED", "its Ray worker or node died; Ray ran the trial again") == 1
        assert search.end_trial_runs("7", "KILLED", "again") == 0  # only RUNNING runs
    [trial] = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list") if "trial_id" in r.data.tags]
    assert trial.data.tags["mlflow.parentRunId"] == search.run_id
    assert trial.data.tags["ray_node"] == "10.0.0.7"
    assert trial.info.status == "KILLED"
    assert trial.data.tags["failure_reason"] == "its Ray worker or node died; Ray ran the trial again"


def test_a_finished_run_whose_result_the_search_never_recorded_can_be_ended_too(tracking_store):
    with tracking.tracked_run("resumed") as search:
        search.start_trial("3", {"units": 8})
        search.end_trial("3", False, {"best_val_accuracy": 0.9})
        assert search.end_trial_runs("3", "KILLED", "ran again") == 0  # FINISHED is left alone by default
        assert search.end_trial_runs("3", "KILLED", "ran again", finished_too=True) == 1
    [trial] = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list") if "trial_id" in r.data.tags]
    assert (trial.info.status, trial.data.tags["failure_reason"]) == ("KILLED", "ran again")


RACE_TO_LOG_A_DATASET = """
import sys, time
from search import tracking
start, experiment, rounds = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import mlflow
mlflow.set_experiment(experiment)
with tracking.tracked_run("racer") as search:
    for i in range(rounds):
        time.sleep(max(0.0, start + i - time.time()))
        search.log_dataset("mnist", f"digest-{i}", "mnist.npz")
"""


def test_searches_logging_the_same_new_dataset_at_once_all_log_it(tracking_store):
    """Two sqlite writers that both miss the new dataset row and both insert it: the loser's
    insert breaks the unique constraint, and its retry finds the winner's row."""
    os.environ.pop("MLFLOW_RUN_ID", None)
    # Made here: racers that both create it would race in mlflow.set_experiment, whose loser
    # returns the experiment without making it the active one.
    mlflow.MlflowClient().create_experiment("racing")
    start, racers, rounds = time.time() + 15, 4, 5
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_TO_LOG_A_DATASET, str(start), "racing", str(rounds)],
            cwd=REPO,
            env={**os.environ, "MLFLOW_TRACKING_URI": tracking.tracking_uri()},
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(racers)
    ]
    errors = [p.communicate(timeout=240)[1] for p in processes]
    assert [p.returncode for p in processes] == [0] * racers, "\n".join(errors)[-3000:]
    runs = mlflow.search_runs(experiment_names=["racing"], output_format="list")
    assert len(runs) == racers and all(len(run.inputs.dataset_inputs) == rounds for run in runs)


def test_the_tracking_uri_given_to_other_processes_is_absolute(tracking_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///relative/mlflow.db")
    assert tracking.tracking_uri() == f"sqlite:///{Path.cwd() / 'relative' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_a_server_that_stops_answering_is_waited_for_saying_so_then_given_up(monkeypatch, capsys):
    """The wait itself; tests/test_faults.py stops and restarts a real server mid-search."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from search.tracking import store

    monkeypatch.setattr(store, "SERVER", store._ServerWait())
    monkeypatch.setattr(store.SERVER, "limit_s", 2.0)
    monkeypatch.setattr(store, "SERVER_RETRY_DELAY_S", 0.5)
    client = tracking.PatientClient()
    with pytest.raises(tracking.TrackingUnavailable, match="did not answer for 2 s"):
        client.search_experiments()
    assert capsys.readouterr().err.count("does not answer: waiting up to 2 s for it") == 1
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable):  # once given up, at once
        client.search_experiments()
    assert time.monotonic() - started < 1


AUTH_ENV = {"MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key", "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-password-0123"}


@pytest.mark.e2e
@pytest.mark.parametrize("given_in", ["environment", "uri"])
def test_a_search_against_a_server_with_basic_auth_keeps_the_credentials_out_of_its_runs(given_in, tmp_path, mnist_12k):
    """`mlflow server --app-name basic-auth`: a wrong password is one line and exit 2 before
    any training, given in the environment or written into the tracking URI
    (`http://user:pw@host`, moved into the environment before any call); with the right one
    in the URI the search runs, and the password appears in no param, tag, metric name,
    artifact or line the search or MLflow printed."""
    server_args = ["server", "--app-name", "basic-auth", "--backend-store-uri", f"sqlite:///{tmp_path / 'auth.db'}", "--workers", "1"]
    with mlflow_listening(server_args, "/health", tmp_path, env=AUTH_ENV) as url:
        env = {**os.environ, "MNIST_NPZ": str(mnist_12k), "PYTHONPATH": str(REPO)}
        for var in (*MLFLOW_RUN_ENV, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            env.pop(var, None)

        def with_password(password: str) -> dict:
            if given_in == "uri":
                return {**env, "MLFLOW_TRACKING_URI": url.replace("://", f"://admin:{password}@")}
            return {**env, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}

        command = [sys.executable, "-m", "search", "run", *SMALL_SEARCH, "max_trials=1", "max_epochs=1", "robust_size=100"]
        refused = subprocess.run(command, cwd=tmp_path, env=with_password("not-the-password"), capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "trial" not in refused.stdout, refused.stdout[-2000:]  # refused before any trial
        assert refused.stderr.strip() == (
            f"error: tracking server {url} refused the credentials (HTTP 401): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        )
        if given_in == "environment":
            return  # past the credentials, the two are one path: MLflow reads them from the environment
        password = AUTH_ENV["MLFLOW_AUTH_ADMIN_PASSWORD"]
        done = subprocess.run(command, cwd=tmp_path, env=with_password(password), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert password not in done.stdout + done.stderr and "View run" in done.stdout  # MLflow's own lines, with the URI
        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        try:
            client = mlflow.MlflowClient(url)
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=100)
            assert len(runs) == 2  # the search and its trial
            for run in runs:
                logged = {**run.data.params, **run.data.tags, **dict.fromkeys(run.data.metrics, "")}
                assert not [k for k, v in logged.items() if password in k or password in str(v)], run.info.run_name
            parent = next(r for r in runs if "trial_id" not in r.data.tags)
            artifacts = Path(
                mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, tracking_uri=url, dst_path=str(tmp_path / "artifacts"))
            )
            texts = [p for p in artifacts.rglob("*") if p.is_file() and p.suffix in (".csv", ".html", ".md", ".json", ".yaml", ".txt", "")]
            assert texts and not [p for p in texts if password in p.read_text(errors="ignore")]
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME", None)
            os.environ.pop("MLFLOW_TRACKING_PASSWORD", None)


def test_a_description_longer_than_mlflow_holds_is_cut_at_a_line_saying_where_the_rest_is():
    from search.tracking.runs import DESCRIPTION_CUT, MAX_DESCRIPTION, fit_description

    short = "# card\n" * 10
    assert fit_description(short) == short
    long = "".join(f"line {i}\n" for i in range(2000))
    cut = fit_description(long)
    assert len(cut) <= MAX_DESCRIPTION and cut.endswith(DESCRIPTION_CUT)
    assert long.startswith(cut.removesuffix(DESCRIPTION_CUT) + "\n")  # whole lines only
