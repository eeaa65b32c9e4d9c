"""Using the registered model: evaluate it, serve it over REST, and promote only a better challenger."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.helpers import MLFLOW_RUN_ENV, REPO, mlflow_listening, rest_predictions

pytestmark = pytest.mark.e2e


def search_command(store: str, mnist_npz: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MNIST_NPZ": str(mnist_npz), "PYTHONPATH": str(REPO)}
    for var in MLFLOW_RUN_ENV:
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mnist_npz):
    """A store in which one smoke search registered version 1 as @champion."""
    tmp = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    result = search_command(store, mnist_npz, tmp, "run", "--profile", "smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    return store, tmp


def test_evaluate_logs_its_own_run(registry, mnist_npz):
    store, tmp = registry
    result = search_command(store, mnist_npz, tmp, "evaluate")
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    champion = client.get_model_version_by_alias("mnist-cnn", "champion")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.command = 'evaluate'")
    (run,) = runs
    assert run.data.params["model_uri"] == "models:/mnist-cnn@champion"
    assert run.data.metrics["test_accuracy"] == pytest.approx(float(champion.tags["test_accuracy"]), abs=1e-6)
    assert {f"test_{k}_digit_{d}" for k in ("precision", "recall") for d in range(10)} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert artifacts == {"evaluation/confusion_matrix.png", "evaluation/misclassified.png", "evaluation/robustness.png"}
    assert f"models:/mnist-cnn@champion: test_accuracy {run.data.metrics['test_accuracy']:.4f}" in result.stdout


def test_evaluate_a_model_that_does_not_exist(registry, mnist_npz):
    store, tmp = registry
    result = search_command(store, mnist_npz, tmp, "evaluate", "--model-uri", "models:/mnist-cnn/99")
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot load model 'models:/mnist-cnn/99'") and result.stderr.count("\n") == 1


def test_mlflow_evaluate_reads_the_registered_model_like_our_own_evaluation(registry, mnist_npz, monkeypatch):
    """MLflow's own evaluation API on a registered version, with MNIST as 784-column rows."""
    store, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for var in MLFLOW_RUN_ENV:
        monkeypatch.delenv(var, raising=False)
    data = np.load(mnist_npz)
    rows, labels = data["x_test"][:2000].reshape(2000, -1), data["y_test"][:2000]
    frame = pd.DataFrame(rows, columns=[f"pixel_{i}" for i in range(784)]).assign(label=labels)
    # Not mlflow.set_experiment: its process-wide choice would outlive this test.
    with mlflow.start_run(experiment_id=mlflow.MlflowClient().create_experiment("evaluate-with-mlflow")):
        result = mlflow.models.evaluate(
            "models:/mnist-cnn@champion", frame, targets="label", model_type="classifier", model_config={"output": "digit"},
            evaluator_config={"log_model_explainability": False},
        )  # fmt: skip
    ours = (mlflow.pyfunc.load_model("models:/mnist-cnn@champion").predict(data["x_test"][:2000])["digit"] == labels).mean()
    assert result.metrics["accuracy_score"] == pytest.approx(ours, abs=1e-9) and ours >= 0.9


def test_served_champion_answers_rest_requests(registry, mnist_npz):
    store, tmp = registry
    serve = ["models", "serve", "-m", "models:/mnist-cnn@champion", "--env-manager", "local"]
    with mlflow_listening(serve, "/ping", tmp, {"MLFLOW_TRACKING_URI": store}) as url:
        test = np.load(mnist_npz)
        labels = test["y_test"][:200]
        for digits in (test["x_test"][:200], test["x_test"][:200, :, :, None] / 255):  # uint8 (N, 28, 28); float (N, 28, 28, 1)
            predictions = rest_predictions(url, digits)
            probabilities, digit = predictions["probabilities"], predictions["digit"]
            assert probabilities.shape == (200, 10) and digit.shape == (200,)
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
            np.testing.assert_array_equal(digit, probabilities.argmax(axis=1))
            assert (digit == labels).mean() >= 0.9


def test_second_search_is_compared_with_the_champion(registry, mnist_npz):
    store, tmp = registry
    result = search_command(store, mnist_npz, tmp, "run", "--profile", "smoke", "--seed", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    first, second = client.get_model_version("mnist-cnn", "1"), client.get_model_version("mnist-cnn", "2")
    assert second.tags["champion_version"] == "1"
    assert second.tags["champion_test_accuracy"] == first.tags["test_accuracy"]
    b, c = int(second.tags["mcnemar_challenger_only_right"]), int(second.tags["mcnemar_champion_only_right"])
    # On the same 10,000 digits the accuracy difference is exactly the discordant difference.
    assert float(second.tags["test_accuracy"]) - float(first.tags["test_accuracy"]) == pytest.approx((b - c) / 10_000, abs=2e-6)
    assert 0 < float(second.tags["mcnemar_p_value"]) <= 1
    champion = str(client.get_model_version_by_alias("mnist-cnn", "champion").version)
    if b > c:
        assert champion == "2"
        assert str(client.get_model_version_by_alias("mnist-cnn", "previous_champion").version) == "1"
    else:
        assert champion == "1"
    print(result.stdout.strip().splitlines()[-2])  # the decision, for the record
