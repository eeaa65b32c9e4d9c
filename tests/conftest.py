"""Fixtures: the real MNIST file, a private tracking store per test, the Keras dtype
policy, one smoke search shared by the end-to-end tests, and one Ray head node for the tests that ask for one;
the tests that share these on one pytest-xdist worker. Helpers are in tests/helpers.py."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import MLFLOW_RUN_ENV, REPO, free_port, fresh_project, mlflow_run, mnist_subset, new_sqlite_store

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of test logs


# `make test` spreads the tests over pytest-xdist workers (--dist loadgroup). Tests that share
# one of these costly session fixtures stay on one worker, which makes it once.
SHARED_ON_ONE_WORKER = ("smoke_search", "ray_cluster")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups into the tests' ids
def pytest_collection_modifyitems(items):
    for item in items:
        shared = [name for name in SHARED_ON_ONE_WORKER if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


@pytest.fixture(autouse=True)
def float32_policy(request):
    """Every test starts under Keras' float32 policy, and one that leaves another
    policy behind fails (and the policy is put back, so the next test is not hit)."""
    import keras

    assert keras.mixed_precision.global_policy().name == "float32", "a test started under a Keras dtype policy other than float32"
    yield
    left = keras.mixed_precision.global_policy().name
    if left != "float32":
        keras.mixed_precision.set_global_policy("float32")
        pytest.fail(f"{request.node.nodeid} left Keras' global dtype policy at {left}")


@pytest.fixture(params=["float32", "mixed_bfloat16"])
def dtype_policy(request) -> Iterator[str]:
    """The test runs under each Keras dtype policy in turn (bf16 runs on any x86 CPU,
    slowly where it is not native), and the policy is put back after it."""
    from model_zoo import precision_policy

    with precision_policy(request.param):
        yield request.param


@pytest.fixture(scope="session")
def mnist_npz() -> Path:
    """The offline MNIST copy: $MNIST_NPZ, else ../shared/data/mnist.npz beside the repository."""
    path = Path(os.environ.get("MNIST_NPZ", REPO.parent / "shared" / "data" / "mnist.npz")).resolve()
    if not path.is_file():
        pytest.fail(f"MNIST file not found at {path}: set MNIST_NPZ (see README.md)")
    return path


@pytest.fixture(scope="session")
def mnist(mnist_npz):
    """The real MNIST, loaded, validated and split once (54,000 / 6,000 / 10,000)."""
    from search.data import load_mnist

    return load_mnist(str(mnist_npz))


@pytest.fixture(scope="session")
def mnist_12k(mnist_npz, tmp_path_factory) -> Path:
    """The first 12,000 training and 2,000 test digits of MNIST, as an .npz of its layout:
    quick to load and evaluate, for searches whose point is not the full data (SMALL_SEARCH)."""
    return mnist_subset(tmp_path_factory.mktemp("mnist-12k") / "mnist-12k.npz", mnist_npz, n_train=12_000, n_test=2_000)


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh sqlite tracking store in this test's own directory, which is also the cwd
    (so artifacts, outputs/ and tuner directories land there too)."""
    uri = new_sqlite_store(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    yield uri
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID: keep it from reaching later tests' processes.
    for var in MLFLOW_RUN_ENV:
        os.environ.pop(var, None)


@pytest.fixture(scope="session")
def smoke_search(tmp_path_factory, mnist_npz):
    """One smoke search through `mlflow run`, shared by the end-to-end and UI tests: (store, result)."""
    tmp = tmp_path_factory.mktemp("smoke")
    store = new_sqlite_store(tmp)
    result = mlflow_run(fresh_project(tmp), store, mnist_npz, "profile=smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return store, result


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> dict[str, str]:
    """A Ray head node of 2 CPUs on 127.0.0.1 (`ray start --head --block`), its files in a
    temporary directory, with token authentication and a token of its own: the
    environment that joins it (RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN). Killed with the session."""
    folder = tmp_path_factory.mktemp("ray")
    port = free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {**os.environ, **auth}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1"]
    command += ["--port", str(port), "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", str(folder)]
    log = (folder / "ray.log").open("w")
    head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    status = [str(Path(sys.executable).parent / "ray"), "status", "--address", address]
    while subprocess.run(status, capture_output=True, env=env).returncode:
        assert head.poll() is None and time.monotonic() < deadline, (folder / "ray.log").read_text()[-3000:]
        time.sleep(1)
    yield {"RAY_ADDRESS": address, **auth}
    # The head's processes share its process group, and its workers exit with their raylet. Its
    # files are temporary: a graceful stop (SIGTERM) would only spend half a minute on them.
    os.killpg(head.pid, signal.SIGKILL)
    head.wait(timeout=60)
    log.close()
