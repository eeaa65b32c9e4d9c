"""The CNN families of the zoo, by name: how each lays out the blocks `make_cnn` builds.

Adding a family is one entry here. This module imports nothing heavy, so that the
settings (experiments/) check a family's name before TensorFlow loads.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    description: str
    stacked: bool = False  # one or two convolutions per block (hyperparameter convs_per_block); else one
    batch_norm: bool = False  # each convolution batch-normalised
    residual: bool = False  # a skip connection around each block

    def layout(self, convs_per_block: int) -> dict:
        """`make_cnn`'s layout arguments, given the convolutions per block drawn."""
        convs = convs_per_block if self.stacked else 1
        return {"convs_per_block": convs, "batch_norm": self.batch_norm, "residual": self.residual}


FAMILIES = {
    "plain": Family("Keras' mnist_convnet, generalised: blocks of conv -> relu -> max-pool"),
    "batchnorm": Family("Blocks of one or two batch-normalised convolutions", stacked=True, batch_norm=True),
    "residual": Family(
        "Blocks of one or two batch-normalised convolutions with a skip connection around them",
        stacked=True,
        batch_norm=True,
        residual=True,
    ),
}
