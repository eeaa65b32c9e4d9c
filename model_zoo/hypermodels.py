"""Keras Tuner hypermodels: each `build(hp)` only picks values for `make_cnn`.

Every hyperparameter has a default, so each hypermodel builds from an empty
`HyperParameters()`; the plain family's defaults are Keras' `mnist_convnet`.
"""

from __future__ import annotations

import keras
import keras_tuner as kt

from model_zoo.cnn import make_cnn

MAX_CONV_BLOCKS = 3  # 28 -> 14 -> 7 -> 3 pixels: a fourth pooling leaves 1


def pick_architecture(hp: kt.HyperParameters) -> dict:
    """The choices every family shares: blocks, filters, kernel, head, learning rate."""
    conv_blocks = hp.Int("conv_blocks", 1, MAX_CONV_BLOCKS, default=2)
    conv_filters = []
    for block in range(MAX_CONV_BLOCKS):
        # conv_filters_<block> is only active when that block exists.
        with hp.conditional_scope("conv_blocks", list(range(block + 1, MAX_CONV_BLOCKS + 1))):
            filters = hp.Choice(f"conv_filters_{block}", [16, 32, 64, 128], default=min(32 * 2**block, 128))
        if block < conv_blocks:
            conv_filters.append(filters)
    return {
        "conv_filters": tuple(conv_filters),
        "kernel_size": hp.Choice("kernel_size", [3, 5], default=3),
        "dropout": hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.5),
        "dense_units": hp.Choice("dense_units", [0, 64, 128, 256], default=0),
        "learning_rate": hp.Float("learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3),
    }


def pick_plain(hp: kt.HyperParameters) -> dict:
    """Keras' `mnist_convnet` layout: one convolution per block, no batch norm."""
    return {"convs_per_block": 1, "batch_norm": False}


def pick_batchnorm(hp: kt.HyperParameters) -> dict:
    """Deeper layout: two convolutions per block, batch-normalised unless the trial turns it off."""
    return {"convs_per_block": 2, "batch_norm": hp.Boolean("batch_norm", default=True)}


# family name -> the choices only that family makes
FAMILY_CHOICES = {"plain": pick_plain, "batchnorm": pick_batchnorm}


class PlainCNN(kt.HyperModel):
    """Keras' `mnist_convnet`, generalised: blocks of conv -> relu -> max-pool."""

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        return make_cnn(**pick_architecture(hp), **pick_plain(hp))


class BatchNormCNN(kt.HyperModel):
    """Two batch-normalised convolutions per block."""

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        return make_cnn(**pick_architecture(hp), **pick_batchnorm(hp))


FAMILIES: dict[str, type[kt.HyperModel]] = {"plain": PlainCNN, "batchnorm": BatchNormCNN}


class CNNZoo(kt.HyperModel):
    """Chooses the family (hyperparameter `family`), then that family's architecture."""

    def __init__(self, families: tuple[str, ...] = tuple(FAMILIES), **kwargs):
        super().__init__(**kwargs)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise ValueError(f"unknown model family {unknown}: choose from {', '.join(FAMILIES)}")
        self.families = tuple(families)

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        family = hp.Choice("family", list(self.families), default=self.families[0])
        choices = pick_architecture(hp)
        for name in self.families:
            # Family-specific choices are conditional: a plain trial records no batch_norm.
            with hp.conditional_scope("family", [name]):
                if name == family:
                    choices.update(FAMILY_CHOICES[name](hp))
        return make_cnn(**choices)
