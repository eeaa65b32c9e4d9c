"""The registry (search/registry.py) on a real sqlite MLflow store: the gates, @champion and @previous_champion, the model card and the int8 form the registered model serves."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from model_zoo import make_cnn
from search import registry, tracking
from search.assessment import int8_tflite
from search.evaluate import Comparison
from search.serving import pyfunc_model

GATES = {"test_accuracy": 0.90, "robust_heldout_accuracy_mean": 0.90}
DIGITS = registry.Promotion("digits", "champion", GATES)


def test_registry_gates_champion_and_previous_champion(tracking_store, tmp_path):
    model = make_cnn(conv_filters=(4,))
    client = mlflow.MlflowClient()

    def against_champion(challenger, champion):
        return Comparison(
            challenger, champion, 30, 12, 0.0079, challenger_robust_accuracy=0.95, champion_robust_accuracy=0.94, champion_clears_gates=True
        )

    def register(test_accuracy, comparison=None, robust=0.95):
        scores = {"test_accuracy": test_accuracy, "robust_heldout_accuracy_mean": robust}
        tracker.log_metrics(scores)  # as the pipeline logs its evaluation before the registry decides
        return registry.register_if_better(tracker, registry.Candidate(model, scores, comparison, card="# card"), DIGITS)

    with tracking.tracked_run("registry") as tracker:
        below = register(0.85, robust=0.80)
        assert not below.registered and client.search_registered_models() == []
        assert (
            mlflow.get_run(tracker.run_id).data.tags["registry_decision"]
            == "not registered: test_accuracy 85.00% < 90.00%, robust_heldout_accuracy_mean 80.00% < 90.00%"
        )
        assert register(0.95, robust=0.89).reason == "not registered: robust_heldout_accuracy_mean 89.00% < 90.00%"

        first = register(0.95)
        worse = register(0.93, against_champion(0.93, 0.95))
        better = register(0.97, against_champion(0.97, 0.95))
        # A file of the run that logged a version, read by the version; None where that run logged none.
        assert tracker.version_run_file("digits", "1", "evaluation/reference.npz") is None
        (tmp_path / "kept.txt").write_text("kept")
        tracker.log_artifact(tmp_path / "kept.txt", "evaluation")
        assert tracker.version_run_file("digits", "3", "evaluation/kept.txt") == b"kept"
    assert (first.version, first.champion) == ("1", True)
    assert (worse.version, worse.champion) == ("2", False)
    assert worse.reason == (
        "registered digits version 2; @champion stays version 1: it is not worse on both "
        "(test_accuracy 93.00%, robust_heldout_accuracy_mean 95.00%; the champion's 95.00% and 94.00%, McNemar p=0.0079)"
    )
    assert (better.version, better.champion) == ("3", True)
    assert str(client.get_model_version_by_alias("digits", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("digits", "previous_champion").version) == "1"
    assert client.get_model_version("digits", "3").tags == {
        "test_accuracy": "0.970000",
        "robust_heldout_accuracy_mean": "0.950000",
        "search_run_id": tracker.run_id,
        "served_form": "float32",
        "champion_version": "1",
        "champion_test_accuracy": "0.950000",
        "champion_robust_heldout_accuracy_mean": "0.940000",
        "mcnemar_challenger_only_right": "30",
        "mcnemar_champion_only_right": "12",
        "mcnemar_p_value": "0.0079",
    }
    # The card is the version's description and travels with the model.
    assert client.get_model_version("digits", "3").description == "# card"
    assert Path(mlflow.artifacts.download_artifacts("models:/digits/3")).joinpath("model_card.md").read_text() == "# card"
    # Each registered version is an MLflow logged model of the search run, its scores linked to it.
    logged = mlflow.search_logged_models(experiment_ids=[mlflow.get_run(tracker.run_id).info.experiment_id], output_format="list")
    assert len(logged) == 3 and {m.source_run_id for m in logged} == {tracker.run_id}
    (third,) = [m for m in logged if m.model_id in client.get_model_version("digits", "3").source]
    linked = {metric.key: metric.value for metric in third.metrics}
    assert linked == {"test_accuracy": 0.97, "robust_heldout_accuracy_mean": 0.95}
    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    expected = model.predict((digits / 255.0).astype(np.float32)[..., None], verbose=0)
    # The keras flavor: the Keras model itself.
    loaded = mlflow.keras.load_model("models:/digits@champion")
    np.testing.assert_allclose(loaded.predict((digits / 255.0).astype(np.float32)[..., None], verbose=0), expected, rtol=1e-5)
    # The pyfunc flavor: (N, 28, 28) or (N, 28, 28, 1), uint8 or float, in; probabilities and digits out.
    pyfunc = mlflow.pyfunc.load_model("models:/digits@champion")
    for batch in (digits, digits[..., None], digits / 255.0, (digits / 255.0).astype(np.float32)[..., None]):
        out = pyfunc.predict(batch)
        np.testing.assert_allclose(pyfunc_model.probabilities_of(out), expected, rtol=1e-5)
        np.testing.assert_array_equal(out["digit"], expected.argmax(axis=1))
    with pytest.raises(ValueError, match=r"input must have shape \(N, 28, 28\) or \(N, 28, 28, 1\), got \(3, 32, 32\)"):
        pyfunc.predict(np.zeros((3, 32, 32), np.uint8))


def test_a_model_registered_with_its_int8_form_serves_that_form(tracking_store):
    model = make_cnn(conv_filters=(4,), batch_norm=True)
    int8_model = int8_tflite(model)
    with tracking.tracked_run("registry") as tracker:
        candidate = registry.Candidate(model, {"test_accuracy": 0.95}, int8_model=int8_model)
        registry.register_if_better(tracker, candidate, registry.Promotion("digits", "champion", {"test_accuracy": 0.90}))
    assert mlflow.MlflowClient().get_model_version("digits", "1").tags["served_form"] == "int8"
    digits = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    served = mlflow.pyfunc.load_model("models:/digits@champion").predict(digits)
    # The bytes that were evaluated are the bytes that are served.
    expected = pyfunc_model.DigitClassifier.from_tflite(int8_model).predict(digits)
    np.testing.assert_array_equal(pyfunc_model.probabilities_of(served), pyfunc_model.probabilities_of(expected))
    # The keras flavor stays float32, and is built of Keras' own layers: it loads
    # where model_zoo's fused batch norm cannot be imported.
    keras_model = mlflow.keras.load_model("models:/digits@champion")
    assert all(w.dtype == "float32" for w in keras_model.weights)
    assert "BatchNormalization" in {type(layer).__name__ for layer in keras_model.layers}
    assert not [layer for layer in keras_model.layers if layer.__module__.startswith("model_zoo")]
