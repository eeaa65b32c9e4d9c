"""CNN hypermodels for 28x28 digit classification."""

from model_zoo.cnn import FusedBatchNormalization, average_of, make_cnn, multiply_adds, precision_policy, with_keras_layers
from model_zoo.hypermodels import FAMILIES, BatchNormCNN, CNNZoo, PlainCNN, ResidualCNN

__all__ = [
    "FAMILIES",
    "BatchNormCNN",
    "CNNZoo",
    "FusedBatchNormalization",
    "PlainCNN",
    "ResidualCNN",
    "average_of",
    "make_cnn",
    "multiply_adds",
    "precision_policy",
    "with_keras_layers",
]
