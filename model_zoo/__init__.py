"""CNN hypermodels for 28x28 digit classification."""

from model_zoo.cnn import make_cnn, multiply_adds
from model_zoo.hypermodels import FAMILIES, BatchNormCNN, CNNZoo, PlainCNN

__all__ = ["FAMILIES", "BatchNormCNN", "CNNZoo", "PlainCNN", "make_cnn", "multiply_adds"]
