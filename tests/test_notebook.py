"""notebooks/mnist_pipeline.ipynb: committed without outputs, and run top to bottom with a real
kernel (a real smoke search) against a private tracking store and output directory."""

from __future__ import annotations

import os
import shutil
import time

import mlflow
import nbformat
import pytest

from tests.helpers import REPO, fresh_project, new_sqlite_store

NOTEBOOK = REPO / "notebooks" / "mnist_pipeline.ipynb"
# The sections of the story besides the numbered stages (data, analysis, model, evaluation, prediction, limits).
SEED_SECTIONS = ["Jupyter Notebook Structure", "Libraries and Modules", "Unfixed bugs", "Conclusions", "Acknowledgements and References"]


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


def displayed(outputs: list) -> str:
    return "".join(str(output.get("data", {})) for output in outputs)


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
    assert [name for name in found if not name[0].isdigit() and name != "introduction"] == SEED_SECTIONS
    data, eda, search, evaluation, prediction, limits = (found[name] for name in found if name[0].isdigit())
    assert shows(data, "text/html") and "DataError: " in printed(data) and "labels" in printed(data)
    assert sum(shows([o], "image/png") for o in eda) == 2
    assert shows(search, "text/html") and "registered mnist-cnn-notebook version 1 as @champion" in printed(search)
    assert sum(shows([o], "image/png") for o in search) == 2  # the trials, their learning curves
    assert "conv_filters_0" in displayed(search) and "Total params" in displayed(search)  # the space, the winner's summary
    assert "test accuracy" in printed(evaluation) and sum(shows([o], "image/png") for o in evaluation) == 3
    assert shows(evaluation, "text/markdown")  # the model card
    assert sum(shows([o], "image/png") for o in prediction) == 2
    assert shows(limits, "text/markdown")

    # The conclusion states the result this run measured, against the 90% goal.
    store = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    [search_run] = [r for r in store.search_runs([e.experiment_id for e in store.search_experiments()]) if "trial_id" not in r.data.tags]
    measured = search_run.data.metrics
    conclusion = printed(found["Conclusions"])
    assert f"test {measured['test_accuracy']:.2%}, held-out changes {measured['robust_heldout_accuracy_mean']:.2%}" in conclusion, (
        conclusion
    )
    assert ("does not meet" in conclusion) == (min(measured["test_accuracy"], measured["robust_heldout_accuracy_mean"]) < 0.9), conclusion
    assert (project / "outputs" / "notebook" / "sample_digits.png").is_file() and not (REPO / "notebooks" / "mlruns").exists()
