"""Reliability tests: interrupt a real search (SIGINT, SIGTERM, SIGKILL at the start, in the final
training), resume it (bf16 too), and run two searches at once. SIGKILL mid-trial, with the
resume's lock, on both executors: tests/test_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import mlflow
import numpy as np
import pytest

from search.precision import AUTO_PRECISION_ENV, cpu_has_bf16
from tests.helpers import (
    LONG_TRIALS,
    MLFLOW_RUN_ENV,
    REPO,
    SMALL_SEARCH,
    SMALL_SEARCH_TRIALS,
    all_runs,
    mlflow_listening,
    new_sqlite_store,
    rest_predictions,
)

pytestmark = pytest.mark.e2e


def search_env(store: str, mnist_npz: Path) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MNIST_NPZ": str(mnist_npz), "PYTHONPATH": str(REPO)}
    for var in MLFLOW_RUN_ENV:
        env.pop(var, None)
    return env


def start(args: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "search", *args], cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_until_mid_trial(store: str, process: subprocess.Popen, finished_at_least: int = 1, timeout_s: float = 300) -> str:
    """Wait until `finished_at_least` trials have finished and the next is running; return the parent run id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the search ended before it could be interrupted"
        statuses = Counter(r.info.status for r in all_runs(store) if "trial_id" in r.data.tags)
        if statuses["FINISHED"] >= finished_at_least and statuses["RUNNING"] == 1:
            (parent,) = [r for r in all_runs(store) if "trial_id" not in r.data.tags]
            return parent.info.run_id
        time.sleep(0.2)
    pytest.fail("no trial finished in time")


