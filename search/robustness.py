"""Digits that are not MNIST's: a deterministic suite of corrupted copies of a split.

In the manner of MNIST-C (Mu and Gilmer, 2019): each corruption is one kind of
change that scanned, photographed or hand-drawn digits carry (noise, blur,
geometry, stroke width, contrast, occlusion, clutter, low resolution), at one
fixed severity, drawn with a fixed seed so that two evaluations see the same
digits. The training's augmentation (search/augment.py) draws the same families
at random severities; these severities are the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from search.data import Split
from search.reporting.plots import save, subplots

SIZE = 28
CENTRE = (SIZE - 1) / 2


def gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, 0.2, x.shape)  # sigma 0.2 of the 0..1 range


def impulse_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(x.shape) < 0.10  # 10% of pixels black or white
    return np.where(hit, rng.integers(0, 2, x.shape), x)


def gaussian_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0, 0))


def motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mean of 5 copies shifted along a line at a random angle (a camera moved 4 px)."""
    angle = rng.uniform(0, math.pi, len(x))
    steps = np.arange(-2, 3)
    out = np.zeros_like(x)
    for step in steps:
        out += _affine(x, np.tile(np.eye(2), (len(x), 1, 1)), np.stack([step * np.sin(angle), step * np.cos(angle)], 1))
    return out / len(steps)


def rotation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    turn = np.radians(20) * rng.choice([-1, 1], len(x))
    cos, sin = np.cos(turn), np.sin(turn)
    return _affine(x, np.stack([np.stack([cos, -sin], 1), np.stack([sin, cos], 1)], 1))


def shear(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amount = 0.3 * rng.choice([-1, 1], len(x))
    zeros, ones = np.zeros(len(x)), np.ones(len(x))
    return _affine(x, np.stack([np.stack([ones, zeros], 1), np.stack([amount, ones], 1)], 1))


def scale(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = rng.choice([0.7, 1.2], len(x))  # the digit shrunk to 70% or grown to 120%
    return _affine(x, np.eye(2)[None] / factor[:, None, None])


def translation(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi, len(x))  # 4 px in any direction: to the edge of the frame
    return _affine(x, np.tile(np.eye(2), (len(x), 1, 1)), 4 * np.stack([np.sin(angle), np.cos(angle)], 1))


def thick_strokes(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.grey_dilation(x, size=(1, 2, 2, 1))


def thin_strokes(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.grey_erosion(x, size=(1, 2, 2, 1))


def low_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 0.35 * x  # faint grey strokes


def brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + 0.35  # a grey background


def occlusion(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A black 7x7 square centred on a random pixel of the stroke."""
    ink = rng.random((len(x), SIZE * SIZE)) * (x.reshape(len(x), -1) > 0.5)
    centre_r, centre_c = np.divmod(ink.argmax(axis=1), SIZE)
    r, c = np.arange(SIZE)[None, :, None], np.arange(SIZE)[None, None, :]
    inside = (np.abs(r - centre_r[:, None, None]) <= 3) & (np.abs(c - centre_c[:, None, None]) <= 3)
    return np.where(inside[..., None], 0.0, x)


def line(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A white line 2 px wide across the frame, at a random angle through a point near the centre."""
    angle = rng.uniform(0, math.pi, len(x))
    through = rng.uniform(CENTRE - 6, CENTRE + 6, (len(x), 2))
    r, c = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    distance = np.abs(
        (r[None] - through[:, 0, None, None]) * np.cos(angle)[:, None, None]
        - (c[None] - through[:, 1, None, None]) * np.sin(angle)[:, None, None]
    )
    return np.maximum(x, np.clip(1.5 - distance, 0, 1)[..., None])


def low_resolution(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resampled down to 10x10 and back up to 28x28 (linear): a small, blurred scan."""
    small = ndimage.zoom(x, (1, 10 / SIZE, 10 / SIZE, 1), order=1, grid_mode=True, mode="grid-constant")
    return ndimage.zoom(small, (1, SIZE / 10, SIZE / 10, 1), order=1, grid_mode=True, mode="nearest")


# The suite: name -> corruption. Every corruption takes float32 (N, 28, 28, 1) in
# [0, 1] and a generator, and its result is clipped back to [0, 1].
CORRUPTIONS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        impulse_noise,
        gaussian_blur,
        motion_blur,
        rotation,
        shear,
        scale,
        translation,
        thick_strokes,
        thin_strokes,
        low_contrast,
        brightness,
        occlusion,
        line,
        low_resolution,
    )
}


def _affine(x: np.ndarray, matrix: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """Each image resampled (bilinear, black outside) at matrix @ (pixel - centre) + centre - shift."""
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")).reshape(2, -1) - CENTRE
    source = np.einsum("nij,jp->nip", matrix, grid) + CENTRE
    if shift is not None:
        source -= shift[:, :, None]
    index = np.broadcast_to(np.arange(len(x))[:, None], source[:, 0].shape)
    coordinates = np.stack([index, source[:, 0], source[:, 1]]).reshape(3, len(x), SIZE, SIZE)
    return ndimage.map_coordinates(x[..., 0], coordinates, order=1, cval=0.0)[..., None]


def corrupt(split: Split, name: str, seed: int) -> Split:
    """`split` with corruption `name`, the same digits for the same seed."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}: choose one of {', '.join(CORRUPTIONS)}")
    rng = np.random.default_rng([seed, list(CORRUPTIONS).index(name)])
    x = CORRUPTIONS[name](split.x.astype(np.float32), rng)
    return Split(np.clip(x, 0.0, 1.0).astype(np.float32), split.y)


def suite(split: Split, seed: int, size: int = 0) -> dict[str, Split]:
    """Every corruption of the first `size` digits of `split` (0: all of them)."""
    base = split if not size or size >= len(split) else Split(split.x[:size], split.y[:size])
    return {name: corrupt(base, name, seed) for name in CORRUPTIONS}


@dataclass(frozen=True)
class RobustnessReport:
    accuracy: dict[str, float]  # corruption -> accuracy on its corrupted digits

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.accuracy.values())))

    @property
    def worst(self) -> tuple[str, float]:
        name = min(self.accuracy, key=self.accuracy.get)
        return name, self.accuracy[name]

    def metrics(self) -> dict[str, float]:
        """robust_accuracy_<corruption> and robust_accuracy_mean."""
        return {**{f"robust_accuracy_{k}": v for k, v in self.accuracy.items()}, "robust_accuracy_mean": self.mean}


def evaluate(predict: Callable[[np.ndarray], np.ndarray], corrupted: dict[str, Split]) -> RobustnessReport:
    """Accuracy of `predict` (digits -> (N, 10) probabilities) on each corrupted split."""
    return RobustnessReport({name: float((np.asarray(predict(s.x)).argmax(1) == s.y).mean()) for name, s in corrupted.items()})


def plot_examples(corrupted: dict[str, Split], report: RobustnessReport, path: Path, per_row: int = 10) -> Path:
    """A row of example digits per corruption, titled with the model's accuracy on it."""
    fig, axes = subplots(len(corrupted), per_row, figsize=(per_row * 0.9, len(corrupted) * 1.05), squeeze=False)
    for row, (name, split) in zip(axes, corrupted.items()):
        for i, ax in enumerate(row):
            ax.imshow(split.x[i, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(f"{name}\n{report.accuracy[name]:.2%}", rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Corrupted test digits and the model's accuracy on each (mean {report.mean:.2%})")
    return save(fig, path)
