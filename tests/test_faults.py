"""Faults a real deployment meets, each met the same way whichever executor runs the trials
(search/executors.py): in the search's own process, or as tasks on a real Ray cluster
(`ray start --head`). The store is a real `mlflow server`, stopped and started at will.

- the tracking server down mid-trial: waited for, saying so, nothing lost; past
  `tracking_wait_s` the search stops, naming the resume command;
- a loss that goes NaN: the trial fails, with the same reason;
- no room on disk: one line naming the resume command, and the resume finishes it;
- the search's process killed (SIGKILL) between a trial's run ending and the oracle saving
  the trial, then mid-trial: each resume runs every trial once.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest

from tests.helpers import LONG_TRIALS, MLFLOW_RUN_ENV, REPO, SMALL_SEARCH, SMALL_SEARCH_TRIALS, free_port, new_sqlite_store

pytestmark = pytest.mark.e2e

# A trial run FINISHED this long ago has been recorded by the search too (on Ray the driver
# books a trial within a second of its end): one that finished since may run again on resume.
RECORDED_S = 3


@dataclass(frozen=True)
class Executor:
    name: str
    args: tuple[str, ...] = ()  # what the command line adds
    env: dict[str, str] = field(default_factory=dict)  # what the environment adds


# The Ray tests share the session's Ray head node: on one pytest-xdist worker, as in conftest.py.
@pytest.fixture(params=["in-process", pytest.param("ray", marks=pytest.mark.xdist_group("ray_cluster"))])
def executor(request) -> Executor:
    if request.param == "in-process":
        return Executor("in-process")
    cluster = request.getfixturevalue("ray_cluster")  # one 2-CPU head node for the session
    return Executor("ray", ("ray=auto", "parallel_trials=2", "cpus_per_trial=1"), cluster)


class Server:
    """`mlflow server` on a sqlite store in `folder`, on one port across stops and starts."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        if not (self.folder / "mlflow.db").exists():
            new_sqlite_store(self.folder)
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


class Search:
    """`python -m search <args>` in `tmp_path/work`, on `executor`, logging to `server`; its
    stdout and stderr in files (a full pipe would block it)."""

    def __init__(self, tmp_path: Path, server: Server, executor: Executor, data: Path, *args: str):
        self.work, self.log = tmp_path / "work", tmp_path / f"search-{time.monotonic_ns()}"
        self.work.mkdir(exist_ok=True)
        env = {**os.environ, **executor.env, "MLFLOW_TRACKING_URI": server.url, "MNIST_NPZ": str(data), "PYTHONPATH": str(REPO)}
        for var in MLFLOW_RUN_ENV:
            env.pop(var, None)
        extra = executor.args if args[0] == "run" else ()  # a resume reads them from the run
        with open(f"{self.log}.out", "w") as out, open(f"{self.log}.err", "w") as err:
            self.process = subprocess.Popen([sys.executable, "-m", "search", *args, *extra], cwd=self.work, env=env, stdout=out, stderr=err)

    def wait(self, timeout: float = 600) -> int:
        try:
            return self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    @property
    def stderr(self) -> str:
        return Path(f"{self.log}.err").read_text()

    def output(self) -> str:
        return Path(f"{self.log}.out").read_text()[-3000:] + self.stderr[-3000:]


def trial_runs(client: mlflow.MlflowClient) -> list:
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(experiments, max_results=1000) if "trial_id" in r.data.tags] if experiments else []


