"""Data tests of reading digits for prediction: the hand-made fixtures become MNIST digits."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from search.serving.images import MAX_FILE_BYTES, InputError, read_image, read_inputs, to_mnist

DIGITS = Path(__file__).parent / "fixtures" / "digits"


def bounding_box(digit):
    rows, cols = np.nonzero(digit > 0.05)
    return rows.max() - rows.min() + 1, cols.max() - cols.min() + 1


def centre_of_mass(digit):
    rows, cols = np.indices(digit.shape)
    return (rows * digit).sum() / digit.sum(), (cols * digit).sum() / digit.sum()


@pytest.mark.parametrize("path", sorted(DIGITS.iterdir(), key=str), ids=lambda p: p.name)
def test_fixture_becomes_an_mnist_digit(path):
    digit = read_image(path)
    assert digit.shape == (28, 28) and digit.dtype == np.float32
    assert 0.0 <= digit.min() and digit.max() == pytest.approx(1.0, abs=0.05)
    assert digit[0].max() < 0.05 and digit[:, 0].max() < 0.05  # light digit on a dark background
    assert max(bounding_box(digit)) in (19, 20, 21)  # longer side scaled to 20 px
    row, col = centre_of_mass(digit)
    assert abs(row - 14) <= 1.5 and abs(col - 14) <= 1.5


def test_polarity_does_not_matter():
    gray = np.asarray(Image.open(DIGITS / "3_arcs.png").convert("L"), np.float32)
    np.testing.assert_allclose(to_mnist(gray), to_mnist(255 - gray), atol=1e-6)


def test_folder_is_read_in_name_order_with_names():
    names, digits = read_inputs(DIGITS)
    assert [Path(n).name[0] for n in names] == ["0", "1", "2", "3", "4", "7"]
    assert digits.shape == (6, 28, 28, 1)


@pytest.mark.parametrize("shape, dtype, scale", [((3, 28, 28), np.uint8, 255), ((3, 28, 28, 1), np.float32, 1)])
def test_arrays_are_read_as_digits(tmp_path, shape, dtype, scale):
    array = (np.random.default_rng(0).random(shape) * scale).astype(dtype)
    np.save(tmp_path / "digits.npy", array)
    np.savez(tmp_path / "digits.npz", images=array)
    for name in ("digits.npy", "digits.npz"):
        names, digits = read_inputs(tmp_path / name)
        assert names == [f"{tmp_path / name}[{i}]" for i in range(3)]
        np.testing.assert_allclose(digits, array.reshape(3, 28, 28, 1) / scale, atol=1e-6)


def test_bad_inputs_are_one_clear_error(tmp_path):
    cases = {}
    cases[tmp_path / "missing.png"] = "no such file or folder"
    (tmp_path / "empty").mkdir()
    cases[tmp_path / "empty"] = "no .png/.jpg/.jpeg images in this folder"
    (tmp_path / "notes.png").write_text("not an image")
    cases[tmp_path / "notes.png"] = "not a readable PNG or JPEG image"
    Image.new("L", (5000, 5000), 255).save(tmp_path / "poster.png")  # small file, huge image
    cases[tmp_path / "poster.png"] = "5000x5000 pixels is too large for a digit image"
    (tmp_path / "huge.jpg").write_bytes(b"\xff" * (MAX_FILE_BYTES + 1))
    cases[tmp_path / "huge.jpg"] = "bytes is too large for a digit image"
    np.save(tmp_path / "wrong_shape.npy", np.zeros((2, 32, 32), np.uint8))
    cases[tmp_path / "wrong_shape.npy"] = "must have shape (N, 28, 28) or (N, 28, 28, 1), got (2, 32, 32)"
    np.save(tmp_path / "wrong_dtype.npy", np.zeros((2, 28, 28), bool))
    cases[tmp_path / "wrong_dtype.npy"] = "has dtype bool: expected integers 0..255 or floats in [0, 1]"
    np.save(tmp_path / "too_bright.npy", np.full((2, 28, 28), 3.0, np.float32))
    cases[tmp_path / "too_bright.npy"] = "has float pixels outside [0, 1]"
    Image.new("L", (28, 28), 0).save(tmp_path / "scan.png", format="TIFF")  # a TIFF named .png
    cases[tmp_path / "scan.png"] = "not a readable PNG or JPEG image"
    np.save(tmp_path / "digits.npy", np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "digits.npy").rename(tmp_path / "digits.npz")  # an .npy named .npz
    cases[tmp_path / "digits.npz"] = "not a readable .npz array (not a zip archive; a .npy array must be named .npy)"
    np.savez(tmp_path / "forged.npz", np.array([{"a": 1}], dtype=object))  # loading it would unpickle
    cases[tmp_path / "forged.npz"] = "not a readable .npz array (ValueError)"
    for path, message in cases.items():
        with pytest.raises(InputError) as err:
            read_inputs(path)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value), path


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_digit_drawn_black_on_a_transparent_canvas_reads_as_on_white_paper(tmp_path, mode):
    on_paper = Image.new("L", (60, 80), 255)
    on_paper.paste(0, (25, 10, 35, 70))  # a black stroke: a one
    stroke = np.asarray(on_paper) == 0
    clear = np.zeros((80, 60, 4), np.uint8)  # black everywhere, opaque only on the stroke
    clear[..., 3] = np.where(stroke, 255, 0)
    canvas = Image.fromarray(clear, "RGBA").convert("LA") if mode == "LA" else Image.fromarray(clear, "RGBA")
    if mode == "P":  # two black palette entries, the first transparent, as paint programs save it
        canvas = Image.fromarray(stroke.astype(np.uint8), "P")
        canvas.putpalette([0, 0, 0, 0, 0, 0])
    on_paper.save(tmp_path / "paper.png")
    canvas.save(tmp_path / "canvas.png", **({"transparency": 0} if mode == "P" else {}))
    digit = read_image(tmp_path / "canvas.png")
    assert digit.max() > 0.9 and bounding_box(digit)[0] == 20
    np.testing.assert_allclose(digit, read_image(tmp_path / "paper.png"), atol=0.02)
