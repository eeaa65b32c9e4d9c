"""The search's report and model card (search/assessment.py), as `mlflow run .` on the smoke profile logs them."""

from __future__ import annotations

import re
import subprocess
from importlib import metadata
from pathlib import Path

import mlflow
import pytest

from search.tracking.runs import DESCRIPTION_CUT
from tests.helpers import REPO, all_runs

pytestmark = pytest.mark.e2e


def test_report_is_logged_and_linked(smoke_search):
    store, result = smoke_search
    parent = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags][0]
    client = mlflow.MlflowClient(store)
    files = {Path(a.path).name: a.file_size for a in client.list_artifacts(parent.info.run_id, "report")}
    assert set(files) == {
        "report.html",
        "learning_curves.png",
        "hyperparameters.png",
        "accuracy_vs_cost.png",
        "confusion_matrix.png",
        "misclassified.png",
        "robustness.png",
        "model_card.md",
    }
    assert all(size > 10_000 for name, size in files.items() if name.endswith(".png"))
    page = Path(client.download_artifacts(parent.info.run_id, "report/report.html")).read_text()
    assert page.count("src='data:image/png;base64,") == 6 and "registered mnist-cnn version 1 as @champion" in page
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    title = re.search(r"<h1>(.*)</h1>", page).group(1)
    assert title.startswith(f"MNIST CNN search (smoke profile): run {parent.info.run_id}, 20") and " UTC, commit " in title, title
    assert commit[:12] in title or "commit unknown" in title, title  # the smoke search runs a copy of the project
    assert '<a href="model_card.md">' in page and "recall per digit" in page
    assert not re.search(r"\b0\.\d{4}\b", page.split("<h2>Settings")[0].split("<h2>The winner")[0]), "a fraction in the headline"
    assert f"report: {parent.info.artifact_uri}/report/report.html" in result.stdout
    # It leads with what its reader came for: the decision, the winner, its accuracy, time and machine; the settings last.
    text = re.sub(r"<img[^>]*>", "", page)
    order = [
        text.index(s)
        for s in (
            "Registry decision",
            "Winner",
            "Test accuracy",
            "Held-out kinds of change (gated)",
            "Trained-on kinds of change",
            "Time",
            "Machine",
            "Top trials",
            "Settings",
        )
    ]
    assert order == sorted(order) and "<th>Time</th><td>run " in text
    # Numbers as people read them: no hyperparameter or setting value with more than 4 significant digits.
    values = re.findall(r"[\w/]+=(-?[0-9][0-9.eE+-]*)", text) + re.findall(
        r"<td>(-?\d+\.\d+(?:e-?\d+)?)</td>", text.split("<h2>Settings")[1]
    )
    assert values and all(len(re.sub(r"e.*|[-.]", "", v).strip("0")) <= 4 for v in values), values
    # Progress: a line per trial start and end, and the top trials table.
    assert len(re.findall(r"\] trial \d/3 \(id \d\): family=plain", result.stdout)) == 3
    assert len(re.findall(r"\] trial \d/3 \(id \d\) val_accuracy 0\.\d{4} in \d+s; best so far", result.stdout)) == 3
    assert "top 3 trials" in result.stdout


def test_the_registered_version_carries_its_model_card(smoke_search, monkeypatch):
    store, _ = smoke_search
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    client = mlflow.MlflowClient(store)
    version = client.get_model_version_by_alias("mnist-cnn", "champion")
    parent = client.get_run(version.tags["search_run_id"])
    card = Path(mlflow.artifacts.download_artifacts(f"models:/mnist-cnn/{version.version}")).joinpath("model_card.md").read_text()
    # The description holds what PostgreSQL's column does: the card up to its appendix, at least.
    assert len(version.description) <= 5000 and card.startswith(version.description.removesuffix(DESCRIPTION_CUT))
    assert "## Caveats and recommendations" in version.description
    metrics = parent.data.metrics
    # What it saw, what it is, how well, how fast, where from.
    assert (
        parent.data.params["data_sha256"] in card
        and "| training images | 6,000: the model is the winning trial's checkpoint |" in card  # smoke: no final training
        and "10,000 images, MNIST's test set" in card
        and "again to compare it with the champion" in card  # not "read once"
    )
    for section in ("Model details", "Intended use", "Factors", "Metrics", "Training data", "Evaluation data", "Quantitative analyses"):
        assert f"\n## {section}\n" in card, section  # Mitchell et al.'s sections
    assert "\n## Ethical considerations\n" in card and "\n## Caveats and recommendations\n" in card
    assert f"tensorflow {metadata.version('tensorflow')}" in card and f"mlflow {metadata.version('mlflow')}" in card and "(UTC)" in card
    assert f"The served form ({version.tags['served_form']}): **{100 * metrics['served_test_accuracy']:.2f}%**" in card
    assert (
        f"Expected calibration error of the served form on the test set: **{100 * metrics['served_expected_calibration_error']:.2f}%**"
        in card
    )
    assert 0 <= metrics["served_expected_calibration_error"] < 0.2
    reliability = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="evaluation/reliability.png")
    assert Path(reliability).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "`family`=plain" in card and f"{int(metrics['winner_multiply_adds']):,} multiply-adds per digit" in card
    assert f"**{100 * metrics['test_accuracy']:.2f}%** of 10,000 digits (95% interval " in card
    recall = "| recall |" + "".join(f" {100 * metrics[f'test_recall_digit_{d}']:.2f}% |" for d in range(10))
    assert recall in card
    assert f"held-out kinds (unseen in training, gated): mean **{100 * metrics['robust_heldout_accuracy_mean']:.2f}%**" in card
    assert f"trained-on kinds (training may imitate them): mean {100 * metrics['robust_trained_accuracy_mean']:.2f}%" in card
    assert f"| gaussian_noise | noise | may be imitated | {100 * metrics['robust_accuracy_gaussian_noise']:.2f}% |" in card
    assert f"| inverted | intensity | held out | {100 * metrics['robust_accuracy_inverted']:.2f}% |" in card
    assert f"int8 weights: {100 * metrics['int8_test_accuracy']:.2f}% on the test set" in card
    assert f"{metrics['served_latency_ms_p50']:.2f} ms for one digit (median)" in card and metrics["served_digits_per_second"] > 100
    assert parent.info.run_id in card and "### Known limits" in card