def wait_for(search: Search, condition, what: str, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert search.process.poll() is None, search.output()
        found = condition()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s")


def wait_for_epoch(client: mlflow.MlflowClient, search: Search, trial_id: str) -> str:
    """Once trial `trial_id` has logged an epoch: the search run's id."""
    logged = lambda: [r for r in trial_runs(client) if r.data.tags["trial_id"] == trial_id and "val_accuracy" in r.data.metrics]  # noqa: E731
    return wait_for(search, logged, f"an epoch of trial {trial_id}")[0].data.tags["mlflow.parentRunId"]


def epochs_logged(client: mlflow.MlflowClient) -> int:
    return sum(len(client.get_metric_history(r.info.run_id, "val_accuracy")) for r in trial_runs(client))


def wait_until_mid_trial(client: mlflow.MlflowClient, search: Search, counted=lambda run: True) -> str:
    """Once a trial has finished and another is running (among the runs `counted`): the search run's id."""

    def mid_trial():
        runs = [run for run in trial_runs(client) if counted(run)]
        statuses = Counter(r.info.status for r in runs)
        return statuses["FINISHED"] >= 1 and statuses["RUNNING"] >= 1 and runs

    return wait_for(search, mid_trial, "a trial finished and another running")[0].data.tags["mlflow.parentRunId"]


def assert_each_trial_finished_once_with_every_epoch(
    client: mlflow.MlflowClient, search_run_id: str, model_versions: int = 1, trials: int = SMALL_SEARCH_TRIALS
) -> None:
    search_run = client.get_run(search_run_id)
    assert search_run.info.status == "FINISHED"
    runs = [r for r in trial_runs(client) if r.data.tags["mlflow.parentRunId"] == search_run_id]
    finished = [run for run in runs if run.info.status == "FINISHED"]
    assert sorted(run.data.tags["trial_id"] for run in finished) == [f"{i}" for i in range(trials)]  # each trial exactly once
    assert all(run.info.status in ("FINISHED", "KILLED", "FAILED") for run in runs)
    for run in finished:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == list(range(len(steps))) and steps, f"trial {run.data.tags['trial_id']}: epochs logged {steps}"
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == model_versions


def test_a_server_down_mid_trial_is_waited_for_and_past_the_limit_the_search_stops_naming_the_resume(tmp_path, server, executor, mnist_12k):
    """Down 10 s (and the restart) in trial 0, within the 45 s the search waits: waited for, saying so, no epoch lost or
    logged twice. Down for good once the search has logged an epoch since: past tracking_wait_s the search stops (exit 1)
    naming the resume command. (A resume after a stop: the full-disk test below, which stops the same way.) The wait
    leaves 35 s for the restart: a server starting on two busy cores has taken more than 20."""
    client = mlflow.MlflowClient(server.url)
    search = Search(tmp_path, server, executor, mnist_12k, "run", *SMALL_SEARCH, LONG_TRIALS, "tracking_wait_s=45")
    search_run_id = wait_for_epoch(client, search, "0")
    server.stop()
    time.sleep(10)
    server.start()
    wait_for(search, lambda: "tracking server answers again" in search.stderr, "the search saying the server answers again")
    logged = epochs_logged(client)
    wait_for(search, lambda: epochs_logged(client) > logged, "an epoch logged after the outage")
    server.stop()
    stopped = time.monotonic()
    assert search.wait(timeout=300) == 1, search.output()
    waited = time.monotonic() - stopped
    lines = search.stderr.strip().splitlines()
    assert lines.count(f"tracking server {server.url} does not answer: waiting up to 45 s for it") == 2, search.output()
    back = [line for line in lines if line.startswith("tracking server answers again after ")]
    assert len(back) == 1, search.output()
    assert lines[-1] == (
        f"error: tracking server {server.url} did not answer for 45 s: the search stopped; "
        f"once it is back, continue with `python -m search resume {search_run_id}`"
    ), search.output()
    assert waited < 45 + 50  # the limit, a last attempt, and the process exiting
    server.start()
    runs = trial_runs(client)
    assert sorted(run.data.tags["trial_id"] for run in runs) == [f"{i}" for i in range(len(runs))]  # one run each
    for run in runs:  # each epoch logged once, none missing before the last
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == list(range(len(steps))), f"trial {run.data.tags['trial_id']}: epochs logged {steps}"
    print(f"{executor.name}: {back[0]}; stopped {waited:.0f} s after the server went for good: {lines[-1]}")


def test_a_server_outage_as_the_search_run_ends_is_waited_out_and_the_run_ends_finished(tmp_path, server, mnist_12k):
    """The search's last call (ending its run) meets a 10 s outage. MLflow's `end_run` forgets
    the run before it sets the status: retried, it would do nothing and leave it RUNNING.
    Where trials ran does not matter: the search run is ended by the driver."""
    pause = Executor("in-process", env={"SEARCH_FAULT_AT": "search_end:pause=3"})
    search = Search(tmp_path, server, pause, mnist_12k, "run", *SMALL_SEARCH, "max_trials=1")
    deadline = time.monotonic() + 400
    while "fault point search_end: pausing" not in search.output():
        assert search.process.poll() is None and time.monotonic() < deadline, search.output()
        time.sleep(0.2)
    server.stop()
    time.sleep(10)
    server.start()
    assert search.wait() == 0, search.output()
    assert "does not answer: waiting up to" in search.stderr and "answers again after" in search.stderr, search.output()
    client = mlflow.MlflowClient(server.url)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 2, [(r.info.run_name, r.info.status) for r in runs]


def test_a_trial_whose_loss_goes_nan_fails_with_the_same_reason(tmp_path, server, executor, mnist_12k):
    """A learning rate of 1e12 on three convolution blocks of raw pixels: the loss is NaN within the first epoch."""
    search = Search(
        tmp_path,
        server,
        executor,
        mnist_12k,
        "run",
        *SMALL_SEARCH[:2],
        "max_trials=2",
        "train_subset=3000",
        "validation_size=2000",
        # Raw pixels and wide layers: a step of 1e12 on standardised inputs, or on narrow layers, can
        # kill every ReLU and leave the loss finite. Dropout stays free, so that the trials differ.
        "fixed=family=plain,head=flatten,conv_blocks=3,conv_filters_0=64,conv_filters_1=64,conv_filters_2=64,"
        "kernel_size=3,dense_units=256,learning_rate=1e12,input_norm=none",
    )
    assert search.wait() == 1, search.output()
    assert search.stderr.strip().splitlines()[-1] == "error: all 2 trials failed; see the failure_reason tags of the trial runs", (
        search.output()
    )
    runs = trial_runs(mlflow.MlflowClient(server.url))
    assert sorted(r.data.tags["trial_id"] for r in runs) == ["0", "1"] and {r.info.status for r in runs} == {"FAILED"}
    for run in runs:
        assert re.fullmatch(r"FailedTrialError: loss became (NaN|infinite) after \d+ epoch\(s\)", run.data.tags["failure_reason"]), (
            run.data.tags
        )
    print(f"{executor.name}: {sorted(r.data.tags['failure_reason'] for r in runs)}")


@pytest.fixture
def small_disk(tmp_path):
    """`tmp_path/work/outputs` on a tmpfs of 64 MB (mounting needs root)."""
    outputs = tmp_path / "work" / "outputs"
    outputs.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(outputs)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill here: {(mounted.stderr or mounted.stdout).strip()[:200]}")
    yield outputs
    subprocess.run(["umount", "-l", str(outputs)], check=True)


def fill(folder: Path, leave_bytes: int) -> Path:
    """A file that takes all but `leave_bytes` of `folder`'s file system: room for the tuner's
    small JSON files, none for a checkpoint."""
    ballast = folder / "ballast"
    stat = os.statvfs(folder)
    with ballast.open("wb") as file:
        file.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave_bytes))
    return ballast


