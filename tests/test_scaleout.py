"""Trials as Ray tasks (search/scaleout.py): the fast checks of its pieces, then
searches on a real Ray cluster (`ray start --head` on 127.0.0.1) logging to a real
`mlflow server` whose backend store is a real PostgreSQL."""

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

from search import scaleout
from search.trial import TrialJob
from tests.helpers import LONG_TRIALS, MLFLOW_RUN_ENV, REPO, SMALL_SEARCH, free_port, fresh_project, mlflow_listening


def test_a_trial_worker_gets_threads_for_its_cpus_and_the_absolute_tracking_uri(tracking_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    env = scaleout.worker_environment(3)
    assert {env[name] for name in scaleout.THREAD_VARIABLES} == {"3"}
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    assert "MLFLOW_TRACKING_PASSWORD" not in env


def test_credentials_travel_with_each_task_and_never_in_the_jobs_environment(monkeypatch):
    """Ray lists a job's runtime_env; a password in the tracking URI or the environment stays out of it."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://admin:s3cret%40x@127.0.0.1:5000")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    env = scaleout.worker_environment(1)
    assert env["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000" and not [v for v in env.values() if "s3cret" in v]
    assert scaleout.tracking_credentials() == {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "s3cret@x"}
    assert "s3cret" not in repr(TrialJob(None, None, None, None, credentials=scaleout.tracking_credentials()))


@pytest.mark.parametrize(
    "address, message",
    [
        ("nowhere", "Ray address 'nowhere' is not host:port, ray://host:port, auto or local"),
        ("127.0.0.1:{port}", "Ray cluster 127.0.0.1:{port} does not answer"),
        ("ray://127.0.0.1:{port}", "Ray cluster ray://127.0.0.1:{port} does not answer"),
    ],
)
def test_an_address_without_a_cluster_is_refused_before_anything_runs(address, message):
    port = free_port()
    with pytest.raises(scaleout.ClusterError, match=message.format(port=port)):
        scaleout.check_address(address.format(port=port))


@pytest.mark.e2e  # a fresh process of the command line
def test_an_unreachable_cluster_is_one_line_and_exit_2_before_any_run(tmp_path, tracking_store, mnist_npz):
    env = {**os.environ, "MNIST_NPZ": str(mnist_npz), "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "search", "run", "--profile", "smoke", "--ray", f"127.0.0.1:{free_port()}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert result.stderr.strip().splitlines()[-1].startswith("error: Ray cluster 127.0.0.1:")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


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


def ray_search(tmp_path: Path, server: str, cluster: dict, mnist_npz: Path, experiment: str, *settings: str) -> subprocess.Popen:
    """`python -m search run <SMALL_SEARCH> ray=auto parallel_trials=2 <settings>` on `cluster`."""
    env = {**os.environ, **cluster, "MLFLOW_TRACKING_URI": server, "MLFLOW_EXPERIMENT_NAME": experiment, "MNIST_NPZ": str(mnist_npz)}
    for var in MLFLOW_RUN_ENV[:2]:
        env.pop(var, None)
    command = [sys.executable, "-m", "search", "run", *SMALL_SEARCH, "ray=auto", "parallel_trials=2", *settings]
    with (tmp_path / "search.log").open("w") as log:  # a file: a full pipe would block the search
        return subprocess.Popen(command, cwd=fresh_project(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(search: subprocess.Popen, tmp_path: Path) -> str:
    """The search's output once it has ended (within 10 minutes)."""
    try:
        search.wait(timeout=600)
    finally:
        if search.poll() is None:
            search.kill()
    return (tmp_path / "search.log").read_text()


def search_runs(server: str, experiment: str) -> tuple[list, list]:
    """(parent runs, trial runs) of `experiment`."""
    client = mlflow.MlflowClient(server)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    trials = [r for r in runs if "trial_id" in r.data.tags]
    return [r for r in runs if "trial_id" not in r.data.tags], trials


@pytest.mark.e2e
def test_two_trials_at_once_on_a_ray_cluster_log_every_trial_once_under_one_parent(
    tmp_path, ray_cluster, tracking_server, postgres, mnist_12k
):
    search = ray_search(tmp_path, tracking_server, ray_cluster, mnist_12k, "ray", "cpus_per_trial=1")
    output = finished(search, tmp_path)
    assert search.returncode == 0, output[-4000:]

    parents, trials = search_runs(tracking_server, "ray")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert sorted(t.data.tags["trial_id"] for t in trials) == ["0", "1", "2", "3"]  # each trial once
    assert {t.info.status for t in trials} == {"FINISHED"}, [(t.data.params, t.data.tags.get("failure_reason")) for t in trials]
    [node] = {t.data.tags["ray_node"] for t in trials}  # the cluster's one node, by its IP address
    assert node.count(".") == 3
    assert all(t.data.metrics["best_val_accuracy"] > 0.6 and t.data.metrics["cpu_seconds"] > 0 for t in trials)
    assert all(0 < t.data.metrics["val_heldout_accuracy"] <= 1 for t in trials)  # as in this process
    first = sorted(trials, key=lambda t: t.info.start_time)
    assert first[1].info.start_time < first[0].info.end_time, "the first two trials did not run at once"
    assert parent.data.metrics["ray_startup_s"] > 0
    versions = mlflow.MlflowClient(tracking_server).search_model_versions("name = 'mnist-cnn'")
    assert [v.run_id for v in versions] == [parent.info.run_id]
    print(f"Ray search on {postgres[1]}: {len(trials)} trials, Ray joined in {parent.data.metrics['ray_startup_s']:.1f} s")


@pytest.mark.e2e
def test_a_ray_worker_killed_mid_trial_is_retried_and_the_search_completes(tmp_path, ray_cluster, tracking_server, mnist_12k):
    search = ray_search(tmp_path, tracking_server, ray_cluster, mnist_12k, "ray-killed", "model_name=mnist-cnn-killed", LONG_TRIALS)
    try:
        victim = _wait_for_a_running_trial(tracking_server, "ray-killed", search, tmp_path)
        os.kill(victim, signal.SIGKILL)
    finally:
        output = finished(search, tmp_path)
    assert search.returncode == 0, output[-4000:]

    parents, trials = search_runs(tracking_server, "ray-killed")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    finished_runs = [t for t in trials if t.info.status == "FINISHED"]
    assert sorted(t.data.tags["trial_id"] for t in finished_runs) == ["0", "1", "2", "3"]  # each exactly once
    killed = [t for t in trials if t.info.status == "KILLED"]
    assert len(killed) == 1 and killed[0].data.tags["failure_reason"] == "its Ray worker or node died; Ray ran the trial again"
    assert len(trials) == 5 and "RUNNING" not in {t.info.status for t in trials}
    assert len(mlflow.MlflowClient(tracking_server).search_model_versions("name = 'mnist-cnn-killed'")) == 1
    print(
        f"worker of trial {killed[0].data.tags['trial_id']} killed: its runs {[t.info.status for t in trials if t.data.tags['trial_id'] == killed[0].data.tags['trial_id']]}"
    )


def _wait_for_a_running_trial(server: str, experiment: str, search: subprocess.Popen, tmp_path: Path, timeout_s: float = 300) -> int:
    """The pid of a Ray worker process running a trial, once a trial's run has logged an epoch."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert search.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
        _, trials = search_runs(server, experiment)
        if any(t.info.status == "RUNNING" and "loss" in t.data.metrics for t in trials):
            workers = _pids_of("ray::ray_trial")
            if workers:
                return workers[0]
        time.sleep(0.5)
    raise AssertionError(f"no trial logged an epoch within {timeout_s} s")


def _pids_of(title: str) -> list[int]:
    """Processes whose command line (a Ray worker's process title) starts with `title`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title.encode()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.e2e
def test_more_cpus_per_trial_than_any_node_has_is_refused_before_a_run_opens(tmp_path, ray_cluster, tracking_server, mnist_12k):
    search = ray_search(tmp_path, tracking_server, ray_cluster, mnist_12k, "too-wide", "cpus_per_trial=4")
    output = finished(search, tmp_path)
    assert search.returncode == 2, output[-3000:]
    assert output.strip().splitlines()[-1] == (
        "error: cpus_per_trial=4, but the largest node of Ray cluster 'auto' has 2 CPU(s): no trial could start"
    ), output[-3000:]
    assert search_runs(tracking_server, "too-wide") == ([], [])


LOCAL_CLUSTER = """
import sys
import ray
from search import scaleout
scaleout.connect("local")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""

JOIN = """
import sys, ray
try:
    ray.init(address=sys.argv[1], configure_logging=False, log_to_driver=False)
except Exception as err:
    print(type(err).__name__, str(err)[:300])
    sys.exit(3)
"""


@pytest.mark.e2e
def test_a_local_cluster_refuses_a_process_without_its_token(tmp_path):
    """Ray's servers listen on every interface, whatever address it is given (README); what
    keeps others out of `ray=local` is the token Ray gives the cluster it starts: a process
    with another token is refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(tmp_path)  # Ray keeps the token it generates under the home directory
    cluster = subprocess.Popen(
        [sys.executable, "-c", LOCAL_CLUSTER],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        address = cluster.stdout.readline().strip()
        assert address, "the local cluster printed no address"
        (tmp_path / "stranger").mkdir()
        stranger = {**env, "HOME": str(tmp_path / "stranger"), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
        joined = subprocess.run([sys.executable, "-c", JOIN, address], env=stranger, capture_output=True, text=True, timeout=300)
        assert joined.returncode == 3 and "InvalidAuthToken" in joined.stderr, joined.stdout + joined.stderr[-2000:]
    finally:
        cluster.stdin.close()  # the cluster's driver shuts its cluster down
        cluster.wait(timeout=120)


# A search of two trials at once on Ray, whose hypermodel is defined in the script (Ray sends it
# by value): a learning configuration that ends quickly, and a frozen one (learning rate 0) whose
# first epoch reports only after `pause` seconds, long after the other has finished.
LIVE_MEDIAN = """
import dataclasses, json, sys, time
from pathlib import Path
import keras, keras_tuner as kt, numpy as np
from experiments import resolve
from model_zoo import make_cnn
from search import tracking
from search.data import Split
from search.driver import drive
from search.scaleout import RayTrials
from search.tuner import make_tuner

class FrozenIsSlow(kt.HyperModel):
    def __init__(self, pause_s):
        super().__init__()
        self.pause_s = pause_s  # the worker's own sys.argv is Ray's

    def build(self, hp):
        return make_cnn(conv_filters=(8,), learning_rate=0.0 if hp.Boolean("frozen") else 1e-2)

    def fit(self, hp, model, *args, callbacks=(), **kwargs):
        if hp.get("frozen"):
            pause = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: time.sleep(self.pause_s) if epoch == 0 else None)
            callbacks = [pause, *callbacks]
        return model.fit(*args, callbacks=callbacks, **kwargs)

with np.load(sys.argv[2]) as d:
    x, y = (d["x_train"][:1500, ..., None] / 255.0).astype("float32"), d["y_train"][:1500]
config = resolve("smoke", ray="auto", parallel_trials=2, max_trials=2, max_epochs=2, prune_min_trials=1, prune_grace_epochs=1)
config = dataclasses.replace(config, fixed=())
with tracking.tracked_run("live-median") as tracker:
    tuner = make_tuner(config, tracker, Path(sys.argv[1]), "tuner", hypermodel=FrozenIsSlow(float(sys.argv[3])))
    drive(tuner, RayTrials(config), config, Split(x[:1000], y[:1000]), Split(x[1000:], y[1000:]))
print(json.dumps(tracker.run_id))
"""


@pytest.mark.e2e
def test_a_ray_trial_is_pruned_by_the_live_median_of_trials_that_finished_after_it_was_sent(
    tmp_path, ray_cluster, tracking_server, mnist_12k
):
    """The median rule is the driver's, asked live: the frozen trial, sent with the other
    before any trial had finished, is stopped after its first epoch against the curve of the
    trial that finished meanwhile. (A copy of the rule taken when it was sent held no curve.)"""
    env = {**os.environ, **ray_cluster, "MLFLOW_TRACKING_URI": tracking_server, "PYTHONPATH": str(REPO)}
    for var in MLFLOW_RUN_ENV:
        env.pop(var, None)
    done = subprocess.run(
        [sys.executable, "-c", LIVE_MEDIAN, str(tmp_path / "tuner"), str(mnist_12k), "20"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_server)
    parent_id = done.stdout.strip().splitlines()[-1].strip('"')
    trials = client.search_runs([client.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    [frozen] = [t for t in trials if t.data.params["frozen"] == "True"]
    [learning] = [t for t in trials if t.data.params["frozen"] == "False"]
    assert {t.info.status for t in trials} == {"FINISHED"}, [(t.data.params, t.data.tags.get("failure_reason")) for t in trials]
    assert frozen.info.start_time < learning.info.end_time, "the frozen trial was sent after the other had finished"
    assert frozen.data.tags.get("pruned") == "1", (frozen.data.tags, frozen.data.metrics)
    assert "pruned" not in learning.data.tags
    assert frozen.data.metrics["best_val_accuracy"] < learning.data.metrics["best_val_accuracy"]
