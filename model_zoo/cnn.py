"""Plain functions that make the CNNs; the hypermodels only pick their arguments."""

from __future__ import annotations

import contextlib
from typing import Iterator

import keras
import tensorflow as tf
from keras import layers

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10
HEADS = ("flatten", "gap")  # what follows the last block: every position, or their average per filter
# What the model does to a digit before its first convolution: nothing, or `standardize`
# (per image to zero mean and unit variance, then flipped where its ink is dark on light).
INPUT_NORMS = ("none", "standardize")


def make_cnn(
    conv_filters: tuple[int, ...] = (32, 64),
    kernel_size: int = 3,
    convs_per_block: int = 1,
    batch_norm: bool = False,
    dropout: float = 0.5,
    dense_units: int = 0,
    learning_rate: float = 1e-3,
    residual: bool = False,
    head: str = "flatten",
    input_norm: str = "standardize",
    dtype_policy: str | None = None,
) -> keras.Model:
    """A compiled CNN for 28x28x1 digits with a 10-way softmax.

    Each entry of `conv_filters` is one block: `convs_per_block` convolutions
    (each optionally batch-normalised) followed by 2x2 max pooling. With
    `residual` (batch norm implied) the block's input is added to its output
    before the last ReLU (through a 1x1 convolution where the filters change),
    as in ResNet. The head is `flatten` (every position) or `gap` (global
    average pooling: one value per filter), then dropout, an optional dense
    layer of `dense_units`, dropout, softmax. With the defaults this is Keras'
    `mnist_convnet` example with "same" padding, which lets three blocks (and
    5x5 kernels) fit in 28x28 pixels.

    `input_norm="standardize"` puts `standardize_digits` first, inside the model, so
    that what it serves is indifferent to contrast, background level and polarity.

    `dtype_policy` (float32, mixed_bfloat16) is the model's own; None: Keras'
    global policy. Keras Tuner resets the global one before every build
    (`keras.backend.clear_session()`), so a search names it here.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: choose one of {', '.join(HEADS)}")
    if input_norm not in INPUT_NORMS:
        raise ValueError(f"unknown input_norm {input_norm!r}: choose one of {', '.join(INPUT_NORMS)}")
    if dtype_policy is not None:
        with precision_policy(dtype_policy):
            return make_cnn(
                conv_filters, kernel_size, convs_per_block, batch_norm, dropout, dense_units, learning_rate, residual, head, input_norm
            )
    inputs = keras.Input(shape=INPUT_SHAPE, name="digits")
    x = standardize_digits(inputs) if input_norm == "standardize" else inputs
    for filters in conv_filters:
        block_input = x
        for i in range(convs_per_block):
            x = _conv(x, filters, kernel_size, batch_norm or residual)
            if not (residual and i == convs_per_block - 1):
                x = layers.Activation("relu")(x)
        if residual:
            shortcut = block_input if block_input.shape[-1] == filters else _conv(block_input, filters, 1, True)
            x = layers.Activation("relu")(layers.Add()([x, shortcut]))
        x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x) if head == "flatten" else layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(dropout)(x)
    if dense_units:
        x = layers.Dense(dense_units, activation="relu")(x)
        x = layers.Dropout(dropout)(x)
    # float32 softmax keeps probabilities exact under mixed precision.
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def standardize_digits(x):
    """Each digit to zero mean and unit variance over its pixels, times the sign of its
    skewness: ink is the minority of a digit's pixels, so light ink on dark skews
    positive and dark ink on light negative, and both come out light on dark. Contrast,
    a uniform background and polarity then cannot matter. Keras' own layers only, in
    float32, so that the saved model loads anywhere Keras does, without this project."""
    f32 = {"dtype": "float32"}
    z = layers.LayerNormalization(axis=[1, 2, 3], center=False, scale=False, epsilon=1e-6, name="standardize", **f32)(x)
    skewness = layers.GlobalAveragePooling2D(keepdims=True, **f32)(layers.Multiply(**f32)([z, z, z]))
    # tanh(100 s): the sign, continuous where a digit's skewness is near zero.
    polarity = layers.Activation("tanh", **f32)(layers.Rescaling(100.0, **f32)(skewness))
    return layers.Multiply(name="light_on_dark", **f32)([z, polarity])


def _conv(x, filters: int, kernel_size: int, batch_norm: bool):
    # The bias is redundant when batch norm follows.
    x = layers.Conv2D(filters, kernel_size, padding="same", use_bias=not batch_norm)(x)
    if batch_norm:
        # Momentum 0.9, not Keras' 0.99: a trial of one epoch on a subset
        # is 50-80 steps, too few for 0.99's moving statistics to settle,
        # and its validation score would measure that, not the network.
        x = FusedBatchNormalization(momentum=0.9)(x)
    return x


@contextlib.contextmanager
def precision_policy(policy: str | None) -> Iterator[None]:
    """Keras' global dtype policy set to `policy` inside the block (None: left as it
    is), and the caller's put back after it, whatever the block did to it."""
    saved = keras.mixed_precision.global_policy()
    if policy is not None:
        keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        if keras.mixed_precision.global_policy().name != saved.name:
            keras.mixed_precision.set_global_policy(saved)


