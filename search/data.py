"""Load MNIST, check it, normalise it and split it into train / validation / test."""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from search.digits import InputError, as_digits

KEYS = ("x_train", "y_train", "x_test", "y_test")
KERAS_SOURCE = "keras.datasets.mnist"


class DataError(ValueError):
    """The data cannot be used: the message names the source and the problem."""


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32, (N, 28, 28, 1), values in [0, 1]
    y: np.ndarray  # int64, (N,), values 0..9

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class MnistData:
    train: Split
    validation: Split
    test: Split  # read by the pipeline once, after the search
    source: str  # file path, or "keras.datasets.mnist"
    digest: str  # sha256 of the four raw arrays


def subset(split: Split, n: int) -> Split:
    """The first `n` examples of `split` (all of them when n is 0 or too large)."""
    return split if not n or n >= len(split) else Split(split.x[:n], split.y[:n])


def data_source(path: str = "") -> str:
    """Where the data comes from: `path`, else $MNIST_NPZ, else Keras' download."""
    return path or os.environ.get("MNIST_NPZ", "") or KERAS_SOURCE


def load_mnist(source: str, validation_size: int = 6_000) -> MnistData:
    """Load, validate and split MNIST; the last `validation_size` training images validate."""
    arrays = _read_npz(source) if source != KERAS_SOURCE else _read_keras()
    digits = {}  # the images, checked and made float32 (N, 28, 28, 1) in one pass
    for key in KEYS:
        if key.startswith("x"):
            digits[key] = _as_digits(f"{source}: {key}", arrays[key])
        else:
            _check_labels(source, key, arrays[key])
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(f"{source}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
    n_train = len(arrays["y_train"])
    if not 0 < validation_size < n_train:
        raise DataError(f"{source}: cannot hold out {validation_size} validation images from {n_train} training images")
    x_train, y_train = digits["x_train"], arrays["y_train"].astype(np.int64)
    cut = n_train - validation_size
    return MnistData(
        train=Split(x_train[:cut], y_train[:cut]),
        validation=Split(x_train[cut:], y_train[cut:]),
        test=Split(digits["x_test"], arrays["y_test"].astype(np.int64)),
        source=source,
        digest=_digest(arrays),
    )


def _read_npz(path: str) -> dict[str, np.ndarray]:
    if Path(path).is_dir():
        raise DataError(f"{path}: a directory, not an .npz file")
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in KEYS if k in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    missing = [k for k in KEYS if k not in arrays]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} (expected {', '.join(KEYS)})")
    return arrays


def _read_keras() -> dict[str, np.ndarray]:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as err:  # network errors come in many types
        raise DataError(f"{KERAS_SOURCE}: download failed ({err}); give a local file with --data or MNIST_NPZ") from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _check_labels(source: str, key: str, a: np.ndarray) -> None:
    where = f"{source}: {key}"
    if len(a) == 0:
        raise DataError(f"{where} is empty")
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise DataError(f"{where} must be a 1-D integer array, got {a.dtype} of shape {a.shape}")
    if a.min() < 0 or a.max() > 9:
        raise DataError(f"{where} has labels outside 0..9 (min {a.min()}, max {a.max()})")


def _as_digits(where: str, images: np.ndarray) -> np.ndarray:
    """float32 in [0, 1], shape (N, 28, 28, 1): the digits as the registered model reads them."""
    try:
        return as_digits(images, where)
    except InputError as err:
        raise DataError(str(err)) from None


def _digest(arrays: dict[str, np.ndarray]) -> str:
    sha = hashlib.sha256()
    for key in KEYS:
        sha.update(np.ascontiguousarray(arrays[key]).tobytes())
    return sha.hexdigest()
