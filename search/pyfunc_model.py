"""The registered model's pyfunc face: a batch of digits in any usual form in, probabilities and digits out.

This file is shipped inside every registered model (as `code/mnist_digits_pyfunc.py`)
and is what `mlflow.pyfunc.load_model` and `mlflow models serve` run, so it imports
nothing of this project. The same model keeps its `keras` flavor for
`mlflow.keras.load_model`.

Input: digits of shape (N, 28, 28) or (N, 28, 28, 1); integers 0..255 (uint8, or
JSON integers) or floats 0..1; light digit on a dark background, as in MNIST.
Output: {"probabilities": float32 (N, 10), "digit": int64 (N,)}.
"""

from __future__ import annotations

import os

import numpy as np

KERAS_FILE = "model.keras"  # where mlflow.keras.save_model puts the model, under data/
SIZE = 28


class InputError(ValueError):
    """Input that is not a batch of 28x28 digits: the message names it and the problem."""


def as_digits(array: np.ndarray, where: str = "input") -> np.ndarray:
    """(N, 28, 28) or (N, 28, 28, 1) digits, integers 0..255 or floats 0..1, as float32 (N, 28, 28, 1)."""
    if array.ndim not in (3, 4) or array.shape[1:3] != (SIZE, SIZE) or (array.ndim == 4 and array.shape[3] != 1) or len(array) == 0:
        raise InputError(f"{where}: expected digits of shape (N, 28, 28) or (N, 28, 28, 1), got {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        if array.min() < 0 or array.max() > 255:
            raise InputError(f"{where}: integer pixels must be in 0..255")
        return (array.reshape(-1, SIZE, SIZE, 1) / 255.0).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise InputError(f"{where}: float pixels must be finite and in [0, 1]")
        return array.reshape(-1, SIZE, SIZE, 1).astype(np.float32)
    raise InputError(f"{where}: dtype {array.dtype} is not uint8 0..255 or float 0..1")


BATCH = 1024  # digits per forward pass


class DigitClassifier:
    """What `mlflow.pyfunc.load_model` returns for a registered model."""

    def __init__(self, keras_model):
        import tensorflow as tf

        self.keras_model = keras_model
        # One traced graph for every batch size: 1.5x the digits/s of model.predict,
        # which sets up its data pipeline on every call.
        self._forward = tf.function(
            lambda digits: keras_model(digits, training=False), input_signature=[tf.TensorSpec([None, SIZE, SIZE, 1], tf.float32)]
        )

    def predict(self, data, params=None) -> dict[str, np.ndarray]:
        if isinstance(data, dict) and len(data) == 1:  # a named tensor, {"digits": ...}
            data = next(iter(data.values()))
        digits = as_digits(np.asarray(data))
        batches = [np.asarray(self._forward(digits[i : i + BATCH]), dtype=np.float32) for i in range(0, len(digits), BATCH)]
        probabilities = np.concatenate(batches)
        return {"probabilities": probabilities, "digit": probabilities.argmax(axis=1).astype(np.int64)}


def _load_pyfunc(data_path: str) -> DigitClassifier:
    import keras

    return DigitClassifier(keras.saving.load_model(os.path.join(data_path, KERAS_FILE), safe_mode=True))
