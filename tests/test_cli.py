"""Code tests of `python -m search`: bad input is one line on stderr, exit 2, no run left behind."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest

from search.cli import main
from tests.conftest import REPO, write_npz


def bad_inputs(tmp_path):
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("not arrays")
    return {
        "unknown profile": (["--profile", "huge"], "unknown profile 'huge': choose one of default, smoke"),
        "unknown tuner": (["--tuner", "grid"], "unknown tuner 'grid': choose one of hyperband, bayesian, random"),
        "negative max_trials": (["--max-trials", "-2"], "max_trials must be a positive integer, got -2"),
        "negative max_epochs": (["--max-epochs", "-1"], "max_epochs must be a positive integer, got -1"),
        "threshold above 1": (["--threshold", "1.5"], "threshold must be in (0, 1], got 1.5"),
        "missing data file": (["--data", str(tmp_path / "none.npz")], f"{tmp_path / 'none.npz'}: no such file"),
        "not an npz": (["--data", str(not_npz)], f"{not_npz}: not a readable .npz file"),
        "labels outside 0..9": (
            ["--data", str(write_npz(tmp_path / "labels.npz", y_test=[0, 11] * 20))],
            "y_test has labels outside 0..9",
        ),
    }


@pytest.mark.parametrize(
    "case",
    ["unknown profile", "unknown tuner", "negative max_trials", "negative max_epochs", "threshold above 1", "missing data file", "not an npz", "labels outside 0..9"],
)
def test_bad_input_is_one_line_exit_2_and_no_run(case, tmp_path, tracking_store, capsys):
    argv, message = bad_inputs(tmp_path)[case]
    assert main(["run", "--profile", "smoke", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {err.removeprefix('error: ')}" and "\n" not in err
    assert message in err
    assert mlflow.search_runs(search_all_experiments=True, output_format="list") == []


def test_traceback_only_when_asked(tmp_path, tracking_store):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-m", "search", "run", "--data", str(tmp_path / "none.npz")]
    quiet = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'none.npz'}: no such file"
    assert "Traceback" not in quiet.stderr
    debug = subprocess.run(args, env={**env, "SEARCH_DEBUG": "1"}, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
