"""Code tests of `python -m search`: bad input is one line on stderr, exit 2, no run left RUNNING."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest

from experiments import FAMILIES, TUNERS
from search.cli import main
from tests.helpers import REPO, free_port, write_npz


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
        "wrong image shape": (
            dict(x_test=np.zeros((40, 28, 27), np.uint8)),
            "x_test must have shape (N, 28, 28) or (N, 28, 28, 1), got (40, 28, 27)",
        ),
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
        "unknown tuner": (["--tuner", "annealing"], "unknown tuner 'annealing': choose one of " + ", ".join(TUNERS)),
        "unknown model family": (["--families", "plain,resnet"], "unknown model family 'resnet': choose one of " + ", ".join(FAMILIES)),
        "negative max_trials": (["--max-trials", "-2"], "max_trials must be a positive integer, got -2"),
        "negative max_epochs": (["--max-epochs", "-1"], "max_epochs must be a positive integer, got -1"),
        "unreachable tracking server": ([], "is unreachable"),
        "Ray cluster that does not answer": (["--ray", "127.0.0.1:1"], "Ray cluster 127.0.0.1:1 does not answer (Connection refused)"),
        "output_dir that cannot be written": (
            [f"output_dir={write_npz(npz)}/outputs"],
            f"output_dir {npz}/outputs: cannot be written (Not a directory)",
        ),
        "pin of a hyperparameter not searched": (["fixed=width=3"], "fixed hyperparameter 'width' is not in the search space"),
        "pin the model cannot be built with": (
            ["fixed=head=foo"],
            "fixed hyperparameters head=foo cannot build a model: unknown head 'foo'",
        ),
        "pin that is not a number": (["fixed=learning_rate=nan"], "fixed hyperparameter learning_rate=nan is not a finite number"),
        "pin of a whole number that is not whole": (
            ["fixed=conv_blocks=2.5"],
            "fixed hyperparameter conv_blocks=2.5 is not a whole number",
        ),
        "NaN setting": (["max_trials=nan"], "setting max_trials: 'nan' is not a finite number"),
        "infinite budget": (["budget_minutes=inf"], "setting budget_minutes: 'inf' is not a finite number"),
        "model name the registry refuses": (["model_name=team/mnist"], "model_name 'team/mnist' cannot be a registered model's name"),
        "alias the registry reserves": (["champion_alias=latest"], "champion_alias 'latest' cannot be an alias"),
        "data path a directory": (["--data", str(tmp_path)], f"{tmp_path}: a directory, not an .npz file"),
    }[case]


CASES = [
    "data path missing", "not an npz", "npz missing a key", "wrong image shape", "labels outside 0..9",
    "images and labels of different length", "NaN in float images", "empty split", "threshold above 1",
    "threshold below 0", "unknown profile", "unknown tuner", "unknown model family", "negative max_trials",
    "negative max_epochs", "unreachable tracking server", "Ray cluster that does not answer", "output_dir that cannot be written",
    "pin of a hyperparameter not searched", "pin the model cannot be built with", "pin that is not a number",
    "pin of a whole number that is not whole", "NaN setting", "infinite budget", "model name the registry refuses",
    "alias the registry reserves", "data path a directory",
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


@pytest.mark.e2e  # two fresh processes of the command line
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


# A value other than the default (and than any profile's) for every setting, as text.
EVERY_SETTING = {
    "tuner": "bayesian", "families": "residual,plain", "fixed": "", "objective": "val_accuracy", "max_trials": "5", "max_epochs": "3",
    "hyperband_factor": "2", "early_stopping_patience": "0", "prune": "false", "prune_min_trials": "4", "prune_grace_epochs": "2",
    "trial_schedule": "false", "validation_size": "5000", "train_subset": "0", "batch_size": "64", "precision": "float32",
    "winner_within_se": "2", "final_epochs": "0", "final_learning_rate": "0.001", "budget_minutes": "2.5", "final_models": "3",
    "augment": "jitter", "serve_int8": "false", "int8_max_accuracy_drop": "0.5", "threshold": "0.5", "robust_threshold": "0.25",
    "robust_size": "100", "model_name": "digits", "champion_alias": "best", "experiment_name": "mine", "seed": "0", "data": "x.npz",
    "output_dir": "out", "ray": "auto", "parallel_trials": "3", "cpus_per_trial": "2", "trial_retries": "0",
    "clean_final_epochs": "3", "tracking_wait_s": "30", "search_share": "0.5", "min_final_epochs": "3",
}  # fmt: skip


def test_every_setting_reaches_the_config_from_the_command_line_and_from_mlflow_run():
    from mlflow.projects.utils import load_project

    from experiments import SETTINGS, parse_setting, resolve
    from search.cli import _config, build_parser

    assert set(EVERY_SETTING) == set(SETTINGS), "a setting without a round-trip value here"
    expected = resolve("fast", **{name: parse_setting(name, text) for name, text in EVERY_SETTING.items()})
    assert expected.seed == 0 and expected.fixed == () and expected.final_epochs == 0  # values that used to mean "the profile's"
    parse = lambda argv: _config(build_parser().parse_args(argv))  # noqa: E731
    assert parse(["run", "--profile", "fast", *(f"{k}={v}" for k, v in EVERY_SETTING.items())]) == expected
    assert (
        parse(["run", "--profile", "fast", *(arg for k, v in EVERY_SETTING.items() for arg in (f"--{k.replace('_', '-')}", v))]) == expected
    )
    # What `mlflow run . -P profile=fast -P name=value ...` runs: MLflow builds the command line.
    command = load_project(str(REPO)).get_entry_point("main").compute_command({"profile": "fast", **EVERY_SETTING}, None)
    argv = __import__("shlex").split(command)
    assert argv[:4] == ["python", "-m", "search", "run"]
    assert parse(argv[3:]) == expected
    # Not given: the profile's value.
    assert parse(["run", "--profile", "fast"]) == resolve("fast")
    # --ray alone: a Ray cluster started by the search.
    assert parse(["run", "--ray"]).ray == "local" and parse(["run", "--ray", "auto"]).ray == "auto"
    assert (parse(["run", "--ray", "parallel_trials=2", "seed=0"]).ray, parse(["run", "--ray", "parallel_trials=2"]).parallel_trials) == (
        "local",
        2,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["seed"], "'seed' is not a setting of the form name=value"),
        (["width=3"], "unknown setting(s) width"),
        (["--seed", "zero"], "setting seed: 'zero' is not a number"),
    ],
)
def test_a_bad_setting_on_the_command_line_is_one_line_and_exit_2(argv, message, tracking_store, capsys):
    assert main(["run", "--profile", "smoke", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


MLFLOW_LOG_LINE = "20"  # MLflow's own INFO lines (creating a new store) start with the year


def test_resuming_a_search_that_stopped_before_logging_its_settings_marks_it_killed(tracking_store, capsys):
    """Killed at its very start, a search has nothing to continue: resume says so and ends the run."""
    client = mlflow.MlflowClient()
    run = client.create_run(client.create_experiment("killed-at-start"), tags={"command": "search"})
    assert main(["resume", run.info.run_id]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(MLFLOW_LOG_LINE)]
    message = (
        f"error: search run {run.info.run_id} stopped before it logged its settings: nothing to continue, marked KILLED; start a new search"
    )
    assert errors == [message]
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def resume_case(case: str, client: mlflow.MlflowClient) -> tuple[str, str]:
    """A run id to resume that cannot be resumed, and the message naming why."""
    from experiments import resolve, to_params

    experiment = client.create_experiment("other-project")
    if case == "no such run":
        missing = "0123456789abcdef0123456789abcdef"
        return missing, f"no run '{missing}' in the tracking store {mlflow.get_tracking_uri()}"
    if case == "another experiment's run":
        run = client.create_run(experiment)
        return run.info.run_id, f"run {run.info.run_id} (experiment 'other-project') is not a search run: nothing to resume"
    search = client.create_run(experiment, tags={"command": "search"})
    if case == "a trial run":
        trial = client.create_run(experiment, tags={"mlflow.parentRunId": search.info.run_id, "trial_id": "0"})
        return trial.info.run_id, f"run {trial.info.run_id} is a trial run; resume its search run {search.info.run_id}"
    if case == "a finished search":
        client.set_tag(search.info.run_id, "registry_decision", "registered version 1 as champion")
        return search.info.run_id, f"search run {search.info.run_id} has already finished: registered version 1 as champion"
    for name, value in to_params(resolve("smoke")).items():  # "from another directory": no outputs here
        client.log_param(search.info.run_id, name, value)
    folder = __import__("pathlib").Path("outputs") / search.info.run_id
    return search.info.run_id, f"no outputs of search run {search.info.run_id} at {folder}: resume from the directory the search ran in"


@pytest.mark.parametrize("case", ["no such run", "another experiment's run", "a trial run", "a finished search", "another directory"])
def test_a_run_that_cannot_be_resumed_is_one_line_exit_2_and_left_as_it_was(case, tracking_store, capsys):
    client = mlflow.MlflowClient()
    run_id, message = resume_case(case, client)
    before = {r.info.run_id: r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    assert main(["resume", run_id]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith(MLFLOW_LOG_LINE)]
    assert errors == [f"error: {message}"]
    assert {r.info.run_id: r.info.status for r in mlflow.search_runs(search_all_experiments=True, output_format="list")} == before
