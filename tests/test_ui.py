"""The MLflow UI, checked in a real browser (Debian's chromium driven by Playwright).

A real `mlflow server` on a free loopback port serves the store a smoke search
filled; the test finds the search run, expands it to its trial runs, and opens
report.html among its artifacts. Screenshots go to test-outputs/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from playwright.sync_api import sync_playwright

from tests.helpers import REPO, mlflow_listening

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No background traffic: this machine reaches nothing but loopback.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = REPO / "test-outputs"


@pytest.fixture
def ui(smoke_search, tmp_path):
    """The base URL of an `mlflow server` over the smoke search's store."""
    store, _ = smoke_search
    with mlflow_listening(["server", "--backend-store-uri", store, "--workers", "1"], "/health", tmp_path) as url:
        yield url


def test_search_run_trials_and_report_are_in_the_ui(ui, smoke_search):
    assert Path(CHROMIUM).is_file(), "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    store, _ = smoke_search
    client = mlflow.MlflowClient(store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    experiment = parent.info.experiment_id
    SCREENSHOTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        # Wide enough for the runs table's Dataset and Models columns beside MLflow's assistant panel.
        page = browser.new_page(viewport={"width": 2200, "height": 1000})
        page.goto(f"{ui}/#/experiments/{experiment}/runs?workflowType=machine_learning")
        search_link = page.get_by_role("link", name=parent.info.run_name)
        search_link.wait_for(timeout=60_000)
        # Nested runs are folded under their parent: unfold them.
        page.locator("[role=row]", has=search_link).locator("button[data-component-id*='runnamecellrenderer']").click()
        for name in trials:
            page.get_by_role("link", name=name, exact=True).wait_for(timeout=30_000)
        # The Dataset and Models columns: the data as the runs' input, the registered model the search logged.
        page.get_by_text(f"mnist ({parent.data.params['data_sha256'][:16]})", exact=True).first.wait_for(timeout=30_000)
        page.get_by_text("mnist-cnn", exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-runs.png"))

        page.goto(f"{ui}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts")
        folder = page.get_by_text("report", exact=True).first
        folder.wait_for(timeout=60_000)
        folder.click()
        page.get_by_text("report.html", exact=True).click()
        # The UI previews the page itself, in an iframe.
        page.frame_locator("iframe").get_by_text("Registry decision", exact=True).wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-report.png"))

        # The compare view of the trial runs: their parameters against val_accuracy.
        trial_ids = [r.info.run_id for r in runs if "mlflow.parentRunId" in r.data.tags]
        page.goto(f"{ui}/#/compare-runs?runs={json.dumps(trial_ids)}&experiments={json.dumps([experiment])}")
        page.get_by_text("best_val_accuracy").first.wait_for(timeout=60_000)
        page.get_by_text("conv_filters_0").first.wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-compare.png"))
        # Its table: each trial's parameters, and val_accuracy below them.
        page.get_by_text("val_accuracy", exact=True).first.scroll_into_view_if_needed()
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-compare-table.png"))

        # The registered model: its champion alias, and the version's tags and model card.
        page.goto(f"{ui}/#/models/mnist-cnn")
        page.get_by_text("champion").first.wait_for(timeout=60_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-model.png"))
        page.goto(f"{ui}/#/models/mnist-cnn/versions/1")
        page.get_by_text("Model card: MNIST digit classifier").first.wait_for(timeout=60_000)
        page.get_by_text("robust_heldout_accuracy_mean").first.wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-model-version.png"), full_page=True)
        browser.close()
    assert len(trials) == 3
    for name in (
        "mlflow-ui-runs.png",
        "mlflow-ui-report.png",
        "mlflow-ui-compare.png",
        "mlflow-ui-compare-table.png",
        "mlflow-ui-model.png",
        "mlflow-ui-model-version.png",
    ):
        assert (SCREENSHOTS / name).stat().st_size > 20_000
