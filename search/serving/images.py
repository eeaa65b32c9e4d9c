"""Read digits to classify: image files, folders of them, or arrays; made into MNIST digits.

A photo or a drawing is not an MNIST image. `to_mnist` makes it one the way
MNIST was made: grayscale; a dark digit on a light background inverted to
light on dark; cropped to the digit; scaled so its longer side is 20 px,
keeping the aspect ratio; centred by its centre of mass in 28x28.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from search.digits import SIZE, InputError, as_digits

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Decoded as what they are, whatever their name says; no other decoder of Pillow's
# (TIFF, EPS through Ghostscript, ...) ever reads a file given here.
IMAGE_FORMATS = ("PNG", "JPEG")
# A digit needs no more: larger inputs are refused before they are decoded.
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
DIGIT_BOX = 20  # MNIST: the digit's longer side, in pixels


def read_inputs(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Names and digits (float32 (N, 28, 28, 1) in [0, 1]) of an image, a folder of images, or a .npy/.npz array."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no {'/'.join(IMAGE_SUFFIXES)} images in this folder")
        return [str(f) for f in files], np.stack([read_image(f) for f in files])[..., None]
    if path.suffix.lower() in (".npy", ".npz"):
        digits = read_array(path)
        return [f"{path}[{i}]" for i in range(len(digits))], digits
    return [str(path)], read_image(path)[None, ..., None]


def read_image(path: Path) -> np.ndarray:
    """One image file as an MNIST digit, (28, 28) float32 in [0, 1]."""
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise InputError(f"{path}: {size:,} bytes is too large for a digit image (limit {MAX_FILE_BYTES:,})")
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as image:  # reads the header only
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InputError(f"{path}: {width}x{height} pixels is too large for a digit image (limit {MAX_PIXELS:,} pixels)")
            gray = _gray(image)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
        raise InputError(f"{path}: not a readable PNG or JPEG image ({type(err).__name__})") from None
    return to_mnist(gray)


def _gray(image: Image.Image) -> np.ndarray:
    """Grayscale pixels; transparency over a white page, as a viewer shows it (a digit drawn
    black on a transparent canvas has black pixels everywhere, told apart only by alpha)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        page = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(page, image.convert("RGBA"))
    return np.asarray(image.convert("L"), dtype=np.float32)


def read_array(path: Path) -> np.ndarray:
    """A .npy array, or the first array of a .npz, of (N, 28, 28[, 1]) digits as float32 in [0, 1]."""
    if path.suffix.lower() == ".npz" and not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a readable .npz array (not a zip archive; a .npy array must be named .npy)")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                array = npz[npz.files[0]] if npz.files else None
        else:
            array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise InputError(f"{path}: not a readable {path.suffix} array ({type(err).__name__})") from None
    if array is None:
        raise InputError(f"{path}: the .npz holds no array")
    return as_digits(array, f"{path}: the array")


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """A grayscale image (H, W) in 0..255 as an MNIST digit, (28, 28) float32 in [0, 1]."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = gray - background if background < 128 else background - gray  # light digit on dark
    ink = np.clip(ink, 0, None)
    if ink.max() <= 0:
        return np.zeros((SIZE, SIZE), np.float32)  # a blank image: nothing to crop
    rows, cols = np.nonzero(ink > 0.2 * ink.max())  # faint noise is not the digit
    digit = ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] / ink.max()
    height, width = digit.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    digit = np.asarray(Image.fromarray((digit * 255).astype(np.uint8)).resize(new_size, Image.LANCZOS), np.float32) / 255
    return _centre_by_mass(digit)


def _centre_by_mass(digit: np.ndarray) -> np.ndarray:
    canvas = np.zeros((SIZE, SIZE), np.float32)
    height, width = digit.shape
    total = digit.sum()
    rows, cols = np.indices(digit.shape)
    mass_row = (rows * digit).sum() / total if total else height / 2
    mass_col = (cols * digit).sum() / total if total else width / 2
    # Put the centre of mass at the canvas centre, keeping the digit inside.
    top = int(np.clip(round(SIZE / 2 - mass_row), 0, SIZE - height))
    left = int(np.clip(round(SIZE / 2 - mass_col), 0, SIZE - width))
    canvas[top : top + height, left : left + width] = digit
    return np.clip(canvas, 0, 1)
