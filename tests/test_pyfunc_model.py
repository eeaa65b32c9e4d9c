"""Model tests of the registered model's pyfunc (search/serving/pyfunc_model.py): its folded float32 pass and its int8 form."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest

from model_zoo import average_of, make_cnn, precision_policy
from search.assessment import int8_tflite
from search.serving.pyfunc_model import PROBABILITY_COLUMNS, DigitClassifier, InputError, float32_copy, folded_forward, probabilities_of

rng = np.random.default_rng(0)
DIGITS = rng.random((64, 28, 28, 1), dtype=np.float32)


def batch_norm_cnn() -> keras.Model:
    """The default batch-norm layout, trained a few steps so that its moving statistics are not 0 and 1."""
    model = make_cnn(conv_filters=(8, 16), convs_per_block=2, batch_norm=True, dense_units=16)
    model.fit(DIGITS, np.arange(64) % 10, batch_size=16, epochs=2, verbose=0)
    return model


def test_batch_norm_is_folded_into_the_convolutions_with_the_same_probabilities():
    model = batch_norm_cnn()
    forward = folded_forward(model)
    assert forward.__name__ == "folded"
    np.testing.assert_allclose(np.asarray(forward(DIGITS)), np.asarray(model(DIGITS, training=False)), atol=1e-5)


def test_a_model_that_is_not_a_chain_of_layers_runs_as_it_is():
    inputs = keras.Input((28, 28, 1))
    left = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs))
    right = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    merged = keras.layers.Flatten()(keras.layers.Add()([left, right]))
    model = keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(merged))
    forward = folded_forward(model)
    assert forward.__name__ == "model"
    np.testing.assert_allclose(np.asarray(forward(DIGITS)), np.asarray(model(DIGITS, training=False)), atol=1e-6)


def test_a_mixed_precision_model_is_served_from_a_float32_copy_of_its_weights():
    with precision_policy("mixed_bfloat16"):
        model = batch_norm_cnn()
    assert folded_forward(model).__name__ == "model"  # its own float32 face runs it as trained
    copy = float32_copy(model)
    assert {layer.dtype_policy.name for layer in copy.layers} == {"float32"}
    np.testing.assert_allclose(np.asarray(copy(DIGITS)), np.asarray(model(DIGITS, training=False)), atol=1e-2)
    # The int8 form is made from that copy, for a single model and for averaged bf16 members.
    for served in (model, average_of([model, model])):
        int8 = DigitClassifier.from_tflite(int8_tflite(served))
        assert int8 is not None
        predicted = int8.probabilities(np.round(DIGITS[..., 0] * 255).astype(np.uint8))
        assert predicted.dtype == np.float32
        np.testing.assert_allclose(predicted, np.asarray(model(DIGITS, training=False)), atol=0.02)


def test_the_int8_form_holds_int8_weights_and_nearly_the_float32_probabilities():
    model = batch_norm_cnn()
    int8, float32 = DigitClassifier.from_tflite(int8_tflite(model)), DigitClassifier.float32(model)
    wider = make_cnn(conv_filters=(8, 16), convs_per_block=2, batch_norm=True, dense_units=256)
    assert len(int8_tflite(wider)) < 1.5 * wider.count_params()  # one byte a weight, not four
    predicted, expected = int8.probabilities(DIGITS), float32.probabilities(DIGITS)
    np.testing.assert_allclose(predicted, expected, atol=0.02)
    assert not np.array_equal(predicted, expected)  # quantized, not a copy
    np.testing.assert_allclose(predicted.sum(axis=1), 1.0, rtol=1e-5)
    # Batches of any size, and more digits than one batch, give the same answers.
    many = np.concatenate([DIGITS] * 20)  # 1,280 digits: two batches of up to 1,024
    np.testing.assert_array_equal(int8.probabilities(many)[:64], int8.probabilities(DIGITS))
    np.testing.assert_array_equal(int8.probabilities(DIGITS[:1]), predicted[:1])


def test_predict_takes_uint8_digits_and_returns_the_most_probable_digit():
    model = batch_norm_cnn()
    digits = np.round(DIGITS[..., 0] * 255).astype(np.uint8)
    classifier = DigitClassifier.float32(model)
    expected = np.asarray(model(digits[..., None] / 255.0, training=False))
    # Every input form: (N, 28, 28), (N, 28, 28, 1), rows of 784 pixels, a 784-column DataFrame, nested lists.
    rows = digits.reshape(len(digits), -1)
    forms = [
        digits,
        digits[..., None],
        rows,
        pd.DataFrame(rows, columns=[f"pixel_{i}" for i in range(784)]),
        digits.tolist(),
        {"digits": digits},
    ]
    for form in forms:
        predicted = classifier.predict(form)
        assert list(predicted.columns) == ["digit", *PROBABILITY_COLUMNS] and predicted["digit"].dtype == np.int64
        np.testing.assert_allclose(probabilities_of(predicted), expected, atol=1e-5)
        np.testing.assert_array_equal(predicted["digit"], expected.argmax(axis=1))
    with pytest.raises(InputError, match=r"input must have shape \(N, 28, 28\), \(N, 28, 28, 1\) or \(N, 784\), got \(64, 100\)"):
        classifier.predict(np.zeros((64, 100), np.uint8))


def test_model_config_output_digit_answers_the_digits_alone():
    """What MLflow's classifier evaluation reads: mlflow.models.evaluate(..., model_config={"output": "digit"})."""
    model = batch_norm_cnn()
    table = DigitClassifier.float32(model)
    digits = DigitClassifier(table._forward, output="digit").predict(DIGITS)
    assert isinstance(digits, pd.Series) and digits.name == "digit" and digits.shape == (len(DIGITS),)
    np.testing.assert_array_equal(digits, table.predict(DIGITS)["digit"])
    with pytest.raises(InputError, match="model_config output 'proba': choose one of table, digit"):
        DigitClassifier(table._forward, output="proba")


@pytest.mark.parametrize(
    "data, message",
    [
        (np.zeros((0, 784)), "input is empty"),
        ([[0] * 784, [0] * 783], "different lengths"),
        (np.zeros((10_001, 784), np.uint8), "input has 10,001 digits: at most 10,000 a call"),
        (np.array([["7"] * 784]), "has dtype <U1"),
    ],
)
def test_bad_input_is_an_input_error_that_a_scoring_server_answers_with_400(data, message):
    from mlflow.exceptions import MlflowException

    classifier = DigitClassifier(lambda digits: np.full((len(digits), 10), 0.1, np.float32))
    with pytest.raises(InputError, match=message) as err:
        classifier.predict(data)
    assert isinstance(err.value, MlflowException) and err.value.get_http_status_code() == 400
