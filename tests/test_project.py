"""Code tests of the project's own files: environment pins, the MLproject interface, the suite's guards."""

import os
import re
import subprocess
import sys

import pytest
import yaml

from search.cli import build_parser
from tests.helpers import REPO


def pins(lines):
    return dict(
        re.match(r"^\s*-?\s*([A-Za-z0-9_.\[\]-]+)==(\S+)", line).groups()
        for line in lines
        if "==" in line and not line.lstrip().startswith("#")
    )


def test_conda_yaml_and_requirements_pin_the_same_versions():
    requirements = pins((REPO / "requirements.txt").read_text().splitlines())
    conda_pip = yaml.safe_load((REPO / "conda.yaml").read_text())["dependencies"][-1]["pip"]
    assert pins(conda_pip) == requirements
    assert {"tensorflow", "keras-tuner", "tensorboard", "mlflow", "numpy", "matplotlib", "pytest"} <= set(requirements)


def test_every_mlproject_parameter_is_passed_to_a_command_line_flag():
    project = yaml.safe_load((REPO / "MLproject").read_text())
    # The search declares only its profile: every other setting passes through as -P name=value (tests/test_cli.py).
    assert set(project["entry_points"]["main"]["parameters"]) == {"profile"}
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


@pytest.mark.e2e  # a fresh pytest process
def test_a_test_that_leaves_a_dtype_policy_behind_fails(tmp_path):
    """The suite's own guard (conftest's float32_policy), run on a test that leaks bf16."""
    (tmp_path / "test_leak.py").write_text(
        "import keras\n\n"
        "def test_leaks():\n    keras.mixed_precision.set_global_policy('mixed_bfloat16')\n\n"
        "def test_after_it():\n    assert keras.mixed_precision.global_policy().name == 'float32'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(tmp_path / "test_leak.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stdout[-2000:]
    assert "test_leak.py::test_leaks left Keras' global dtype policy at mixed_bfloat16" in done.stdout
    assert "2 passed, 1 error" in done.stdout  # the leak is an error of that test; the next one starts in float32


def test_tests_that_share_a_costly_session_fixture_run_on_one_worker_which_makes_it_once(tmp_path):
    """`make test`'s two pytest-xdist workers, with conftest's grouping, on tests whose fixtures
    count how often each is made: one smoke search and one Ray head node, not one per worker."""
    (tmp_path / "conftest.py").write_text(
        "import os, pytest\n"
        "from tests.conftest import pytest_collection_modifyitems  # the grouping under test\n\n"
        "def made(name):\n"
        "    with open(f'{name}-{os.environ[\"PYTEST_XDIST_WORKER\"]}', 'a') as f:\n"
        "        f.write('made\\n')\n\n"
        "@pytest.fixture(scope='session')\ndef smoke_search():\n    made('smoke_search')\n\n"
        "@pytest.fixture(scope='session')\ndef ray_cluster():\n    made('ray_cluster')\n"
    )
    (tmp_path / "test_shared.py").write_text(
        "import pytest, time\n\n"
        "@pytest.mark.parametrize('i', range(4))\ndef test_smoke(smoke_search, i):\n    time.sleep(0.2)\n\n"
        "@pytest.mark.parametrize('i', range(4))\ndef test_ray(ray_cluster, i):\n    time.sleep(0.2)\n\n"
        "@pytest.mark.parametrize('i', range(8))\ndef test_free(i):\n    time.sleep(0.2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider", "test_shared.py"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    for fixture in ("smoke_search", "ray_cluster"):
        made = [path.read_text().count("made") for path in tmp_path.glob(f"{fixture}-gw*")]
        assert made == [1], f"{fixture} made {made} time(s) per worker"


def imported_modules(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


def test_only_the_tracking_adapter_imports_mlflow_and_it_imports_nothing_else_of_the_project():
    """MLflow is reached through search/tracking/ alone (and the pyfunc shipped inside each model)."""
    sources = [p for folder in ("experiments", "model_zoo", "search") for p in (REPO / folder).rglob("*.py")]
    importers = {str(p.relative_to(REPO)) for p in sources if any(m.split(".")[0] == "mlflow" for m in imported_modules(p))}
    assert {"search/tracking/runs.py", "search/serving/pyfunc_model.py"} <= importers
    assert not [p for p in importers if not p.startswith("search/tracking/") and p != "search/serving/pyfunc_model.py"]
    project = {"experiments", "model_zoo", "search", "benchmarks", "tests"}
    adapter = (REPO / "search" / "tracking").glob("*.py")
    assert not [m for p in adapter for m in imported_modules(p) if m.split(".")[0] in project]  # its own modules are imported relatively


def project_graph() -> dict[str, set[str]]:
    """The project's modules and the project modules each imports (`from search import x` is search.x)."""
    import ast

    def name(path):
        parts = path.relative_to(REPO).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name(p): p for folder in ("experiments", "model_zoo", "search") for p in (REPO / folder).rglob("*.py")}
    graph = {}
    for module, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found |= {n for n in (*(f"{node.module}.{a.name}" for a in node.names), node.module) if n in files}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name in files}
        graph[module] = found - {module, module.rpartition(".")[0]}  # a package's __init__ is not a dependency
    return graph


def test_the_import_graph_has_no_cycles_and_reporting_imports_only_downwards():
    graph = project_graph()
    # A cycle: a module that reaches itself through what it imports.
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            assert module != start, f"{start} imports itself through {sorted(seen)}"
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
    # Figures, pages and progress lines sit below what evaluates, trains and searches.
    for module, imports in graph.items():
        if module.startswith("search.reporting"):
            assert imports <= {"experiments", "search.data"} | {m for m in graph if m.startswith("search.reporting")}, (module, imports)


def test_the_served_pyfunc_does_one_job_and_the_check_of_digits_sits_below_data_and_serving():
    graph = project_graph()
    # What a registered model ships: the pyfunc and the check of digits; nothing else of the project.
    assert graph["search.serving.pyfunc_model"] == {"search.digits"}
    assert graph["search.digits"] == set()
    # The data loader reads digits through that check, not through the serving code.
    assert "search.digits" in graph["search.data"] and not [m for m in graph["search.data"] if m.startswith("search.serving")]
    # Trials run the same lifecycle on either executor; the pipeline gets its executor and names neither.
    assert "search.trial" in graph["search.tuner"] and "search.trial" in graph["search.scaleout"]
    assert "search.scaleout" not in graph["search.pipeline"] and "search.executors" in graph["search.pipeline"]


def test_the_trial_backends_import_neither_the_tuner_nor_each_other():
    """In this process or on Ray, a trial runs through search/trial.py; the backends share
    nothing else, and neither reaches the tuner, which only books what they report."""
    graph = project_graph()
    backends = {"search.in_process", "search.scaleout"}
    for backend in backends:
        assert "search.trial" in graph[backend], backend
        assert not graph[backend] & (backends | {"search.tuner", "search.executors", "search.pipeline"}), (backend, graph[backend])


def test_the_budget_is_read_in_one_module_and_no_private_keras_tuner_api_is_used():
    sources = [p for folder in ("experiments", "model_zoo", "search") for p in (REPO / folder).rglob("*.py")]
    readers = {str(p.relative_to(REPO)) for p in sources if re.search(r"\bbudget_minutes\b", p.read_text())}
    assert readers == {"experiments/__init__.py", "search/budget.py"}
    for path in sources:
        assert not [m for m in imported_modules(path) if m.startswith("keras_tuner.src")], path
        assert not re.search(r"\b(oracle|tuner|hypermodel)\._[a-z]", path.read_text()), path
