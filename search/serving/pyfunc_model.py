"""The registered model's pyfunc face: a batch of digits in any usual form in, probabilities and digits out.

This file is shipped inside every registered model (as `code/mnist_digits_pyfunc.py`)
and is what `mlflow.pyfunc.load_model` and `mlflow models serve` run, so it imports
nothing of this project but the check of digits shipped beside it. The int8 form is
made by the assessment (search/assessment.py); this file only runs it. It serves the model's int8 form, `data/model.tflite`,
where the model was logged with one, else the float32 Keras model. The same
model keeps its `keras` flavor (float32) for `mlflow.keras.load_model`.

Input: digits of shape (N, 28, 28), (N, 28, 28, 1) or (N, 784) (rows of pixels, as
CSV files and DataFrames hold MNIST), as arrays, nested lists or DataFrames with 784
pixel columns; integers 0..255 or floats 0..1; a light digit on a dark background.
At most MAX_DIGITS digits a call (a larger batch is split by the caller). Bad input
raises MLflow's INVALID_PARAMETER_VALUE, which a server answers with HTTP 400 and
the message naming the problem.
Output: a DataFrame with column `digit` (int64) and `probability_0` ... `probability_9`
(float32), what REST clients read; loaded with `model_config={"output": "digit"}`, the
digits alone (a Series), what MLflow's classifier evaluation reads:
    mlflow.models.evaluate(uri, data, targets=..., model_type="classifier", model_config={"output": "digit"})
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Callable

import numpy as np

KERAS_FILE = "model.keras"  # where mlflow.keras.save_model puts the model, under data/
TFLITE_FILE = "model.tflite"  # the int8 form beside it, when the model was logged with one
# Digits are checked by the project's one check (search/digits.py), shipped beside this file.
try:  # inside a registered model
    from mnist_digits_check import SIZE, InputError, as_digits
except ImportError:  # in the project
    from search.digits import SIZE, InputError, as_digits

CHECK_MODULE = "mnist_digits_check"  # the name search/digits.py is shipped under, beside this file


BATCH = 1024  # digits per forward pass
MAX_DIGITS = 10_000  # per call: MNIST's whole test split fits; caps what one REST request may hold in memory
MAX_BODY_BYTES = MAX_DIGITS * 28 * 28 * 12  # a REST body of MAX_DIGITS digits as JSON, 12 characters a value
SPEC_SHAPE = [None, SIZE, SIZE, 1]


class DigitClassifier:
    """What `mlflow.pyfunc.load_model` returns for a registered model.

    It serves the model's int8 form (`from_tflite`) where the model was logged with
    one, else its float32 Keras form (`float32`).
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], tflite: bytes | None = None, output: str = "table"):
        if output not in OUTPUTS:
            raise InputError(f"model_config output {output!r}: choose one of {', '.join(OUTPUTS)}")
        self._forward = forward
        self.output = output
        self.tflite = tflite  # the int8 form as a TFLite flatbuffer; None when served in float32

    @classmethod
    def float32(cls, keras_model) -> "DigitClassifier":
        # One traced graph for every batch size: model.predict sets up its data
        # pipeline on every call, which costs more than a small network's pass.
        return cls(traced_forward(float32_copy(keras_model)))

    @classmethod
    def from_tflite(cls, tflite: bytes) -> "DigitClassifier":
        return cls(TFLiteForward(tflite), tflite)

    def predict(self, data, params=None):
        """The pyfunc's answer: a DataFrame, `digit` and `probability_<d>` per input digit."""
        import pandas as pd

        try:
            probabilities = self.probabilities(data)
        except InputError as err:
            raise invalid_input(err) from None
        if self.output == "digit":
            return pd.Series(probabilities.argmax(axis=1).astype(np.int64), name="digit")
        columns = {"digit": probabilities.argmax(axis=1).astype(np.int64)}
        columns |= {name: probabilities[:, d] for d, name in enumerate(PROBABILITY_COLUMNS)}
        return pd.DataFrame(columns)

    def probabilities(self, data) -> np.ndarray:
        """float32 (N, 10): the probability of each digit for each input digit."""
        digits = as_digits(pixel_rows_as_images(data))
        if len(digits) > MAX_DIGITS:
            raise InputError(f"input has {len(digits):,} digits: at most {MAX_DIGITS:,} a call")
        batches = [np.asarray(self._forward(digits[i : i + BATCH]), dtype=np.float32) for i in range(0, len(digits), BATCH)]
        return np.concatenate(batches)


