"""notebooks/mnist_pipeline.ipynb: committed without outputs, and run top to bottom with a real
kernel (a real smoke search) against a private tracking store and output directory."""

from __future__ import annotations

import shutil
import time

import nbformat
import pytest

from tests.helpers import REPO, fresh_project, new_sqlite_store

NOTEBOOK = REPO / "notebooks" / "mnist_pipeline.ipynb"


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert 'PROFILE = "smoke"' in code[0].source  # one variable switches the search


def sections(notebook) -> dict[str, list]:
    """Each '## ' section's code cells' outputs."""
    found, current = {}, "introduction"
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            current = cell.source.splitlines()[0].removeprefix("## ")
            found[current] = []
        elif cell.cell_type == "code":
            found.setdefault(current, []).extend(cell.outputs)
    return found


def shows(outputs: list, kind: str) -> bool:
    return any(kind in output.get("data", {}) for output in outputs)


def printed(outputs: list) -> str:
    return "".join(output.get("text", "") for output in outputs if output.get("output_type") == "stream")


@pytest.mark.e2e
def test_the_notebook_runs_top_to_bottom_and_every_section_shows_its_figure_or_table(tmp_path, monkeypatch, mnist_npz):
    from nbclient import NotebookClient

    project = fresh_project(tmp_path)  # the kernel keeps its runs, models and figures in this copy
    shutil.copytree(REPO / "tests" / "fixtures" / "digits", project / "tests" / "fixtures" / "digits")
    (project / "notebooks").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", new_sqlite_store(project))
    monkeypatch.setenv("MNIST_NPZ", str(mnist_npz))
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    started = time.monotonic()
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(project / "notebooks")}}).execute()
    print(f"the notebook ran in {time.monotonic() - started:.0f} s")  # a failing cell raises CellExecutionError above
    nbformat.write(notebook, tmp_path / "executed.ipynb")

    found = sections(notebook)
    data, eda, search, evaluation, prediction, limits = (found[name] for name in list(found)[1:7])
    assert shows(data, "text/html") and "DataError: " in printed(data) and "labels" in printed(data)
    assert sum(shows([o], "image/png") for o in eda) == 2
    assert shows(search, "text/html") and shows(search, "image/png") and "registered mnist-cnn version 1 as @champion" in printed(search)
    assert "test accuracy" in printed(evaluation) and sum(shows([o], "image/png") for o in evaluation) == 2
    assert shows(evaluation, "text/markdown")  # the model card
    assert sum(shows([o], "image/png") for o in prediction) == 2
    assert shows(limits, "text/markdown")
    assert (project / "outputs" / "notebook" / "sample_digits.png").is_file() and not (REPO / "notebooks" / "mlruns").exists()
