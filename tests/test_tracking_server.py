"""End-to-end: a search whose `mlflow server` stops mid-trial and starts again (search/tracking/store.py's wait)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from tests.helpers import MLFLOW_RUN_ENV, REPO, free_port

pytestmark = pytest.mark.e2e


class Server:
    """`mlflow server` on a sqlite store in `folder`, on one port across stops and starts."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["server", "--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}", "--workers", "1"]
        args += ["--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port)]
        log = (self.folder / "server.log").open("a")
        self.process = subprocess.Popen([sys.executable, "-m", "mlflow", *args], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while True:
            assert self.process.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                assert time.monotonic() < deadline, "mlflow server did not answer in 120 s"
                time.sleep(0.5)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.stop()


def start_search(server: Server, mnist_npz: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "MNIST_NPZ": str(mnist_npz), "PYTHONPATH": str(REPO)}
    for var in MLFLOW_RUN_ENV:
        env.pop(var, None)
    command = [sys.executable, "-m", "search", *args]
    return subprocess.Popen(command, cwd=server.folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_epoch(client: mlflow.MlflowClient, search: subprocess.Popen, trial_id: str) -> str:
    """Once trial `trial_id` has logged an epoch: the search run's id."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert search.poll() is None, search.communicate()
        experiments = [e.experiment_id for e in client.search_experiments()]
        trials = client.search_runs(experiments, f"tags.trial_id = '{trial_id}'") if experiments else []
        if trials and "val_accuracy" in trials[0].data.metrics:
            return trials[0].data.tags["mlflow.parentRunId"]
        time.sleep(0.5)
    raise AssertionError(f"trial {trial_id} logged no epoch in 300 s")


def assert_each_trial_finished_once_with_every_epoch(client: mlflow.MlflowClient, search_run_id: str, trials: int) -> None:
    search_run = client.get_run(search_run_id)
    assert search_run.info.status == "FINISHED"
    runs = client.search_runs([search_run.info.experiment_id], f"tags.mlflow.parentRunId = '{search_run_id}'")
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert sorted(run.data.tags["trial_id"] for run in finished) == [f"{i}" for i in range(trials)]  # each trial exactly once
    assert all(run.info.status in ("FINISHED", "KILLED") for run in runs)
    for run in finished:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == list(range(len(steps))) and steps, f"trial {run.data.tags['trial_id']}: epochs logged {steps}"
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == 1


def test_a_server_down_mid_trial_is_waited_for_and_past_the_limit_the_search_stops_and_resumes(server, mnist_npz):
    """Down 15 s in trial 0: waited for, saying so, nothing lost or logged twice. Down for good
    in trial 1: past tracking_wait_s the search stops (exit 1) naming the resume command, and
    the resume, once the server is back, finishes every trial exactly once."""
    client = mlflow.MlflowClient(server.url)
    search = start_search(server, mnist_npz, "run", "--profile", "smoke", "tracking_wait_s=30")
    search_run_id = wait_for_epoch(client, search, "0")
    server.stop()
    time.sleep(15)
    server.start()
    wait_for_epoch(client, search, "1")
    server.stop()
    stopped = time.monotonic()
    stdout, stderr = search.communicate(timeout=300)
    waited = time.monotonic() - stopped
    assert search.returncode == 1, stdout[-2000:] + stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert lines.count(f"tracking server {server.url} does not answer: waiting up to 30 s for it") == 2
    back = [line for line in lines if line.startswith("tracking server answers again after ")]
    assert len(back) == 1, stderr[-3000:]
    assert lines[-1] == (
        f"error: tracking server {server.url} did not answer for 30 s: the search stopped; "
        f"once it is back, continue with `python -m search resume {search_run_id}`"
    ), stderr[-3000:]
    assert waited < 120
    server.start()
    resumed = start_search(server, mnist_npz, "resume", search_run_id)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert_each_trial_finished_once_with_every_epoch(client, search_run_id, trials=3)
    print(f"{back[0]}; stopped {waited:.0f} s after the server went for good: {lines[-1]}")
