"""Helpers the tests share: small data files, a fresh copy of the project, `mlflow run`,
MLflow servers on a free local port, and REST calls to a served model."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-token-value"  # in the environment of the smoke search; must not reach the store
PROJECT_FILES = ("MLproject", "conda.yaml", "requirements.txt", "experiments", "model_zoo", "search")


def write_npz(path: Path, n_train: int = 120, n_test: int = 40, seed: int = 0, **replace) -> Path:
    """A small MNIST-layout .npz of random digits; `replace` swaps in bad arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": (np.arange(n_train) % 10).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": (np.arange(n_test) % 10).astype(np.uint8),
    }
    arrays.update(replace)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def mnist_subset(path: Path, source: Path, n_train: int, n_test: int) -> Path:
    """The first `n_train` training and `n_test` test digits of the real MNIST file, as an .npz of MNIST's layout."""
    with np.load(source) as d:
        np.savez(
            path, x_train=d["x_train"][:n_train], y_train=d["y_train"][:n_train], x_test=d["x_test"][:n_test], y_test=d["y_test"][:n_test]
        )
    return path


# A small search of the digits `mnist_12k` holds: 4 trials of two narrow convolution blocks on
# 3,000 digits, each a second or two, validated on 2,000, whose model clears a gate of 80%.
SMALL_SEARCH_TRIALS = 4
SMALL_SEARCH = (
    "--profile",
    "smoke",
    f"max_trials={SMALL_SEARCH_TRIALS}",
    "train_subset=3000",
    "validation_size=2000",
    "robust_size=500",
    "threshold=0.8",
    "fixed=head=flatten,learning_rate=0.003,conv_blocks=2,conv_filters_0=16,conv_filters_1=32,kernel_size=3",
)
# Added after SMALL_SEARCH by a test that acts on a trial it saw running (a kill, a full disk):
# the blocks' widths and kernel drawn too, trials of several seconds, so that the trial still
# runs seconds after it was seen.
LONG_TRIALS = "fixed=head=flatten,learning_rate=0.003,conv_blocks=2"

MLFLOW_RUN_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")


def mlflow_run(project: Path, store: str, mnist_npz: Path, *params: str) -> subprocess.CompletedProcess:
    """`mlflow run <project> --env-manager local -P ...` with this test's python first on PATH."""
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": store,
        "MNIST_NPZ": str(mnist_npz),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "DATABASE_PASSWORD": SECRET,
    }
    for var in MLFLOW_RUN_ENV:
        env.pop(var, None)
    args = [sys.executable, "-m", "mlflow", "run", str(project), "--env-manager", "local"]
    for param in params:
        args += ["-P", param]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)


def fresh_project(tmp_path: Path) -> Path:
    """A copy of the project's files, as a fresh checkout has them (no outputs, no store)."""
    project = tmp_path / "project"
    project.mkdir()
    for name in PROJECT_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, project / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, project / name)
    return project


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_listening(
    args: list[str], probe: str, cwd: Path, env: dict | None = None, timeout_s: float = 180, module: str = "mlflow"
) -> Iterator[str]:
    """`python -m <module> <args> --host 127.0.0.1 --port <free port>`, yielding its base URL once
    GET `probe` answers; stopped afterwards."""
    port = free_port()
    env = {**os.environ, **(env or {}), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log_path = cwd / f"mlflow-{port}.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", module, *args, "--host", "127.0.0.1", "--port", str(port)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                urllib.request.urlopen(url + probe, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"{module} {args[0]} did not answer in {timeout_s:.0f} s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def rest_predictions(url: str, digits: np.ndarray) -> dict:
    """POST `digits` to a served model's /invocations; its answer (one record per digit) as
    arrays: `digit` (N,) and `probabilities` (N, 10)."""
    import json

    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps({"inputs": digits.tolist()}).encode(), headers={"Content-Type": "application/json"}
    )
    records = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    probabilities = [[record[f"probability_{d}"] for d in range(10)] for record in records]
    return {"digit": np.array([record["digit"] for record in records]), "probabilities": np.array(probabilities)}


_STORE_TEMPLATE: list[Path] = []  # the store new_sqlite_store copies, made once per test process


def new_sqlite_store(folder: Path) -> str:
    """A new sqlite tracking store, `folder/mlflow.db`, as a URI: a copy of one MLflow created
    (its schema migrated) once per test process, which costs seconds each time."""
    if not _STORE_TEMPLATE:
        import atexit

        import mlflow

        template = Path(tempfile.mkdtemp(prefix="mlflow-store-")) / "mlflow.db"
        mlflow.MlflowClient(f"sqlite:///{template}").search_experiments()
        atexit.register(shutil.rmtree, template.parent, True)
        _STORE_TEMPLATE.append(template)
    shutil.copy(_STORE_TEMPLATE[0], folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


def all_runs(store: str) -> list:
    """Every run of every experiment in `store`."""
    import mlflow

    client = mlflow.MlflowClient(store)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