@keras.saving.register_keras_serializable(package="model_zoo")
class FusedBatchNormalization(layers.BatchNormalization):
    """Keras' `BatchNormalization`, computed in training by TensorFlow's fused kernel.

    Keras 3 normalises a batch with a dozen separate ops forward and backward
    (keras-team/keras-core#225, "BatchNorm is slow"); TensorFlow's
    `FusedBatchNormV3` does it in one pass each way (oneDNN on a CPU), in fewer
    CPU seconds per image (benchmarks/RESULTS.md). The arithmetic is the same batch norm, so at inference, and wherever the fused
    kernel does not apply, this is Keras' own layer, and `with_keras_layers`
    turns a model back into Keras' layers before it is saved.
    """

    def call(self, inputs, training=None, mask=None):
        fusable = len(inputs.shape) == 4 and self.axis in (-1, 3) and mask is None and not (self.renorm or self.synchronized)
        if not (training and self.trainable and fusable):
            return super().call(inputs, training=training, mask=mask)
        # Upcast as Keras' layer does: bf16 statistics overflow.
        x = tf.cast(inputs, "float32")
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(self.gamma, "float32"), tf.cast(self.beta, "float32"), epsilon=self.epsilon, is_training=True
        )
        # The fused kernel returns the unbiased batch variance; Keras' layer
        # averages the biased one into its moving variance.
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
        variance = variance * (count - 1.0) / count
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        return tf.cast(outputs, self.compute_dtype)


def with_keras_layers(model: keras.Model) -> keras.Model:
    """The same model, weights included, with Keras' own `BatchNormalization` in place
    of `FusedBatchNormalization`, compiled as it was: what is saved loads anywhere
    Keras does."""

    def keras_layer(layer):
        if isinstance(layer, FusedBatchNormalization):
            return layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    if not any(isinstance(layer, FusedBatchNormalization) for layer in _all_layers(model)):
        return model
    clone = keras.models.clone_model(model, clone_function=keras_layer, recursive=True)
    clone.set_weights(model.get_weights())
    if model.compiled:
        clone.compile_from_config(model.get_compile_config())
    return clone


def _all_layers(model: keras.Model) -> list:
    """Every layer of `model`, inside nested models too."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def multiply_adds(model: keras.Model) -> int:
    """Multiply-adds of one digit's forward pass through the convolutions and dense
    layers (the rest is a few percent): a cost that does not depend on the machine."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            _, height, width, filters = layer.output.shape
            kernel_height, kernel_width, channels_in, _ = layer.kernel.shape
            total += height * width * filters * kernel_height * kernel_width * channels_in
        elif isinstance(layer, layers.Dense):
            total += layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def average_of(models: list[keras.Model]) -> keras.Model:
    """One model whose probabilities are the mean of `models`' (an ensemble, saved
    and served as a single model); a single model is returned as it is."""
    if len(models) == 1:
        return models[0]
    inputs = keras.Input(shape=INPUT_SHAPE, name="digits")
    # Each member is wrapped under a name of its own: a model's layer names must be unique.
    members = [keras.Sequential([model], name=f"member_{i}") for i, model in enumerate(models)]
    # float32, as every member's softmax: under mixed precision the mean would be rounded to bf16.
    outputs = layers.Average(name="probabilities", dtype="float32")([member(inputs) for member in members])
    return keras.Model(inputs, outputs, name="ensemble")
