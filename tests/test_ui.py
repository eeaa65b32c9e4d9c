"""The MLflow UI, checked in a real browser (Debian's chromium driven by Playwright).

A real `mlflow server` on a free loopback port serves the store a smoke search
filled; the test finds the search run, expands it to its trial runs, and opens
report.html among its artifacts. Screenshots go to test-outputs/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from playwright.sync_api import sync_playwright

from tests.conftest import REPO
from tests.test_cli import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# No background traffic: this machine reaches nothing but loopback.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "test-outputs"


@pytest.fixture
def ui(smoke_search, tmp_path):
    """The base URL of an `mlflow server` over the smoke search's store."""
    store, _ = smoke_search
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            assert time.monotonic() < deadline, "mlflow server did not start in 120 s"
            time.sleep(0.5)
    yield url
    server.terminate()
    server.wait(timeout=30)


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
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{ui}/#/experiments/{experiment}/runs?workflowType=machine_learning")
        search_link = page.get_by_role("link", name=parent.info.run_name)
        search_link.wait_for(timeout=60_000)
        # Nested runs are folded under their parent: unfold them.
        page.locator("[role=row]", has=search_link).locator("button[data-component-id*='runnamecellrenderer']").click()
        for name in trials:
            page.get_by_role("link", name=name, exact=True).wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-runs.png"))

        page.goto(f"{ui}/#/experiments/{experiment}/runs/{parent.info.run_id}/artifacts")
        folder = page.get_by_text("report", exact=True).first
        folder.wait_for(timeout=60_000)
        folder.click()
        page.get_by_text("report.html", exact=True).click()
        # The UI previews the page itself, in an iframe.
        page.frame_locator("iframe").get_by_text("Registry decision:").wait_for(timeout=30_000)
        page.screenshot(path=str(SCREENSHOTS / "mlflow-ui-report.png"))
        browser.close()
    assert len(trials) == 3
    for name in ("mlflow-ui-runs.png", "mlflow-ui-report.png"):
        assert (SCREENSHOTS / name).stat().st_size > 20_000
