"""Code tests of the project's own files: environment pins and the MLproject interface."""

import re

import yaml

from search.cli import build_parser
from tests.conftest import REPO


def pins(lines):
    return dict(re.match(r"^\s*-?\s*([A-Za-z0-9_.\[\]-]+)==(\S+)", line).groups() for line in lines if "==" in line and not line.lstrip().startswith("#"))


def test_conda_yaml_and_requirements_pin_the_same_versions():
    requirements = pins((REPO / "requirements.txt").read_text().splitlines())
    conda_pip = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"][-1]["pip"]
    assert pins(conda_pip) == requirements
    assert {"tensorflow", "keras-tuner", "tensorboard", "mlflow", "numpy", "matplotlib", "pytest"} <= set(requirements)


def test_every_mlproject_parameter_is_passed_to_a_command_line_flag():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    main = project["entry_points"]["main"]
    assert set(main["parameters"]) == {"profile", "tuner", "max_trials", "max_epochs", "threshold", "model_name", "data", "seed", "families", "fixed"}
    subcommands = build_parser()._subparsers._group_actions[0].choices
    for entry in project["entry_points"].values():
        subcommand = entry["command"].split()[3]  # python -m search <subcommand> ...
        flags = {option for action in subcommands[subcommand]._actions for option in action.option_strings}
        for name in entry.get("parameters", {}):
            assert f"--{name.replace('_', '-')} {{{name}}}" in entry["command"]
            assert f"--{name.replace('_', '-')}" in flags


def test_run_outputs_are_ignored_by_git():
    ignored = (REPO / ".gitignore").read_text().split()
    assert {"mlflow.db", "mlruns/", "outputs/", "*.npz", "*.keras"} <= set(ignored)
