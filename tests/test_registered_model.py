"""Using the registered model: evaluate it, serve it over REST, and promote only a better challenger."""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from search.serving.pyfunc_model import MAX_BODY_BYTES
from tests.helpers import MLFLOW_RUN_ENV, REPO, mlflow_listening, new_sqlite_store, rest_predictions

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("registry")]  # one worker makes the module's search once


def search_command(store: str, data: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MNIST_NPZ": str(data), "PYTHONPATH": str(REPO)}
    for var in MLFLOW_RUN_ENV:
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "search", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# The smoke search of 6,000 of the 10,000 training digits mnist_12k leaves after validation,
# its model tested on 2,000 digits and a suite of 500 per corruption.
REGISTRY_SEARCH = ("--profile", "smoke", "validation_size=2000", "robust_size=500")


@pytest.fixture(scope="module")
def registry(tmp_path_factory, mnist_12k):
    """A store in which one smoke search registered version 1 as @champion."""
    tmp = tmp_path_factory.mktemp("registry")
    store = new_sqlite_store(tmp)
    result = search_command(store, mnist_12k, tmp, "run", *REGISTRY_SEARCH)
    assert result.returncode == 0, result.stderr[-3000:]
    return store, tmp


def test_evaluate_logs_its_own_run(registry, mnist_12k):
    store, tmp = registry
    result = search_command(store, mnist_12k, tmp, "evaluate")
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


def test_evaluate_a_model_that_does_not_exist(registry, mnist_12k):
    store, tmp = registry
    result = search_command(store, mnist_12k, tmp, "evaluate", "--model-uri", "models:/mnist-cnn/99")
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot load model 'models:/mnist-cnn/99'") and result.stderr.count("\n") == 1


def test_mlflow_evaluate_reads_the_registered_model_like_our_own_evaluation(registry, mnist_12k, monkeypatch):
    """MLflow's own evaluation API on a registered version, with MNIST as 784-column rows."""
    store, _ = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    for var in MLFLOW_RUN_ENV:
        monkeypatch.delenv(var, raising=False)
    data = np.load(mnist_12k)
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


def test_served_champion_answers_rest_requests(registry, mnist_12k):
    store, tmp = registry
    serve = ["models", "serve", "-m", "models:/mnist-cnn@champion", "--env-manager", "local"]
    with mlflow_listening(serve, "/ping", tmp, {"MLFLOW_TRACKING_URI": store}) as url:
        test = np.load(mnist_12k)
        labels = test["y_test"][:200]
        for digits in (test["x_test"][:200], test["x_test"][:200, :, :, None] / 255):  # uint8 (N, 28, 28); float (N, 28, 28, 1)
            predictions = rest_predictions(url, digits)
            probabilities, digit = predictions["probabilities"], predictions["digit"]
            assert probabilities.shape == (200, 10) and digit.shape == (200,)
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-4)
            np.testing.assert_array_equal(digit, probabilities.argmax(axis=1))
            assert (digit == labels).mean() >= 0.9


CLIENTS = 8  # concurrent REST clients of the load test
BAD_REQUESTS = {  # name: (body, content type, what the answer's message must name)
    "wrong shape": (json.dumps({"inputs": np.zeros((2, 28, 27)).tolist()}), "application/json", "got (2, 28, 27)"),
    "strings": (json.dumps({"inputs": [["a"] * 784]}), "application/json", "expected integers 0..255 or floats"),
    "NaN": (json.dumps({"inputs": np.full((1, 784), np.nan).tolist()}), "application/json", "NaN or infinite"),
    "integers above 255": (json.dumps({"inputs": np.full((1, 784), 300).tolist()}), "application/json", "outside 0..255"),
    "floats above 1": (json.dumps({"inputs": np.full((1, 784), 1.5).tolist()}), "application/json", "outside [0, 1]"),
    "ragged rows": (json.dumps({"inputs": [[0] * 784, [0] * 783]}), "application/json", "inhomogeneous"),  # MLflow's own parser
    "empty batch": (json.dumps({"inputs": np.zeros((0, 784)).tolist()}), "application/json", "is empty"),
    "over the batch limit": (json.dumps({"inputs": np.zeros((10_001, 784), np.uint8).tolist()}), "application/json", "at most 10,000"),
    "not JSON": ("{inputs: [", "application/json", ""),
    "unknown content type": ("0,0,0", "text/plain", "content types"),
}


