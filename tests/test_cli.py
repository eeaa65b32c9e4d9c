"""Code tests of `python -m search`: bad input is one line on stderr, exit 2, no run left RUNNING."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from search.cli import main
from tests.conftest import REPO, free_port, write_npz


def bad_input(case: str, tmp_path) -> tuple[list[str], str]:
    """The command-line arguments of a bad-input case, and the message it must print."""
    npz = tmp_path / "bad.npz"
    if case == "data path missing":
        return ["--data", str(tmp_path / "none.npz")], f"{tmp_path / 'none.npz'}: no such file"
    if case == "not an npz":
        npz.write_text("not arrays")
        return ["--data", str(npz)], f"{npz}: not a readable .npz file"
    data_cases = {
        "npz missing a key": (dict(y_train=None), "missing key(s) y_train"),
        "wrong image shape": (dict(x_test=np.zeros((40, 28, 27), np.uint8)), "x_test must have shape (N, 28, 28) or (N, 28, 28, 1), got (40, 28, 27)"),
        "labels outside 0..9": (dict(y_test=np.full(40, 12, np.uint8)), "y_test has labels outside 0..9 (min 12, max 12)"),
        "images and labels of different length": (dict(y_test=np.zeros(39, np.uint8)), "x_test has 40 images but y_test has 39 labels"),
        "NaN in float images": (dict(x_train=np.full((120, 28, 28), np.nan, np.float32)), "x_train has 94080 NaN or infinite pixel(s)"),
        "empty split": (dict(x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.uint8)), "x_test is empty"),
    }
    if case in data_cases:
        replace, message = data_cases[case]
        return ["--data", str(write_npz(npz, **replace))], f"{npz}: {message}"
    return {
        "threshold above 1": (["--threshold", "1.5"], "threshold must be in (0, 1], got 1.5"),
        "threshold below 0": (["--threshold", "-0.5"], "threshold must be in (0, 1], got -0.5"),
        "unknown profile": (["--profile", "huge"], "unknown profile 'huge': choose one of default, fast, thorough, smoke"),
        "unknown tuner": (["--tuner", "grid"], "unknown tuner 'grid': choose one of hyperband, bayesian, random"),
        "unknown model family": (["--families", "plain,resnet"], "unknown model family 'resnet': choose one of plain, batchnorm"),
        "negative max_trials": (["--max-trials", "-2"], "max_trials must be a positive integer, got -2"),
        "negative max_epochs": (["--max-epochs", "-1"], "max_epochs must be a positive integer, got -1"),
        "unreachable tracking server": ([], "is unreachable"),
    }[case]


CASES = [
    "data path missing", "not an npz", "npz missing a key", "wrong image shape", "labels outside 0..9",
    "images and labels of different length", "NaN in float images", "empty split", "threshold above 1",
    "threshold below 0", "unknown profile", "unknown tuner", "unknown model family", "negative max_trials",
    "negative max_epochs", "unreachable tracking server",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_no_run_left_running(case, tmp_path, tracking_store, mnist_npz, monkeypatch, capsys):
    argv, message = bad_input(case, tmp_path)
    if case == "unreachable tracking server":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MNIST_NPZ", str(mnist_npz))
    started = time.monotonic()
    assert main(["run", "--profile", "smoke", *argv]) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert message in err
    if case != "unreachable tracking server":
        assert "RUNNING" not in {r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}


def test_traceback_only_when_asked(tmp_path, tracking_store):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # as a user's shell has it
    args = [sys.executable, "-m", "search", "run", "--data", str(tmp_path / "none.npz")]
    quiet = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr == f"error: {tmp_path / 'none.npz'}: no such file\n"
    assert "Traceback" not in quiet.stderr
    debug = subprocess.run(args, env={**env, "SEARCH_DEBUG": "1"}, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
