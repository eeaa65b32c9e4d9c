"""Keras Tuner hypermodels: each `build(hp)` only picks values for `make_cnn`.

Every hyperparameter has a default, so each hypermodel builds from an empty
`HyperParameters()`; the plain family's defaults are Keras' `mnist_convnet`.
"""

from __future__ import annotations

import keras
import keras_tuner as kt

from model_zoo.cnn import HEADS, INPUT_NORMS, make_cnn
from model_zoo.families import FAMILIES

MAX_CONV_BLOCKS = 3  # 28 -> 14 -> 7 -> 3 pixels: a fourth pooling leaves 1
# Filters per block double with depth; the choices are bounded so that the
# costliest trial stays within ~5x the default's compute on a CPU.
FILTER_CHOICES = ((16, 32, 64), (32, 64, 128), (64, 128))


def pick_architecture(hp: kt.HyperParameters) -> dict:
    """The choices every family shares: blocks, filters, kernel, head, learning rate."""
    conv_blocks = hp.Int("conv_blocks", 1, MAX_CONV_BLOCKS, default=2)
    conv_filters = []
    for block, choices in enumerate(FILTER_CHOICES):
        # conv_filters_<block> is only active when that block exists.
        with hp.conditional_scope("conv_blocks", list(range(block + 1, MAX_CONV_BLOCKS + 1))):
            filters = hp.Choice(f"conv_filters_{block}", list(choices), default=min(32 * 2**block, 128))
        if block < conv_blocks:
            conv_filters.append(filters)
    return {
        "conv_filters": tuple(conv_filters),
        "kernel_size": hp.Choice("kernel_size", [3, 5], default=3),
        # Not searched, but pinnable (fixed=head=gap): a trial of two epochs cannot train
        # global average pooling after small blocks, so gap trials were drawn only to be pruned.
        "head": hp.Fixed("head", HEADS[0]),
        # Not searched, but pinnable (fixed=input_norm=none): a trial scored on clean
        # digits cannot see what it is for; the benchmark's ablation measures it.
        "input_norm": hp.Fixed("input_norm", INPUT_NORMS[1]),
        "dropout": hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.5),
        "dense_units": hp.Choice("dense_units", [0, 64, 128, 256], default=0),
        # A trial's own warm-up + cosine over its two epochs: below 1e-3 it ends before it learns.
        "learning_rate": hp.Float("learning_rate", 1e-3, 1e-2, sampling="log", default=1e-3),
    }


def pick_convs_per_block(hp: kt.HyperParameters) -> int:
    """One or two convolutions per block (two stacked 3x3 see as far as one 5x5, for less compute)."""
    return hp.Int("convs_per_block", 1, 2, default=2)


class ZooHyperModel(kt.HyperModel):
    """A hypermodel of one family of `make_cnn` (model_zoo/families.py), built under
    `dtype_policy` (None: Keras' global policy)."""

    family = "plain"

    def __init__(self, dtype_policy: str | None = None, family: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.dtype_policy = dtype_policy
        self.family = family or self.family
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}: choose from {', '.join(FAMILIES)}")

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        family = FAMILIES[self.family]
        choices = pick_architecture(hp)
        convs = pick_convs_per_block(hp) if family.stacked else 1
        return make_cnn(**choices, **family.layout(convs), dtype_policy=self.dtype_policy)


# The families the tests and benchmarks name; ZooHyperModel(family=...) builds any.
class PlainCNN(ZooHyperModel):
    family = "plain"


class BatchNormCNN(ZooHyperModel):
    family = "batchnorm"


class ResidualCNN(ZooHyperModel):
    family = "residual"


class CNNZoo(ZooHyperModel):
    """Chooses the family (hyperparameter `family`), then that family's architecture."""

    def __init__(self, families: tuple[str, ...] = tuple(FAMILIES), dtype_policy: str | None = None, **kwargs):
        super().__init__(dtype_policy, **kwargs)
        unknown = [f for f in families if f not in FAMILIES]
        if unknown or not families:
            raise ValueError(f"unknown model family {unknown}: choose from {', '.join(FAMILIES)}")
        self.families = tuple(families)

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        family = hp.Choice("family", list(self.families), default=self.families[0])
        choices = pick_architecture(hp)
        convs = 1  # plain's layout ignores it
        stacked = [f for f in self.families if FAMILIES[f].stacked]
        if stacked:
            # Declared from the first build (so the oracle samples it from the first
            # trial on), conditional on a family that uses it: plain trials record none.
            with hp.conditional_scope("family", stacked):
                convs = pick_convs_per_block(hp)
        return make_cnn(**choices, **FAMILIES[family].layout(convs), dtype_policy=self.dtype_policy)
