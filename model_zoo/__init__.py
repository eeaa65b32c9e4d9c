"""CNN hypermodels for 28x28 digit classification."""

from model_zoo.cnn import average_of, make_cnn, multiply_adds
from model_zoo.hypermodels import FAMILIES, BatchNormCNN, CNNZoo, PlainCNN

__all__ = ["FAMILIES", "BatchNormCNN", "CNNZoo", "PlainCNN", "average_of", "make_cnn", "multiply_adds"]