def assert_completed_once(store: str, parent_id: str, killed_children: int, trials: int = SMALL_SEARCH_TRIALS) -> None:
    runs = all_runs(store)
    parents = [r for r in runs if "trial_id" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [parent_id]
    assert parents[0].info.status == "FINISHED"
    children = [r for r in runs if "trial_id" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent_id}
    finished = Counter(r.data.tags["trial_id"] for r in children if r.info.status == "FINISHED")
    assert len(finished) == trials and set(finished.values()) == {1}
    assert Counter(r.info.status for r in children)["KILLED"] == killed_children
    assert "RUNNING" not in {r.info.status for r in runs}
    versions = mlflow.MlflowClient(store).search_model_versions("name = 'mnist-cnn'")
    assert len(versions) == 1 and versions[0].tags["search_run_id"] == parent_id


def finished_trials(store: str) -> int:
    return Counter(r.info.status for r in all_runs(store) if "trial_id" in r.data.tags)["FINISHED"]


def test_an_interrupted_search_resumes_without_repeating_trials_even_from_damaged_tuner_state(tmp_path, mnist_12k):
    """Ctrl-C (SIGINT) mid-trial, then SIGTERM mid-trial of the resume: each ends the open
    trial and the parent as KILLED before the process exits 130. Then SIGKILL mid-trial of the
    next resume, and oracle.json left empty, as Keras Tuner's in-place rewrite leaves it when
    the kill lands inside the write: the last resume puts back the state saved after the last
    trial that ended, says so, and every trial finishes once."""
    store = new_sqlite_store(tmp_path)
    env, log = search_env(store, mnist_12k), tmp_path / "search.log"
    process = start(["run", *SMALL_SEARCH, LONG_TRIALS], tmp_path, env, log)
    for sig in (signal.SIGINT, signal.SIGTERM):
        parent_id = wait_until_mid_trial(store, process, finished_at_least=finished_trials(store) + 1)
        process.send_signal(sig)
        assert process.wait(timeout=60) == 130, f"{sig.name}: " + log.read_text()[-2000:]
        assert {r.info.status for r in all_runs(store) if r.info.status != "FINISHED"} == {"KILLED"}, sig.name
        assert mlflow.MlflowClient(store).get_run(parent_id).info.status == "KILLED"
        process = start(["resume", parent_id], tmp_path, env, log)
    wait_until_mid_trial(store, process, finished_at_least=finished_trials(store) + 1)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    (tmp_path / "outputs" / parent_id / "tuner" / "oracle.json").write_text("")
    process = start(["resume", parent_id], tmp_path, env, log)
    assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "tuner state oracle.json was damaged; restored the state saved after the last trial that ended" in log.read_text()
    assert_completed_once(store, parent_id, killed_children=3)


def test_two_searches_on_one_sqlite_store_log_everything(tmp_path, mnist_12k):
    store = new_sqlite_store(tmp_path)
    env = search_env(store, mnist_12k)
    # Create the store first, as a user's earlier runs would have.
    mlflow.MlflowClient(store).search_experiments()
    searches = [
        start(["run", *SMALL_SEARCH, "max_trials=2", "--seed", str(seed)], tmp_path, env, tmp_path / f"s{seed}.log") for seed in (1, 2)
    ]
    for seed, search in zip((1, 2), searches):
        assert search.wait(timeout=400) == 0, (tmp_path / f"s{seed}.log").read_text()[-3000:]
    runs = all_runs(store)
    parents = [r for r in runs if "trial_id" not in r.data.tags]
    assert len(parents) == 2 and {p.info.status for p in parents} == {"FINISHED"}
    client = mlflow.MlflowClient(store)
    for parent in parents:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
        for child in children:
            assert len(client.get_metric_history(child.info.run_id, "val_accuracy")) == 2
    assert len(client.search_model_versions("name = 'mnist-cnn'")) == 2


# Where bf16 is not native (AVX2 only), TensorFlow emulates it many times slower than
# float32: fewer, one-epoch trials there, so that the test takes what it takes elsewhere.
BF16_SEARCH = [*SMALL_SEARCH, LONG_TRIALS, "precision=auto", "max_trials=3"] + (
    [] if cpu_has_bf16() else ["train_subset=2000", "max_epochs=1"]
)


def test_a_bf16_search_killed_and_resumed_keeps_bf16_and_registers_a_model_that_loads_and_serves(tmp_path, mnist_12k):
    """The probe chose bf16 for the search; on resume it would choose float32 (forced
    both ways here, as an AMX machine and a float32-only one would); the resumed
    search keeps bf16, and what it registers loads and serves like any other model."""
    store = new_sqlite_store(tmp_path)
    env, log = search_env(store, mnist_12k), tmp_path / "search.log"
    search = start(["run", *BF16_SEARCH], tmp_path, {**env, AUTO_PRECISION_ENV: "mixed_bfloat16"}, log)
    parent_id = wait_until_mid_trial(store, search, timeout_s=900)
    search.send_signal(signal.SIGKILL)
    search.wait(timeout=60)
    resumed = start(["resume", parent_id], tmp_path, {**env, AUTO_PRECISION_ENV: "float32"}, log)
    assert resumed.wait(timeout=1800) == 0, log.read_text()[-3000:]
    assert_completed_once(store, parent_id, killed_children=1, trials=3)
    params = mlflow.MlflowClient(store).get_run(parent_id).data.params
    assert (params["precision_used"], params["precision_reason"]) == ("mixed_bfloat16", f"${AUTO_PRECISION_ENV}")
    assert "precision mixed_bfloat16 (resumed)" in log.read_text()

    # The keras flavor in a process with no code of this project (cwd "/", no PYTHONPATH), and the pyfunc.
    test = np.load(mnist_12k)
    script = (
        "import sys, numpy as np, mlflow, mlflow.keras\n"
        f"d = np.load({str(mnist_12k)!r})\n"
        "keras_model = mlflow.keras.load_model('models:/mnist-cnn@champion')\n"
        # The input's standardisation computes in float32 by design; the convolutions in bf16.
        "conv = next(layer for layer in keras_model.layers if type(layer).__name__ == 'Conv2D')\n"
        "assert conv.dtype_policy.name == 'mixed_bfloat16', conv.dtype_policy\n"
        "keras_digit = keras_model.predict(d['x_test'][:500, :, :, None] / 255, verbose=0).argmax(axis=1)\n"
        "served = mlflow.pyfunc.load_model('models:/mnist-cnn@champion').predict(d['x_test'][:500])\n"
        "assert not {'search', 'model_zoo', 'experiments'} & set(sys.modules)\n"
        "assert served['probability_0'].dtype == np.float32\n"
        "print(f\"keras={(keras_digit == d['y_test'][:500]).mean():.4f} pyfunc={(served['digit'] == d['y_test'][:500]).mean():.4f}\")\n"
    )
    clean_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    loaded = subprocess.run([sys.executable, "-c", script], env=clean_env, capture_output=True, text=True, timeout=300, cwd="/")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    accuracies = dict(item.split("=") for item in loaded.stdout.split())
    assert float(accuracies["keras"]) >= 0.85 and float(accuracies["pyfunc"]) >= 0.85, accuracies

    # Over REST.
    serve = ["models", "serve", "-m", "models:/mnist-cnn@champion", "--env-manager", "local"]
    with mlflow_listening(serve, "/ping", tmp_path, {"MLFLOW_TRACKING_URI": store}) as url:
        predictions = rest_predictions(url, test["x_test"][:200])
    assert predictions["probabilities"].shape == (200, 10)
    assert (predictions["digit"] == test["y_test"][:200]).mean() >= 0.85


def test_a_search_killed_before_its_first_trial_resumes_from_the_start(tmp_path, mnist_12k):
    """SIGKILL after the search logged its settings and data, before any trial run exists
    (the EDA, the tuner's start): resume runs every trial once, under the same search run;
    a resume of the finished search is refused."""
    store = new_sqlite_store(tmp_path)
    env, log = search_env(store, mnist_12k), tmp_path / "search.log"
    search = start(["run", *SMALL_SEARCH, "max_trials=2"], tmp_path, env, log)
    deadline = time.monotonic() + 120
    while True:
        assert search.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        runs = all_runs(store)
        parents = [r for r in runs if "trial_id" not in r.data.tags and "data_sha256" in r.data.params]
        if parents:
            break
        time.sleep(0.05)
    search.send_signal(signal.SIGKILL)
    search.wait(timeout=60)
    assert not [r for r in all_runs(store) if "trial_id" in r.data.tags], "a trial had started: the kill came too late for this test"
    parent_id = parents[0].info.run_id
    resume = [sys.executable, "-m", "search", "resume", parent_id]
    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_completed_once(store, parent_id, killed_children=0, trials=2)
    again = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2
    assert f"search run {parent_id} has already finished: " in again.stderr


def test_a_search_killed_in_its_final_training_or_after_registering_resumes_to_one_version(tmp_path, mnist_12k):
    """SIGKILL while the winner is retrained: resume retrains it and registers once. Then the
    states a kill right after registering leaves (a version, no decision, the alias moved or
    not yet, the run RUNNING): resume completes that version instead of registering another."""
    store = new_sqlite_store(tmp_path)
    env, log = search_env(store, mnist_12k), tmp_path / "search.log"
    search = start(["run", *SMALL_SEARCH, "max_trials=2", "final_epochs=1"], tmp_path, env, log)
    deadline = time.monotonic() + 300
    while "retraining the winner's configuration" not in log.read_text():
        assert search.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    search.send_signal(signal.SIGKILL)
    search.wait(timeout=60)
    (parent_id,) = [r.info.run_id for r in all_runs(store) if "trial_id" not in r.data.tags]
    client = mlflow.MlflowClient(store)
    assert not client.search_model_versions("name = 'mnist-cnn'")
    resume = [sys.executable, "-m", "search", "resume", parent_id]
    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_completed_once(store, parent_id, killed_children=0, trials=2)

    client.delete_tag(parent_id, "registry_decision")
    client.delete_registered_model_alias("mnist-cnn", "champion")
    client.update_run(parent_id, status="RUNNING")
    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "this search registered mnist-cnn version 1 before it stopped: completing that version" in resumed.stdout
    assert_completed_once(store, parent_id, killed_children=0, trials=2)
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "1"
    assert "retraining" not in resumed.stdout
    # Killed after the alias moved, before the decision was logged: the decision is that one.
    client.delete_tag(parent_id, "registry_decision")
    client.update_run(parent_id, status="RUNNING")
    resumed = subprocess.run(resume, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_completed_once(store, parent_id, killed_children=0, trials=2)
    assert client.get_run(parent_id).data.tags["registry_decision"] == "registered mnist-cnn version 1 as @champion"


def test_a_search_killed_between_its_registry_calls_resumes_to_one_version_and_the_right_aliases(tmp_path, mnist_12k):
    """A champion that fails today's gates (registered with gates of 1%) loses to any
    challenger that clears them. A challenger killed (SIGKILL) right after registering, then
    one killed after moving @champion but before @previous_champion: each resume leaves one
    version, @champion on it, @previous_champion on the one it replaced. Then a challenger that
    compared against a champion which another search replaced meanwhile stays a plain version."""
    store = new_sqlite_store(tmp_path)
    env, client = search_env(store, mnist_12k), mlflow.MlflowClient(store)

    def search(*args: str, fault: str = "") -> subprocess.CompletedProcess:
        faulty = {**env, "SEARCH_FAULT_AT": fault} if fault else env
        return subprocess.run(
            [sys.executable, "-m", "search", *args], cwd=tmp_path, env=faulty, capture_output=True, text=True, timeout=600
        )

    challenger = ("run", *SMALL_SEARCH, "max_trials=1", "robust_size=200")
    weak = search(*challenger, "max_epochs=1", "train_subset=200", "threshold=0.01", "robust_threshold=0.01")
    assert weak.returncode == 0 and "version 1 as @champion" in weak.stdout, weak.stdout[-2000:] + weak.stderr[-2000:]
    for point, version in (("registered", "2"), ("champion_moved", "3")):
        killed = search(*challenger, fault=point)
        assert killed.returncode == -signal.SIGKILL and f"fault point {point}: killed" in killed.stdout, killed.stderr[-2000:]
        assert "comparing with @champion: the figures its own run kept on the same digits" in killed.stdout
        parent = max((r for r in all_runs(store) if "trial_id" not in r.data.tags), key=lambda r: r.info.start_time).info.run_id
        resumed = search("resume", parent)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [str(v.version) for v in client.search_model_versions(f"run_id = '{parent}'")] == [version], point
        aliases = {alias: str(client.get_model_version_by_alias("mnist-cnn", alias).version) for alias in ("champion", "previous_champion")}
        assert aliases == {"champion": version, "previous_champion": "1"}, point
        assert "RUNNING" not in {r.info.status for r in all_runs(store)}
        client.set_registered_model_alias("mnist-cnn", "champion", "1")  # the next challenger meets the weak champion again
    slow = subprocess.Popen(
        [sys.executable, "-m", "search", *challenger],
        cwd=tmp_path,
        env={**env, "SEARCH_FAULT_AT": "compared:pause=5"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in slow.stdout:
        if line.startswith("fault point compared: pausing"):
            client.set_registered_model_alias("mnist-cnn", "champion", "3")  # another search's promotion, meanwhile
            break
    output = slow.communicate(timeout=120)[0]
    assert slow.returncode == 0, output[-3000:]
    assert "registered mnist-cnn version 4; not made @champion: another search made version 3 @champion" in output, output[-3000:]
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "3"