def post(url: str, body: str, content_type: str = "application/json") -> tuple[int, str]:
    request = urllib.request.Request(f"{url}/invocations", data=body.encode(), headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def refused_unread(url: str, claimed_bytes: int) -> str:
    """The answer to a POST whose headers claim `claimed_bytes` of body and which sends none:
    a server that waited to read the body would not answer within the timeout."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as connection:
        head = f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {claimed_bytes}\r\n\r\n"
        connection.sendall(head.encode())
        answer = b""
        while data := connection.recv(65536):
            answer += data
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
    return answer.decode()


def refused_streamed(url: str, limit: int) -> tuple[str, int]:
    """The answer to a POST streamed in 1 MiB chunks (no Content-Length) that never ends, and
    how many bytes were sent when it came: a server that waited for the end would never answer."""
    host, port = url.removeprefix("http://").split(":")
    chunk = b"%x\r\n%s\r\n" % (2**20, b" " * 2**20)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=20) as connection:
        head = f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        connection.sendall(head.encode())
        while not select.select([connection], [], [], 0)[0]:
            assert sent < 2 * limit, f"no answer after {sent:,} bytes streamed"
            try:
                connection.sendall(chunk)
            except OSError:  # the server answered and closed: the answer is in the socket's buffer
                break
            sent += 2**20
        answer = b""
        with contextlib.suppress(OSError):
            while data := connection.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                    break
    return answer.decode(), sent


def test_served_model_answers_concurrent_clients_as_it_answers_one_and_bad_requests_with_4xx(registry, mnist_12k):
    """`python -m search serve`: MLflow's scoring server behind the project's guard."""
    store, tmp = registry
    serve = ["serve", "--model-uri", "models:/mnist-cnn@champion"]
    test = np.load(mnist_12k)
    batches = [json.dumps({"inputs": test["x_test"][i * 20 : (i + 1) * 20].tolist()}) for i in range(48)]
    with mlflow_listening(serve, "/ping", tmp, {"MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO)}, module="search") as url:
        alone = [post(url, body) for body in batches]
        assert all(status == 200 for status, _ in alone)

        def client(order: list[int]) -> list[tuple[int, int, str, float]]:
            answers = []
            for i in order:
                started = time.perf_counter()
                status, text = post(url, batches[i])
                answers.append((i, status, text, time.perf_counter() - started))
            return answers

        orders = [list(np.random.default_rng(c).permutation(len(batches))) for c in range(CLIENTS)]
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = [a for client_answers in pool.map(client, orders) for a in client_answers]
        wall = time.perf_counter() - started
        for i, status, text, _ in answers:
            assert status == 200
            assert json.loads(text) == json.loads(alone[i][1]), f"batch {i} answered differently under load"
        latencies = np.array([a[3] for a in answers]) * 1000
        figures = {
            "clients": CLIENTS,
            "requests": len(answers),
            "digits_per_request": 20,
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p99_ms": round(float(np.percentile(latencies, 99)), 1),
            "digits_per_s": round(len(answers) * 20 / wall),
        }
        statuses = {}
        for name, (body, content_type, names_the_problem) in BAD_REQUESTS.items():
            status, text = post(url, body, content_type)
            statuses[name] = status
            assert 400 <= status < 500, f"{name}: HTTP {status} {text[:300]}"
            assert names_the_problem in text, f"{name}: {text[:300]}"
            assert "stack_trace" not in text and "Traceback" not in text, f"{name}: {text[:300]}"
            assert post(url, batches[0]) == alone[0], f"the server stopped serving after {name}"
        oversized = refused_unread(url, MAX_BODY_BYTES + 1)
        assert oversized.startswith("HTTP/1.1 413") and f"at most {MAX_BODY_BYTES:,}" in oversized, oversized
        statuses["over the body limit, unread"] = 413
        streamed, sent = refused_streamed(url, MAX_BODY_BYTES)
        assert streamed.startswith("HTTP/1.1 413") and f"over {MAX_BODY_BYTES:,} bytes" in streamed, streamed
        assert sent < MAX_BODY_BYTES + 2**24, f"answered only after {sent:,} bytes"  # read up to the limit, not to an end
        statuses["streamed past the body limit"] = 413
        figures["streamed_bytes_when_refused"] = sent
        assert post(url, batches[0]) == alone[0], "the server stopped serving after an oversized body"
    record = REPO / "test-outputs" / "serving-load.json"
    record.parent.mkdir(exist_ok=True)
    record.write_text(json.dumps({**figures, "bad_requests": statuses}, indent=1) + "\n")
    print(json.dumps({**figures, "bad_requests": statuses}))


def test_second_search_is_compared_with_the_champion(registry, mnist_12k):
    store, tmp = registry
    result = search_command(store, mnist_12k, tmp, "run", *REGISTRY_SEARCH, "--seed", "7")
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    first, second = client.get_model_version("mnist-cnn", "1"), client.get_model_version("mnist-cnn", "2")
    assert second.tags["champion_version"] == "1"
    assert second.tags["champion_test_accuracy"] == first.tags["test_accuracy"]
    b, c = int(second.tags["mcnemar_challenger_only_right"]), int(second.tags["mcnemar_champion_only_right"])
    # On the same test digits the accuracy difference is exactly the discordant difference.
    test_digits = len(np.load(mnist_12k)["y_test"])
    assert float(second.tags["test_accuracy"]) - float(first.tags["test_accuracy"]) == pytest.approx((b - c) / test_digits, abs=2e-6)
    assert 0 < float(second.tags["mcnemar_p_value"]) <= 1
    champion = str(client.get_model_version_by_alias("mnist-cnn", "champion").version)
    if b > c:
        assert champion == "2"
        assert str(client.get_model_version_by_alias("mnist-cnn", "previous_champion").version) == "1"
    else:
        assert champion == "1"
    print(result.stdout.strip().splitlines()[-2])  # the decision, for the record