def invalid_input(err: InputError):
    """`err` as the error MLflow's scoring server answers with HTTP 400 and its message;
    still an InputError to this project's callers."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    class InvalidDigits(InputError, MlflowException):
        def __init__(self, message: str):
            MlflowException.__init__(self, message, INVALID_PARAMETER_VALUE)

    return InvalidDigits(str(err))


PROBABILITY_COLUMNS = tuple(f"probability_{d}" for d in range(10))
OUTPUTS = ("table", "digit")  # model_config "output": the DataFrame of digits and probabilities, or the digits


def probabilities_of(answer) -> np.ndarray:
    """The (N, 10) probabilities of a `predict` answer (a DataFrame, or REST's records as one)."""
    return np.asarray(answer[list(PROBABILITY_COLUMNS)], dtype=np.float32)


def pixel_rows_as_images(data) -> np.ndarray:
    """A batch in any of the input forms as an array of (N, 28, 28) or (N, 28, 28, 1) digits."""
    if isinstance(data, dict) and len(data) == 1:  # a named tensor, {"digits": ...}
        data = next(iter(data.values()))
    if hasattr(data, "to_numpy"):  # a DataFrame: 784 pixel columns, or one column of digits
        data = data.to_numpy()
        if data.dtype == object:
            data = np.asarray(data.tolist() if data.shape[1] != 1 else data[:, 0].tolist())
    try:
        array = np.asarray(data)
    except ValueError:  # nested lists of different lengths
        raise InputError("input is not a rectangular array: its rows have different lengths") from None
    if array.ndim >= 1 and len(array) == 0:
        raise InputError("input is empty")
    if array.ndim == 2:
        if array.shape[1] != SIZE * SIZE:
            raise InputError(f"input must have shape (N, 28, 28), (N, 28, 28, 1) or (N, 784), got {array.shape}")
        array = array.reshape(-1, SIZE, SIZE)
    return array


def float32_copy(keras_model):
    """The model itself if it computes in float32, else the same network and weights
    computing in float32 (a mixed-precision model keeps its variables in float32,
    so nothing is lost): what a bf16-trained model is folded and quantized from."""
    import keras

    if not _mixed_precision(keras_model):
        return keras_model

    def in_float32(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(keras_model, clone_function=in_float32, recursive=True)
    copy.set_weights(keras_model.get_weights())
    return copy


def traced_forward(keras_model):
    """`folded_forward` as one TensorFlow graph for batches of any size."""
    import tensorflow as tf

    return tf.function(folded_forward(keras_model), input_signature=[tf.TensorSpec(SPEC_SHAPE, tf.float32)])


class TFLiteForward:
    """A TFLite model run on a batch at a time by TFLite's interpreter (XNNPACK on CPU)."""

    def __init__(self, tflite: bytes):
        import tensorflow as tf

        with warnings.catch_warnings():
            # "tf.lite.Interpreter is deprecated": it is still in the pinned TensorFlow;
            # its successor, LiteRT (ai-edge-litert), would be one more dependency.
            warnings.simplefilter("ignore", UserWarning)
            self._interpreter = tf.lite.Interpreter(model_content=tflite, num_threads=_usable_cores())
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 0
        self._lock = threading.Lock()  # one interpreter, and a server may call from several threads

    def __call__(self, digits: np.ndarray) -> np.ndarray:
        with self._lock:
            if len(digits) != self._batch:
                self._interpreter.resize_tensor_input(self._input, digits.shape)
                self._interpreter.allocate_tensors()
                self._batch = len(digits)
            self._interpreter.set_tensor(self._input, np.ascontiguousarray(digits))
            self._interpreter.invoke()
            return self._interpreter.get_tensor(self._output).copy()


# The last layer of the input's standardisation in model_zoo's CNNs (model_zoo/cnn.py names it;
# this file travels inside the model without the project).
STANDARDIZED = "light_on_dark"


def folded_forward(keras_model):
    """The model's inference pass with every batch norm folded into the convolution
    before it, or the model itself where that does not give the same probabilities.

    Folded, a convolution, its batch norm and ReLU are one fused operation instead
    of four passes over the activations; the probabilities are checked against
    the model's at load.
    """
    import keras

    def model(digits):
        return keras_model(digits, training=False)

    if _mixed_precision(keras_model):
        return model  # folding would change its numbers
    layers = [layer for layer in keras_model.layers if not isinstance(layer, keras.layers.InputLayer)]
    steps, folded_in = [], False
    names = [layer.name for layer in layers]
    if STANDARDIZED in names:  # the input's standardisation is a small graph, not a chain: one step
        prefix = keras.Model(keras_model.inputs, keras_model.get_layer(STANDARDIZED).output)
        steps, layers = [lambda x: prefix(x, training=False)], layers[names.index(STANDARDIZED) + 1 :]
    for layer, following in zip(layers, [*layers[1:], None]):
        if folded_in:  # this batch norm is part of the step before
            folded_in = False
        elif isinstance(following, keras.layers.BatchNormalization) and _foldable(layer, following):
            steps.append(_fold(layer, following))
            folded_in = True
        else:
            steps.append(lambda x, layer=layer: layer(x, training=False))

    def folded(digits):
        x = digits
        for step in steps:
            x = step(x)
        return x

    probe = np.random.default_rng(0).random((8, SIZE, SIZE, 1), dtype=np.float32)
    try:
        same = np.allclose(np.asarray(folded(probe)), np.asarray(model(probe)), atol=1e-5)
    except Exception:  # a layout this does not know (not a chain of layers)
        same = False
    return folded if same else model


def _usable_cores() -> int:
    """The cores this process may run on (os.sched_getaffinity is Linux-only)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _mixed_precision(keras_model) -> bool:
    """Whether any layer computes in another dtype than float32, inside nested models
    (the members of an averaged model) too."""
    return any(
        _mixed_precision(layer) if hasattr(layer, "layers") else layer.compute_dtype != "float32"
        for layer in keras_model.layers
        if type(layer).__name__ != "InputLayer"
    )


def _foldable(conv, batch_norm) -> bool:
    import keras

    return (
        isinstance(conv, keras.layers.Conv2D)
        and conv.activation is keras.activations.linear
        and conv.groups == 1
        and conv.data_format == "channels_last"
        and batch_norm.axis in (-1, 3)
    )


def _fold(conv, batch_norm):
    """conv then batch norm as one convolution: kernel * s, bias * s + (beta - mean * s), s = gamma / sqrt(var + eps)."""
    import tensorflow as tf

    variance = np.asarray(batch_norm.moving_variance, dtype=np.float64)
    gamma = np.asarray(batch_norm.gamma, dtype=np.float64) if batch_norm.scale else 1.0
    beta = np.asarray(batch_norm.beta, dtype=np.float64) if batch_norm.center else 0.0
    scale = gamma / np.sqrt(variance + batch_norm.epsilon)
    bias = np.asarray(conv.bias, dtype=np.float64) if conv.use_bias else 0.0
    kernel = tf.constant((np.asarray(conv.kernel, dtype=np.float64) * scale).astype(np.float32))
    shift = tf.constant(((bias - np.asarray(batch_norm.moving_mean, dtype=np.float64)) * scale + beta).astype(np.float32))
    padding, strides, dilations = conv.padding.upper(), list(conv.strides), list(conv.dilation_rate)
    return lambda x: tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides, padding, dilations=dilations), shift)


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> DigitClassifier:
    tflite = os.path.join(data_path, TFLITE_FILE)
    if os.path.exists(tflite):
        with open(tflite, "rb") as file:
            classifier = DigitClassifier.from_tflite(file.read())
    else:
        import keras

        classifier = DigitClassifier.float32(keras.saving.load_model(os.path.join(data_path, KERAS_FILE), safe_mode=True))
    return DigitClassifier(classifier._forward, classifier.tflite, (model_config or {}).get("output", "table"))
