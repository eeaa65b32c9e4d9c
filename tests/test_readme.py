"""The README's Python blocks run as written, against the store of a real smoke search."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers import MLFLOW_RUN_ENV, REPO

pytestmark = pytest.mark.e2e

README = REPO / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_is_short_and_has_python_to_run():
    assert len(README.read_text().splitlines()) <= 250
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_every_python_block_of_the_readme_runs_as_written(index, smoke_search, mnist_npz, tmp_path):
    """On a copy of the smoke search's store (what a block logs stays out of it), from a
    directory of its own, with nothing of this project importable."""
    store, _ = smoke_search
    copy = tmp_path / "mlflow.db"
    shutil.copy(store.removeprefix("sqlite:///"), copy)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{copy}", "MNIST_NPZ": str(mnist_npz)}
    for var in (*MLFLOW_RUN_ENV, "PYTHONPATH"):
        env.pop(var, None)
    done = subprocess.run(
        [sys.executable, "-c", python_blocks()[index]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