def test_a_full_disk_stops_the_search_with_one_line_and_resume_finishes_it_once_space_is_freed(
    tmp_path, server, executor, mnist_12k, small_disk
):
    client = mlflow.MlflowClient(server.url)  # the store and its artifacts stay on the roomy disk
    search = Search(tmp_path, server, executor, mnist_12k, "run", *SMALL_SEARCH, LONG_TRIALS)
    parent_id = wait_until_mid_trial(client, search)
    finished_before = {r.data.tags["trial_id"]: r.info.run_id for r in trial_runs(client) if r.info.status == "FINISHED"}
    time.sleep(RECORDED_S)
    # The search waits while the disk fills: a checkpoint written during the filling would
    # fail in HDF5 instead of being refused by the check before it.
    search.process.send_signal(signal.SIGSTOP)
    try:
        ballast = fill(small_disk, leave_bytes=256 * 1024)
    finally:
        search.process.send_signal(signal.SIGCONT)
    assert search.wait(timeout=300) == 1, search.output()
    message = search.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: {Path('outputs') / parent_id}") and message.endswith(
        f": no space left on device; free some, then continue with `python -m search resume {parent_id}`"
    ), search.output()
    assert "Traceback" not in search.stderr
    assert client.get_run(parent_id).info.status == "FAILED"
    assert "RUNNING" not in {r.info.status for r in trial_runs(client)}

    ballast.unlink()
    resumed = Search(tmp_path, server, executor, mnist_12k, "resume", parent_id)
    assert resumed.wait() == 0, resumed.output()
    assert_each_trial_finished_once_with_every_epoch(client, parent_id)
    finished_after = {r.data.tags["trial_id"]: r.info.run_id for r in trial_runs(client) if r.info.status == "FINISHED"}
    assert finished_before.items() <= finished_after.items()  # the trials finished before were not run again
    print(f"{executor.name}: {message} | trials finished before: {len(finished_before)}, after resume: {len(finished_after)}")


