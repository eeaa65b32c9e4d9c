"""What a batch of digits is, checked in one place: the data loader reads MNIST through
it, the image reader every user's file, and the registered model's pyfunc every request
(it is shipped beside it, as `code/mnist_digits_check.py`, so it imports nothing of the project)."""

from __future__ import annotations

import numpy as np

SIZE = 28


class InputError(ValueError):
    """Input that is not a batch of 28x28 digits: the message names it and the problem."""


def as_digits(array: np.ndarray, where: str = "input") -> np.ndarray:
    """(N, 28, 28) or (N, 28, 28, 1) digits, integers 0..255 or floats 0..1, as float32 (N, 28, 28, 1).
    The one check of digits in this project."""
    if array.ndim not in (3, 4) or array.shape[1:3] != (SIZE, SIZE) or (array.ndim == 4 and array.shape[3] != 1):
        raise InputError(f"{where} must have shape (N, 28, 28) or (N, 28, 28, 1), got {array.shape}")
    if len(array) == 0:
        raise InputError(f"{where} is empty")
    if np.issubdtype(array.dtype, np.integer):
        if array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):  # uint8 cannot be outside
            raise InputError(f"{where} has integer pixels outside 0..255 (min {array.min()}, max {array.max()})")
        # In float32 throughout: a float64 copy of MNIST's 70,000 digits would cost seconds and 400 MB.
        digits = array.reshape(-1, SIZE, SIZE, 1).astype(np.float32)
        digits /= np.float32(255)
        return digits
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InputError(f"{where} has {int((~np.isfinite(array)).sum())} NaN or infinite pixel(s)")
        if array.min() < 0 or array.max() > 1:
            raise InputError(f"{where} has float pixels outside [0, 1] (min {array.min()}, max {array.max()})")
        return array.reshape(-1, SIZE, SIZE, 1).astype(np.float32)
    raise InputError(f"{where} has dtype {array.dtype}: expected integers 0..255 or floats in [0, 1]")
