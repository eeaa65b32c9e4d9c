"""Data tests: the real MNIST file loads as specified; every bad file gets one clear error."""

import numpy as np
import pytest

from search.data import KERAS_SOURCE, DataError, data_source, load_mnist
from tests.helpers import write_npz


def test_real_mnist_splits_54000_6000_10000(mnist):
    assert (len(mnist.train), len(mnist.validation), len(mnist.test)) == (54_000, 6_000, 10_000)
    for split in (mnist.train, mnist.validation, mnist.test):
        assert split.x.shape[1:] == (28, 28, 1) and split.x.dtype == np.float32
        assert 0.0 <= split.x.min() and split.x.max() <= 1.0
        assert split.y.dtype == np.int64 and set(np.unique(split.y)) == set(range(10))


def test_split_is_deterministic_and_holds_out_the_last_training_images(mnist, mnist_npz):
    raw = np.load(mnist_npz)
    np.testing.assert_array_equal(mnist.validation.y, raw["y_train"][-6000:])
    np.testing.assert_array_equal(mnist.train.x[0, :, :, 0], raw["x_train"][0] / np.float32(255))
    assert load_mnist(str(mnist_npz)).digest == mnist.digest


def test_mean_pixel_matches_published_mnist(mnist):
    pixels = np.concatenate([mnist.train.x, mnist.validation.x])
    assert pixels.mean() == pytest.approx(0.1306604762738429, abs=1e-6)


def test_source_precedence(monkeypatch):
    monkeypatch.delenv("MNIST_NPZ", raising=False)
    assert data_source("") == KERAS_SOURCE
    monkeypatch.setenv("MNIST_NPZ", "/env.npz")
    assert data_source("") == "/env.npz"
    assert data_source("/given.npz") == "/given.npz"


def test_float_images_and_channel_axis_are_accepted(tmp_path):
    rng = np.random.default_rng(0)
    path = write_npz(tmp_path / "f.npz", x_train=rng.random((120, 28, 28, 1), dtype=np.float32))
    data = load_mnist(str(path), validation_size=20)
    assert (len(data.train), len(data.validation), len(data.test)) == (100, 20, 40)
    assert data.train.x.shape == (100, 28, 28, 1) and data.train.x.max() <= 1.0


BAD = {
    "missing key": (dict(y_test=None), "missing key(s) y_test"),
    "wrong image shape": (
        dict(x_train=np.zeros((120, 32, 32), np.uint8)),
        "x_train must have shape (N, 28, 28) or (N, 28, 28, 1), got (120, 32, 32)",
    ),
    "label above 9": (dict(y_train=np.full(120, 10, np.uint8)), "y_train has labels outside 0..9"),
    "negative label": (dict(y_test=np.full(40, -1, np.int64)), "y_test has labels outside 0..9"),
    "float labels": (dict(y_train=np.zeros(120, np.float32)), "y_train must be a 1-D integer array"),
    "length mismatch": (dict(y_train=np.zeros(100, np.uint8)), "x_train has 120 images but y_train has 100 labels"),
    "NaN pixels": (dict(x_test=np.full((40, 28, 28), np.nan, np.float32)), "x_test has 31360 NaN or infinite pixel(s)"),
    "float pixels above 1": (dict(x_test=np.full((40, 28, 28), 255.0, np.float32)), "x_test has float pixels outside [0, 1]"),
    "int pixels above 255": (dict(x_test=np.full((40, 28, 28), 300, np.int32)), "x_test has integer pixels outside 0..255"),
    "empty test split": (dict(x_test=np.zeros((0, 28, 28), np.uint8), y_test=np.zeros(0, np.uint8)), "x_test is empty"),
    "string pixels": (dict(x_train=np.full((120, 28, 28), "a")), "x_train has dtype <U1"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arrays_raise_an_error_naming_file_and_problem(tmp_path, case):
    replace, message = BAD[case]
    path = write_npz(tmp_path / "bad.npz", **replace)
    with pytest.raises(DataError) as err:
        load_mnist(str(path), validation_size=20)
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_mnist(str(tmp_path / "nope.npz"))


def test_file_that_is_not_an_npz(tmp_path):
    path = tmp_path / "notes.npz"
    path.write_text("these are not arrays")
    with pytest.raises(DataError, match="not a readable .npz file"):
        load_mnist(str(path))


def test_validation_size_larger_than_training_set(tmp_path):
    with pytest.raises(DataError, match="cannot hold out 500 validation images from 120"):
        load_mnist(str(write_npz(tmp_path / "small.npz")), validation_size=500)
