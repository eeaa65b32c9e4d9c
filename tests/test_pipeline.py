"""End to end: `mlflow run .` on the smoke profile, as a user runs it, against a private store."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest

from search import robustness
from tests.helpers import REPO, SECRET, all_runs, fresh_project, mlflow_run, new_sqlite_store

pytestmark = pytest.mark.e2e


def test_one_parent_and_one_finished_child_per_trial(smoke_search):
    store, _ = smoke_search
    every = all_runs(store)
    parents = [r for r in every if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(every) - 1 == 3  # smoke: max_trials 3
    assert {r.info.status for r in every} == {"FINISHED"}
    # The UI's Dataset column: the data as an input of the search run and of every trial run.
    assert parent.info.run_name.startswith("search-smoke-random-")
    for run in (parent, *children):
        (dataset_input,) = run.inputs.dataset_inputs
        assert dataset_input.dataset.name == "mnist" and dataset_input.dataset.digest == parent.data.params["data_sha256"][:16]
        assert "mnist.npz" in dataset_input.dataset.source and dataset_input.tags[0].value == "training"
    for child in children:
        assert child.info.run_name == f"trial-{child.data.tags['trial_id']}"
        assert {"family", "conv_blocks", "conv_filters_0", "kernel_size", "dropout", "learning_rate"} <= set(child.data.params)
        assert {"loss", "accuracy", "val_loss", "val_accuracy", "best_val_accuracy", "param_count", "wall_time_s", "multiply_adds"} <= set(
            child.data.metrics
        )
        # Each trial measured on validation digits under held-out kinds of change, shown, never scored.
        assert 0 < child.data.metrics["val_heldout_accuracy"] <= 1


def test_parent_run_records_settings_data_figures_and_results(smoke_search):
    store, _ = smoke_search
    parent = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags][0]
    params = parent.data.params
    assert params["profile"] == "smoke"  # as given to `mlflow run`
    assert params["config.tuner"] == "random" and params["config.max_trials"] == "3" and params["config.threshold"] == "0.9"
    assert params["config.seed"] == "42" and params["data_source"].endswith("mnist.npz")
    assert len(params["data_sha256"]) == 64
    assert (params["train_images"], params["validation_images"]) == ("6000", "6000")
    metrics = parent.data.metrics
    assert metrics["test_accuracy"] >= 0.90 and 0 < metrics["test_loss"] < 1
    assert 0.9 <= metrics["best_val_accuracy"] <= 1
    assert {f"test_{kind}_digit_{d}" for kind in ("recall", "precision") for d in range(10)} <= set(metrics)
    client = mlflow.MlflowClient(store)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    artifacts |= {a.path for d in ("eda", "evaluation") for a in client.list_artifacts(parent.info.run_id, d)}
    assert {
        "trials.csv",
        "eda/sample_digits.png",
        "eda/label_distribution.png",
        "evaluation/confusion_matrix.png",
        "evaluation/misclassified.png",
        "evaluation/robustness.png",
        "evaluation/reference.npz",
    } <= artifacts
    # The robustness suite, after the clean test split: every kind, and the held-out and trained-on means apart.
    assert {f"robust_accuracy_{name}" for name in robustness.KINDS} <= set(metrics)
    assert 0.1 < metrics["robust_heldout_accuracy_mean"] < metrics["test_accuracy"]
    held = [metrics[f"robust_accuracy_{name}"] for name in robustness.HELD_OUT]
    assert metrics["robust_heldout_accuracy_mean"] == pytest.approx(sum(held) / len(held), abs=1e-6)
    assert 0.1 < metrics["robust_trained_accuracy_mean"] <= 1
    trials_csv = Path(client.download_artifacts(parent.info.run_id, "trials.csv")).read_text().splitlines()
    assert trials_csv[0].startswith("trial_id,status,val_accuracy,best_step") and len(trials_csv) == 4


def test_nothing_from_the_environment_is_logged(smoke_search):
    store, _ = smoke_search
    for run in all_runs(store):
        logged = {**run.data.params, **run.data.tags}
        assert not [key for key, value in logged.items() if SECRET in value]


def test_best_model_is_registered_as_champion_and_loads_in_a_fresh_process(smoke_search, mnist_npz):
    store, result = smoke_search
    assert "registered mnist-cnn version 1 as @champion" in result.stdout
    version = mlflow.MlflowClient(store).get_model_version_by_alias("mnist-cnn", "champion")
    parent = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags][0]
    assert version.tags["search_run_id"] == parent.info.run_id
    assert float(version.tags["test_accuracy"]) == pytest.approx(parent.data.metrics["test_accuracy"], abs=1e-6)
    assert float(version.tags["robust_heldout_accuracy_mean"]) == pytest.approx(
        parent.data.metrics["robust_heldout_accuracy_mean"], abs=1e-6
    )
    # The pyfunc serves the int8 form (of a bf16 model too), whose test accuracy the run logged beside the model's.
    assert version.tags["served_form"] == parent.data.tags["served_form"] == "int8"
    served_accuracy = parent.data.metrics["int8_test_accuracy"]
    assert served_accuracy >= parent.data.metrics["test_accuracy"] - 0.001
    assert f"served with int8 weights: test_accuracy {served_accuracy:.4f}" in result.stdout
    # Only mlflow and numpy imported: no code of this project.
    script = (
        "import sys, numpy as np, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/mnist-cnn@champion')\n"
        f"d = np.load({str(mnist_npz)!r})\n"
        "accuracy = (model.predict(d['x_test'])['digit'] == d['y_test']).mean()  # uint8 (N, 28, 28) as stored\n"
        "assert not {'search', 'model_zoo', 'experiments'} & set(sys.modules)\n"
        "print(f'accuracy={accuracy:.4f}')\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    loaded = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    accuracy = float(loaded.stdout.strip().rsplit("accuracy=", 1)[1])
    assert accuracy == pytest.approx(served_accuracy, abs=1e-6)  # what was evaluated is what is served


# Where the point is a registry decision, not the data: the digits of mnist_12k, 2,000 of them
# validating, 2,000 testing and 500 per corruption.
SMALL_DATA = ("validation_size=2000", "robust_size=500")


def test_below_threshold_nothing_is_registered_and_the_run_says_why(tmp_path, mnist_12k):
    store = new_sqlite_store(tmp_path)
    settings = ("threshold=0.999", "max_trials=1", "max_epochs=1")
    result = mlflow_run(fresh_project(tmp_path), store, mnist_12k, "profile=smoke", *SMALL_DATA, *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not registered: test_accuracy" in result.stdout and "< 99.90%" in result.stdout
    assert mlflow.MlflowClient(store).search_registered_models() == []
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.tags["registry_decision"].startswith("not registered: test_accuracy")
    assert parent.info.status == "FINISHED"


def test_the_plan_times_the_champions_evaluation_on_the_champion_itself(smoke_search, mnist_npz, monkeypatch):
    """A budgeted run with a champion keeps time for evaluating it, timed on its own network
    (with training digits: the test split is read once, after the search)."""
    from experiments import resolve
    from search.assessment import champion_evaluation_seconds
    from search.data import load_mnist
    from search.tracking import TrackingError

    store, _ = smoke_search
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    train = load_mnist(mnist_npz).train
    seconds = champion_evaluation_seconds(resolve("smoke"), train, images=100_000)
    assert 0.0 < seconds < math.inf
    with pytest.raises(TrackingError, match="cannot load model 'models:/nobody@champion'"):
        champion_evaluation_seconds(resolve("smoke", model_name="nobody"), train, images=100_000)


def test_a_challenger_on_the_same_digits_reads_the_figures_the_champions_run_kept(smoke_search, mnist_npz, monkeypatch):
    """The champion's run kept what it predicted on the test split and its held-out mean: they
    are what the champion, run again, gives on the same digits. Other digits (another suite
    size) or no champion: nothing kept to compare with."""
    from experiments import resolve
    from search import assessment, tracking
    from search.data import load_mnist

    store, _ = smoke_search
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    config = resolve("smoke")
    data = load_mnist(mnist_npz, config.validation_size)
    key = robustness.suite_key(data.train, data.digest, config.robust_size)
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    reader = tracking.SearchTracker(parent)  # reads the store; writes nothing
    kept = assessment.champion_reference(reader, config, key)
    assert kept is not None and kept.suite_key == key
    assert assessment.champion_reference(reader, config, robustness.suite_key(data.train, data.digest, 400)) is None
    assert assessment.champion_reference(reader, resolve("smoke", model_name="nobody"), key) is None
    corrupted = robustness.suite(data.test, robustness.SUITE_SEED, config.robust_size)
    again = assessment.measure_champion(config, data.test, corrupted, key)
    np.testing.assert_array_equal(kept.test_predicted, again.test_predicted)
    assert kept.heldout_mean == pytest.approx(again.heldout_mean, abs=1e-9)
    # The figures the version was registered with.
    tags = mlflow.MlflowClient(store).get_model_version_by_alias("mnist-cnn", "champion").tags
    assert (kept.test_predicted == data.test.y).mean() == pytest.approx(float(tags["test_accuracy"]), abs=1e-6)
    assert kept.heldout_mean == pytest.approx(float(tags["robust_heldout_accuracy_mean"]), abs=1e-6)


def test_predict_reads_hand_made_digits_with_the_champion(smoke_search):
    store, _ = smoke_search
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO)}
    digits = REPO / "tests" / "fixtures" / "digits"
    result = subprocess.run(
        [sys.executable, "-m", "search", "predict", "--input", str(digits), "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["input"]).name for line in lines] == sorted(p.name for p in digits.iterdir())
    right = [int(Path(line["input"]).name[0]) == line["digit"] for line in lines]
    assert sum(right) >= len(lines) - 1, lines  # the smoke model is small: allow one miss
    assert all(0.1 < line["probability"] <= 1.0 for line in lines)


def test_predict_with_a_model_that_does_not_exist(smoke_search):
    store, _ = smoke_search
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO)}
    digits = REPO / "tests" / "fixtures" / "digits"
    result = subprocess.run(
        [sys.executable, "-m", "search", "predict", "--input", str(digits), "--model-uri", "models:/mnist-cnn@nobody"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: cannot load model 'models:/mnist-cnn@nobody'") and result.stderr.count("\n") == 1


def test_the_winner_is_retrained_within_its_time_budget_and_logged_per_epoch(tracking_store, tmp_path):
    from experiments import resolve
    from search.pipeline import run_search
    from tests.helpers import write_npz

    data = write_npz(tmp_path / "tiny.npz", n_train=700, n_test=100)
    config = resolve(
        "smoke", data=str(data), validation_size=100, max_trials=2, max_epochs=1, final_epochs=2, budget_minutes=10.0, augment="robust"
    )
    result = run_search(config, verbose=0)

    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["final_epochs_run"] == 2
    history = mlflow.MlflowClient().get_metric_history(result.run_id, "final_val_accuracy")
    assert sorted(m.step for m in history) == [0, 1]
    # Random pixels and labels: retrained, evaluated, and kept out of the registry.
    assert not result.decision.registered and "not registered" in run.data.tags["registry_decision"]


def test_several_retrainings_are_averaged_into_the_registered_model(tracking_store, tmp_path):
    from experiments import resolve
    from search.pipeline import run_search
    from tests.helpers import write_npz

    data = write_npz(tmp_path / "tiny.npz", n_train=700, n_test=100)
    config = resolve(
        "smoke",
        data=str(data),
        validation_size=100,
        max_trials=1,
        max_epochs=1,
        final_epochs=1,
        final_models=2,
        threshold=0.01,
        robust_threshold=0.01,
    )
    result = run_search(config, verbose=0)

    metrics = mlflow.get_run(result.run_id).data.metrics
    assert {"final_0_val_accuracy", "final_1_val_accuracy", "final_average_val_accuracy"} <= set(metrics)
    assert "final_val_accuracy" not in metrics
    registered = mlflow.keras.load_model(f"models:/mnist-cnn/{result.decision.version}")
    assert [layer.name for layer in registered.layers][1:] == ["member_0", "member_1", "probabilities"]


def test_the_int8_form_is_served_only_when_on_and_within_the_accuracy_drop(tracking_store, tmp_path, capsys):
    from experiments import resolve
    from model_zoo import make_cnn
    from search import evaluate, tracking
    from search.assessment import int8_form
    from search.data import load_mnist
    from tests.helpers import write_npz

    test = load_mnist(write_npz(tmp_path / "tiny.npz", n_train=700, n_test=200), validation_size=100).test
    model = make_cnn(conv_filters=(4,))  # untrained: about 10% right
    float32_report = evaluate.evaluate(model, test)
    perfect = evaluate.report(np.eye(10)[test.y], test.y)  # a float32 model that got every digit right
    with tracking.tracked_run("int8") as tracker:
        assert int8_form(tracker, model, float32_report, test, resolve("smoke", int8_max_accuracy_drop=1.0)) is not None
        assert mlflow.get_run(tracker.run_id).data.tags["served_form"] == "int8"
        assert int8_form(tracker, model, perfect, test, resolve("smoke")) is None
        assert "served in float32: the int8 form's test_accuracy" in capsys.readouterr().out
        assert mlflow.get_run(tracker.run_id).data.tags["served_form"] == "float32"
        assert int8_form(tracker, model, float32_report, test, resolve("smoke", serve_int8=False)) is None


def test_a_short_default_search_tries_different_architectures(tracking_store, tmp_path):
    """The default profile pins nothing: a few real trials already differ in the network itself."""
    import dataclasses

    from experiments import resolve
    from search.pipeline import run_search
    from tests.helpers import write_npz

    data = write_npz(tmp_path / "tiny.npz", n_train=500, n_test=100)
    config = dataclasses.replace(resolve("default", data=str(data), validation_size=100, max_trials=8, max_epochs=1), final_epochs=0)
    assert config.fixed == ()
    result = run_search(config, verbose=0)

    children = mlflow.MlflowClient().search_runs(
        [mlflow.get_run(result.run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    assert len(children) == 8
    architecture = (
        "family",
        "conv_blocks",
        "convs_per_block",
        "conv_filters_0",
        "conv_filters_1",
        "conv_filters_2",
        "kernel_size",
        "head",
        "dense_units",
        "dropout",
    )
    varied = [name for name in architecture if len({c.data.params.get(name) for c in children if name in c.data.params}) > 1]
    assert len(varied) >= 5, varied
    assert len({tuple(c.data.params.get(name) for name in architecture) for c in children}) == 8  # 8 distinct networks


def test_a_model_below_the_robustness_gate_is_not_registered(tmp_path, mnist_12k):
    """A real two-epoch model of clean digits that clears the clean gate but not a robust one of 99%."""
    store = new_sqlite_store(tmp_path)
    result = mlflow_run(fresh_project(tmp_path), store, mnist_12k, "profile=smoke", *SMALL_DATA, "robust_threshold=0.99", "max_trials=1")
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["test_accuracy"] >= 0.9 and parent.data.metrics["robust_heldout_accuracy_mean"] < 0.99
    assert (
        parent.data.tags["registry_decision"]
        == f"not registered: robust_heldout_accuracy_mean {parent.data.metrics['robust_heldout_accuracy_mean']:.2%} < 99.00%"
    )
    assert mlflow.MlflowClient(store).search_registered_models() == []
    # Nothing will serve it: no int8 form was made.
    assert "int8_test_accuracy" not in parent.data.metrics and "served_form" not in parent.data.tags
    assert "served with int8 weights" not in result.stdout and "served in float32" not in result.stdout


@pytest.mark.alone
def test_the_fast_profile_registers_a_champion_that_loads_by_name(tmp_path, mnist_npz):
    """A new user's one-minute try (`mlflow run . -P profile=fast`, its real budget and data)
    ends within its minute on this CPU (test_budget.py: on a slower one) and leaves a model that
    clears both gates and loads by name from a process without this project."""
    store = new_sqlite_store(tmp_path)
    started = time.monotonic()
    result = mlflow_run(fresh_project(tmp_path), store, mnist_npz, "profile=fast")
    wall_s = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (parent,) = [r for r in all_runs(store) if "mlflow.parentRunId" not in r.data.tags]
    metrics = parent.data.metrics
    # The budget counts from the search's process; `mlflow run` around it adds its own start.
    assert metrics["run_seconds"] <= 60 * 1.1 and wall_s <= 60 * 1.2, (metrics["run_seconds"], wall_s)
    assert metrics["test_accuracy"] >= 0.9 and metrics["robust_heldout_accuracy_mean"] >= 0.9, metrics
    assert parent.data.tags["registry_decision"].startswith("registered mnist-cnn version 1 as @champion")
    script = (
        "import sys, numpy as np, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/mnist-cnn@champion')\n"
        f"d = np.load({str(mnist_npz)!r})\n"
        "print(f\"accuracy={(model.predict(d['x_test'][:1000])['digit'] == d['y_test'][:1000]).mean():.4f}\")\n"
        "assert not {'search', 'model_zoo', 'experiments'} & set(sys.modules)\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    loaded = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, cwd="/")
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert float(loaded.stdout.strip().rsplit("accuracy=", 1)[1]) >= 0.9
