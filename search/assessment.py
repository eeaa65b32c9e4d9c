"""The test split, read once, after the search: the model on clean digits, on the
robustness suite and in its int8 form (made here: `int8_tflite`), logged to the search run; the model card of
what the registry will serve; and `evaluate`, the same for any logged model."""

from __future__ import annotations

import dataclasses
import io
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from experiments import SearchConfig, champion_uri
from search import data as data_module
from search import evaluate, registry, robustness, tracking
from search.data import Split
from search.reporting import model_card, report
from search.serving import pyfunc_model


@dataclass(frozen=True)
class Evaluation:
    """The model on the test split, read once: clean, corrupted, and its int8 form."""

    test: evaluate.TestReport
    robust: robustness.RobustnessReport
    corrupted: dict[str, Split]  # the suite, for comparing the champion on the same digits
    int8_model: bytes | None  # what the registry serves; None: the float32 model
    suite_key: str  # names the digits of the test split and the suite (robustness.suite_key)

    @property
    def scores(self) -> dict[str, float]:
        return {"test_accuracy": self.test.accuracy, "robust_heldout_accuracy_mean": self.robust.heldout_mean}

    def clears(self, gates: dict[str, float]) -> bool:
        return not registry.shortfalls(self.scores, gates)


REFERENCE_FILE = "evaluation/reference.npz"  # among a search run's artifacts
CHAMPION_PROBE_DIGITS = 2_048  # the champion's predictions timed at the start: two of its evaluation's batches


@dataclass(frozen=True)
class Reference:
    """What a model scored on the digits named by `suite_key`, kept with the run that
    evaluated it: a later challenger measured on the same digits is compared with these
    figures instead of running the champion again."""

    suite_key: str
    test_predicted: np.ndarray  # (N,): the digit predicted for each test image
    heldout_mean: float  # robust_heldout_accuracy_mean

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        np.savez(
            buffer, suite_key=np.str_(self.suite_key), test_predicted=self.test_predicted.astype(np.uint8), heldout_mean=self.heldout_mean
        )
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, content: bytes) -> Reference:
        with np.load(io.BytesIO(content), allow_pickle=False) as saved:
            return cls(str(saved["suite_key"]), saved["test_predicted"].astype(np.int64), float(saved["heldout_mean"]))


def champion_reference(tracker: tracking.SearchTracker, config: SearchConfig, suite_key: str) -> Reference | None:
    """The champion's figures on the digits `suite_key` names, as its own run kept them; None
    where there is no champion, or its run measured other digits (other data, another suite
    size, a changed suite) or kept nothing."""
    version = tracker.alias_version(config.model_name, config.champion_alias)
    content = tracker.version_run_file(config.model_name, version, REFERENCE_FILE) if version else None
    reference = Reference.from_bytes(content) if content else None
    return reference if reference and reference.suite_key == suite_key else None


def measure_champion(config: SearchConfig, test: Split, corrupted: dict[str, Split], suite_key: str) -> Reference:
    """The champion run here on what a comparison reads: the test split and the suite's held-out kinds."""
    champion = tracking.load_keras_model(champion_uri(config))
    robust = robustness.evaluate(keras_predict(champion), {name: corrupted[name] for name in robustness.HELD_OUT})
    return Reference(suite_key, evaluate.evaluate(champion, test).predicted, robust.heldout_mean)


def champion_evaluation_seconds(config: SearchConfig, train: Split, images: int) -> float:
    """What evaluating the registered champion on `images` digits will take here: its own
    predictions timed on training digits (the test split is not read yet), after a first
    batch that traces it."""
    predict = keras_predict(tracking.load_keras_model(champion_uri(config)))
    predict(train.x[:CHAMPION_PROBE_DIGITS])
    started = time.monotonic()
    predict(train.x[:CHAMPION_PROBE_DIGITS])
    return (time.monotonic() - started) * images / CHAMPION_PROBE_DIGITS


def gates(config: SearchConfig) -> dict[str, float]:
    """The registry's gates: the least score of each kind a registered model has."""
    return {"test_accuracy": config.threshold, "robust_heldout_accuracy_mean": config.robust_threshold}