def resume_refused(tmp_path: Path, server: Server, search_run_id: str) -> str:
    """`python -m search resume <id>` run to its end, expected to refuse: its one line of stderr."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": server.url, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "search", "resume", search_run_id]
    refused = subprocess.run(command, cwd=tmp_path / "work", env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    return refused.stderr


def test_a_killed_search_resumes_without_repeating_trials(tmp_path, server, executor, mnist_12k):
    """SIGKILL twice, no chance to clean up. First at the named point between a trial's run
    ending FINISHED and the oracle saving the trial as ended: the resume marks that run as run
    again and reruns the trial. Then that resume, mid-trial: the next resume takes over the lock
    the killed process left, marks the runs it left RUNNING KILLED and runs every trial once,
    under the same search run, one version registered. A resume while another runs is refused,
    naming its process, and so is a resume of the finished search."""
    client = mlflow.MlflowClient(server.url)
    at_trial_end = Executor(executor.name, executor.args, {**executor.env, "SEARCH_FAULT_AT": "trial_run_ended"})
    search = Search(tmp_path, server, at_trial_end, mnist_12k, "run", *SMALL_SEARCH, LONG_TRIALS)
    assert search.wait() == -signal.SIGKILL, search.output()
    assert "fault point trial_run_ended: killed" in search.output()
    first_runs = trial_runs(client)
    assert "FINISHED" in {r.info.status for r in first_runs}  # one the oracle never saw end
    parent_id = first_runs[0].data.tags["mlflow.parentRunId"]

    resumed = Search(tmp_path, server, executor, mnist_12k, "resume", parent_id)
    earlier = {r.info.run_id for r in first_runs}
    wait_until_mid_trial(client, resumed, lambda run: run.info.run_id not in earlier)
    finished_before = {r.data.tags["trial_id"]: r.info.run_id for r in trial_runs(client) if r.info.status == "FINISHED"}
    time.sleep(RECORDED_S)
    resumed.process.send_signal(signal.SIGKILL)
    assert resumed.wait(timeout=60) == -signal.SIGKILL
    lock = resumed.work / "outputs" / parent_id / "search.lock"
    assert lock.read_text().split()[0] == str(resumed.process.pid)  # left behind by the killed process

    again = Search(tmp_path, server, executor, mnist_12k, "resume", parent_id)
    wait_for(again, lambda: lock.exists() and lock.read_text().split()[:1] == [str(again.process.pid)], "the resume taking the lock")
    assert resume_refused(tmp_path, server, parent_id) == (
        f"error: search run {parent_id} is already running in process {again.process.pid} on {socket.gethostname()} "
        f"(lock {Path('outputs') / parent_id / 'search.lock'})\n"
    )
    assert again.wait() == 0, again.output()
    assert not lock.exists()
    assert_each_trial_finished_once_with_every_epoch(client, parent_id)
    assert f"search run {parent_id} has already finished: " in resume_refused(tmp_path, server, parent_id)
    killed = [r for r in trial_runs(client) if r.info.status == "KILLED"]
    reasons = [r.data.tags.get("failure_reason", "") for r in killed]
    assert "the search stopped before it recorded this attempt's result; the trial ran again" in reasons, reasons
    assert [r for r in killed if r.info.run_id not in earlier], "the run the mid-trial kill left RUNNING was not marked KILLED"
    assert set(Counter(r.info.status for r in trial_runs(client))) <= {"FINISHED", "KILLED"}
    finished_after = {r.data.tags["trial_id"]: r.info.run_id for r in trial_runs(client) if r.info.status == "FINISHED"}
    assert finished_before.items() <= finished_after.items()
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "1"
    print(f"{executor.name}: {len(finished_before)} trial(s) finished when killed mid-trial; after resume {dict(Counter(reasons))}")
