"""Fixtures: the real MNIST file, a private tracking store per test, the Keras dtype
policy, and one smoke search shared by the end-to-end tests. Helpers are in tests/helpers.py."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import MLFLOW_RUN_ENV, REPO, fresh_project, mlflow_run

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out of test logs


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


@pytest.fixture
def tracking_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh sqlite tracking store in this test's own directory, which is also the cwd
    (so artifacts, outputs/ and tuner directories land there too)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
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
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    result = mlflow_run(fresh_project(tmp), store, mnist_npz, "profile=smoke")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return store, result