def evaluate_once(
    tracker: tracking.SearchTracker, model: keras.Model, data: data_module.MnistData, config: SearchConfig, out: Path
) -> Evaluation:
    """The test split, touched once, after the search: clean, then the robustness suite; then
    the int8 form, made only for a model that clears the registry's gates (nothing else serves it)."""
    test_report = evaluate.evaluate(model, data.test)
    log_evaluation(tracker, test_report, data.test, out / "evaluation")
    corrupted = robustness.suite(data.test, robustness.SUITE_SEED, config.robust_size)
    robust_report = evaluate_robustness(tracker, model, corrupted, out / "evaluation")
    key = robustness.suite_key(data.train, data.digest, robustness.digits_per_kind(config.robust_size, len(data.test)))
    reference = out / REFERENCE_FILE
    reference.write_bytes(Reference(key, test_report.predicted, robust_report.heldout_mean).to_bytes())
    tracker.log_artifact(reference, "evaluation")
    evaluation = Evaluation(test_report, robust_report, corrupted, None, key)
    if evaluation.clears(gates(config)):
        evaluation = dataclasses.replace(evaluation, int8_model=int8_form(tracker, model, test_report, data.test, config))
    return evaluation


def keras_predict(model: keras.Model):
    """digits -> probabilities of a Keras model, in large batches."""
    return lambda digits: model.predict(digits, batch_size=1024, verbose=0)


def evaluate_robustness(
    run: tracking.SearchTracker, model: keras.Model, corrupted: dict[str, Split], out: Path
) -> robustness.RobustnessReport:
    """The model on every kind of change of the suite: robust_accuracy_* metrics and a figure, under `evaluation/`."""
    result = robustness.evaluate(keras_predict(model), corrupted)
    run.log_metrics(result.metrics())
    run.log_artifact(robustness.plot_examples(corrupted, result, out / "robustness.png"), "evaluation")
    worst, worst_accuracy = result.worst
    print(
        f"robustness suite: robust_heldout_accuracy_mean {result.heldout_mean:.4f} over {len(robustness.HELD_OUT)} held-out kinds of change "
        f"(the worst {worst} {worst_accuracy:.4f}); robust_trained_accuracy_mean {result.trained_mean:.4f} over the trained-on kinds",
        flush=True,
    )
    return result


def write_model_card(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    data: data_module.MnistData,
    winner,
    model: keras.Model,
    evaluation: Evaluation,
    gates: dict[str, float],
) -> str:
    """The registered version's card (search/reporting/model_card.py), its speed measured on the served form."""
    int8 = evaluation.int8_model
    served = pyfunc_model.DigitClassifier.from_tflite(int8) if int8 else pyfunc_model.DigitClassifier.float32(model)
    speed = model_card.measure_speed(served.predict, data.test.x)
    calibrated = evaluate.calibration(served.probabilities(data.test.x), data.test.y)
    with tempfile.TemporaryDirectory() as folder:
        tracker.log_artifact(evaluate.plot_reliability(calibrated, Path(folder) / "reliability.png"), "evaluation")
    tracker.log_metrics(
        {
            "served_latency_ms_p50": speed.latency_ms_p50,
            "served_digits_per_second": speed.digits_per_second,
            "served_test_accuracy": calibrated.accuracy,
            "served_expected_calibration_error": calibrated.expected_calibration_error,
        }
    )
    return model_card.write(
        data=data,
        hyperparameters=winner.trial.hyperparameters.values,
        param_count=model.count_params(),
        multiply_adds=winner.multiply_adds,
        test=evaluation.test,
        robustness=evaluation.robust,
        robust_size=min(config.robust_size, len(data.test)),
        int8_accuracy=tracker.metric("int8_test_accuracy"),
        served_form="int8" if int8 else "float32",
        speed=speed,
        search_run_id=tracker.run_id,
        settings=dataclasses.asdict(config),
        gates=gates,
        served_accuracy=calibrated.accuracy,
        calibration=calibrated,
        epochs_run=tracker.metric("final_epochs_run") if config.final_models == 1 else tracker.metric("final_0_epochs_run"),
    )


def int8_form(tracker: tracking.SearchTracker, model, test_report: evaluate.TestReport, test: Split, config: SearchConfig) -> bytes | None:
    """The model with int8 weights for the registry to serve, or None (served in float32):
    switched off, a model TensorFlow Lite cannot convert, or more than
    `int8_max_accuracy_drop` below the model's test accuracy."""
    tflite = int8_tflite(model) if config.serve_int8 else None
    int8 = pyfunc_model.DigitClassifier.from_tflite(tflite) if tflite is not None else None
    if config.serve_int8 and int8 is None:
        print("served in float32: TensorFlow Lite could not convert the model to int8")
    if int8 is not None:
        int8_accuracy = evaluate.report(int8.probabilities(test.x), test.y).accuracy
        tracker.log_metrics({"int8_test_accuracy": int8_accuracy})
        if test_report.accuracy - int8_accuracy > config.int8_max_accuracy_drop:
            print(
                f"served in float32: the int8 form's test_accuracy {int8_accuracy:.4f} is more than {config.int8_max_accuracy_drop} below"
            )
            int8 = None
        else:
            print(f"served with int8 weights: test_accuracy {int8_accuracy:.4f} (float32: {test_report.accuracy:.4f})")
    tracker.set_tag("served_form", "int8" if int8 is not None else "float32")
    return int8.tflite if int8 is not None else None


