"""CNN hypermodels for 28x28 digit classification.

Names are loaded on first use, so that `model_zoo.families` (what the settings
read) imports without TensorFlow.
"""

import importlib

_HOMES = {
    "FAMILIES": "families",
    "Family": "families",
    "FusedBatchNormalization": "cnn",
    "average_of": "cnn",
    "make_cnn": "cnn",
    "multiply_adds": "cnn",
    "precision_policy": "cnn",
    "with_keras_layers": "cnn",
    "BatchNormCNN": "hypermodels",
    "CNNZoo": "hypermodels",
    "PlainCNN": "hypermodels",
    "ResidualCNN": "hypermodels",
    "ZooHyperModel": "hypermodels",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'model_zoo' has no attribute {name!r}")
    return getattr(importlib.import_module(f"model_zoo.{_HOMES[name]}"), name)
