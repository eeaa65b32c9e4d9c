"""Model tests of the registered model's pyfunc (search/pyfunc_model.py): its folded inference pass."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from model_zoo import make_cnn
from search.pyfunc_model import DigitClassifier, folded_forward

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


@pytest.fixture
def bf16_policy():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_a_mixed_precision_model_is_not_folded(bf16_policy):
    assert folded_forward(make_cnn(batch_norm=True)).__name__ == "model"


def test_predict_takes_uint8_digits_and_returns_the_most_probable_digit():
    model = batch_norm_cnn()
    digits = np.round(DIGITS[..., 0] * 255).astype(np.uint8)
    predicted = DigitClassifier(model).predict(digits)
    expected = np.asarray(model(digits[..., None] / 255.0, training=False))
    np.testing.assert_allclose(predicted["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(predicted["digit"], expected.argmax(axis=1))