def evaluate_model(model_uri: str, data_path: str = "", config: SearchConfig | None = None) -> evaluate.TestReport:
    """Evaluate any logged or registered model on the MNIST test split and the robustness suite, in a run of its own."""
    config = config or SearchConfig()
    data = data_module.load_mnist(data_module.data_source(data_path), config.validation_size)
    model = tracking.load_keras_model(model_uri)
    with tracking.tracked_run(config.experiment_name, command="evaluate") as run:
        run.log_params({"model_uri": model_uri, "data_source": data.source, "data_sha256": data.digest})
        out = Path(config.output_dir) / run.run_id / "evaluation"
        test_report = evaluate.evaluate(model, data.test)
        log_evaluation(run, test_report, data.test, out)
        robust_report = evaluate_robustness(run, model, robustness.suite(data.test, robustness.SUITE_SEED, config.robust_size), out)
    print(
        f"{model_uri}: test_accuracy {test_report.accuracy:.4f}, test_loss {test_report.loss:.4f}, robust_heldout_accuracy_mean {robust_report.heldout_mean:.4f} (run {run.run_id})"
    )
    return test_report


def log_evaluation(run: tracking.SearchTracker, report: evaluate.TestReport, test: Split, out: Path) -> None:
    """Test metrics, confusion matrix and misclassified digits, under `evaluation/`."""
    run.log_metrics(report.metrics())
    run.log_artifact(evaluate.plot_confusion_matrix(report, out / "confusion_matrix.png"), "evaluation")
    run.log_artifact(evaluate.plot_misclassified(test, report, out / "misclassified.png"), "evaluation")


def int8_tflite(keras_model: keras.Model) -> bytes | None:
    """The model (batch norms folded) as TFLite with int8 weights, its activations
    quantized batch by batch as it runs (dynamic-range quantization); a
    mixed-precision model is converted from its `float32_copy`. None for a graph
    the converter refuses. Run by XNNPACK; benchmarks/RESULTS.md has its digits/s
    against float32's.
    """
    import tensorflow as tf

    forward = pyfunc_model.traced_forward(pyfunc_model.float32_copy(keras_model))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()], forward)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # no representative data: dynamic-range int8
    try:
        return converter.convert()
    except Exception:  # TensorFlow's ConverterError, not public: a graph it cannot convert is served in float32
        return None


def write_search_report(
    tracker: tracking.SearchTracker,
    config: SearchConfig,
    *,
    decision: registry.RegistryDecision,
    records: list[dict],
    out: Path,
    winner: str,
    evaluation: Evaluation,
    run_time: str,
    machine: str,
) -> None:
    """report.html under `report/`, leading with the decision, the winner (described) and why,
    its accuracy, the final training's curve, and the time the run took (`run_time`) on
    `machine`; then the trials."""
    worst, worst_accuracy = evaluation.robust.worst
    headline = {
        "Registry decision": decision.reason,
        "Winner": winner,
        "Test accuracy": f"{evaluation.test.accuracy:.2%} of {len(evaluation.test.predicted):,} test digits, read after the search",
        "Held-out kinds of change (gated)": f"mean {evaluation.robust.heldout_mean:.2%} over {len(robustness.HELD_OUT)} kinds no training imitates, "
        f"the worst {worst} {worst_accuracy:.2%}",
        "Trained-on kinds of change": f"mean {evaluation.robust.trained_mean:.2%} over {len(robustness.TRAINED)} kinds training may imitate",
        "Time": run_time,
        "Machine": machine,
    }
    prefix = "final_" if config.final_models == 1 else "final_0_"
    curves = {
        f"{what} accuracy": tracker.history(f"{prefix}{key}") for what, key in (("training", "accuracy"), ("validation", "val_accuracy"))
    }
    folder = report.write_report(
        records,
        config,
        headline,
        out,
        curves if config.final_epochs else None,
        run_id=tracker.run_id,
        recall=evaluation.test.recall,
        card=tracker.version_description(config.model_name, decision.version) if decision.version else "",
    )
    tracker.log_artifacts(folder, "report")
    print(f"report: {tracker.artifact_uri('report/report.html')}")
