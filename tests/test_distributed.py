"""Distributed search: Keras Tuner's chief and 2 workers on 127.0.0.1, logging to
a real `mlflow server` whose backend store is a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from tests.helpers import MLFLOW_RUN_ENV, free_port, fresh_project, mlflow_listening

pytestmark = pytest.mark.e2e


def _postgres_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.fixture(scope="module")
def postgres() -> tuple[str, str]:
    """A PostgreSQL server in a temporary data directory on a free loopback port:
    (database URI, server version). Skipped, with the reason, if it cannot start."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (bash .ci/run installs Debian's postgresql)")
    root = Path(tempfile.mkdtemp(prefix="mnist-pg-"))
    # initdb refuses to run as root: run the server as Debian's postgres user then.
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(root, "postgres")
    port = free_port()
    data = root / "data"

    def pg(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_postgres, *command], capture_output=True, text=True, timeout=120)

    initdb = pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    started = initdb.returncode == 0 and pg(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
        "-l",
        str(root / "server.log"),
        "-w",
        "start",
    )
    if not started or started.returncode:
        failed = started or initdb
        pytest.skip(f"PostgreSQL could not be started: {(failed.stderr or failed.stdout).strip()[-300:]}")
    try:
        created = pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        assert created.returncode == 0, created.stderr
        version = pg(str(bin_dir / "postgres"), "--version").stdout.strip()
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow", version
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory) -> str:
    """`mlflow server` on a free loopback port, runs in PostgreSQL, artifacts proxied to a folder."""
    database, _ = postgres
    folder = tmp_path_factory.mktemp("server")
    args = ["server", "--backend-store-uri", database, "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]
    with mlflow_listening(args, "/health", folder) as url:
        yield url


def distributed_search(tmp_path: Path, server: str, mnist_npz: Path, experiment: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "MLFLOW_EXPERIMENT_NAME": experiment, "MNIST_NPZ": str(mnist_npz)}
    for var in MLFLOW_RUN_ENV[:2]:
        env.pop(var, None)
    command = [sys.executable, "-m", "search", "distributed", "--profile", "smoke", "--workers", "2", *args]
    with (tmp_path / "search.log").open("w") as log:  # a file: a full pipe would block the search
        return subprocess.Popen(command, cwd=fresh_project(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(search: subprocess.Popen, tmp_path: Path) -> str:
    """The search's output once it has ended (within 10 minutes)."""
    search.wait(timeout=600)
    return (tmp_path / "search.log").read_text()


def search_runs(server: str, experiment: str) -> tuple[list, list]:
    """(parent runs, trial runs) of `experiment`."""
    client = mlflow.MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    trials = [r for r in runs if "trial_id" in r.data.tags]
    return [r for r in runs if "trial_id" not in r.data.tags], trials


def test_chief_and_two_workers_log_every_trial_once_under_one_parent(tmp_path, tracking_server, postgres, mnist_npz):
    search = distributed_search(tmp_path, tracking_server, mnist_npz, "distributed", "--max-trials", "4")
    output = finished(search, tmp_path)
    assert search.returncode == 0, output[-4000:]

    parents, trials = search_runs(tracking_server, "distributed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert sorted(t.data.tags["trial_id"] for t in trials) == ["0", "1", "2", "3"]  # each trial once
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["worker"] for t in trials} == {"worker-0", "worker-1"}
    for trial in trials:
        assert trial.data.metrics["best_val_accuracy"] > 0.8
    # The test evaluation and the registry gate ran once, in the chief.
    assert "test_accuracy" in parent.data.metrics and "registry_decision" in parent.data.tags
    versions = mlflow.MlflowClient(tracking_server).search_model_versions("name = 'mnist-cnn'")
    assert [v.run_id for v in versions] == [parent.info.run_id]
    print(f"distributed search on {postgres[1]}: {len(trials)} trials, test_accuracy {parent.data.metrics['test_accuracy']:.4f}")


def test_a_worker_killed_mid_trial_does_not_stop_the_search(tmp_path, tracking_server, mnist_npz):
    search = distributed_search(
        tmp_path, tracking_server, mnist_npz, "worker-killed", "--max-trials", "4", "--model-name", "mnist-cnn-killed"
    )
    try:
        victim = _wait_for_running_trial(tracking_server, "worker-killed", "worker-1", search, tmp_path)
        os.kill(victim, signal.SIGKILL)
        output = finished(search, tmp_path)
    finally:
        if search.poll() is None:
            search.kill()
    assert search.returncode == 0, output[-4000:]

    parents, trials = search_runs(tracking_server, "worker-killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(t.data.tags["trial_id"] for t in trials) == ["0", "1", "2", "3"]
    killed = [t for t in trials if t.info.status == "KILLED"]
    assert len(killed) == 1 and killed[0].data.tags["worker"] == "worker-1"
    assert "worker worker-1 exited with status -9" in killed[0].data.tags["failure_reason"]
    assert {t.info.status for t in trials if t is not killed[0]} == {"FINISHED"}
    assert "RUNNING" not in {t.info.status for t in trials}
    assert len(mlflow.MlflowClient(tracking_server).search_model_versions("name = 'mnist-cnn-killed'")) == 1


def test_a_worker_that_goes_silent_loses_its_trial_after_the_worker_timeout(tmp_path, tracking_server, mnist_npz):
    search = distributed_search(
        tmp_path,
        tracking_server,
        mnist_npz,
        "worker-silent",
        "--max-trials",
        "3",
        "--model-name",
        "mnist-cnn-silent",
        "--worker-timeout",
        "45",
    )
    frozen = None
    try:
        frozen = _wait_for_running_trial(tracking_server, "worker-silent", "worker-1", search, tmp_path)
        os.kill(frozen, signal.SIGSTOP)  # alive, but reports nothing: a hung or unreachable worker
        output = finished(search, tmp_path)
    finally:
        if search.poll() is None:
            search.kill()
        if frozen is not None and Path(f"/proc/{frozen}").exists():
            os.kill(frozen, signal.SIGKILL)
    assert search.returncode == 0, output[-4000:]

    parents, trials = search_runs(tracking_server, "worker-silent")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    silent = [t for t in trials if t.info.status == "KILLED"]
    assert len(silent) == 1 and silent[0].data.tags["worker"] == "worker-1"
    assert silent[0].data.tags["failure_reason"] == "worker worker-1 reported nothing for 45 s"
    assert {t.info.status for t in trials if t is not silent[0]} == {"FINISHED"}
    # The chief did not wait for the stopped worker: it killed it on the way out.
    assert not Path(f"/proc/{frozen}").exists() or "State:\tZ" in Path(f"/proc/{frozen}/status").read_text()


def _wait_for_running_trial(
    server: str, experiment: str, worker: str, search: subprocess.Popen, tmp_path: Path, timeout_s: float = 300
) -> int:
    """The pid of `worker` once one of its trial runs is RUNNING."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert search.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
        try:
            _, trials = search_runs(server, experiment)
        except AttributeError:  # the experiment does not exist yet
            trials = []
        if any(t.data.tags.get("worker") == worker and t.info.status == "RUNNING" for t in trials):
            return _pid_of(f"--tuner-id\0{worker}\0")
        time.sleep(0.5)
    raise AssertionError(f"no RUNNING trial of {worker} within {timeout_s} s")


def _pid_of(fragment: str) -> int:
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and fragment in (proc / "cmdline").read_text():
                return int(proc.name)
        except OSError:
            continue
    raise AssertionError(f"no process with {fragment!r} in its command line")
