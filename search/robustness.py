"""Digits that are not MNIST's: a deterministic suite of changed copies of a split.

Each kind of change is one thing that scanned, photographed or hand-drawn digits
carry, at one fixed severity, drawn with a fixed seed so that two evaluations see
the same digits. Every kind belongs to a family and declares, in `KINDS`, whether
the training may imitate it (`trained`); the rest are held out: no augmentation
uses them or a near copy of them (search/augment.py declares what each of its
changes imitates, and a test holds the two tables together). Whole families are
held out too. The registry's gate counts held-out kinds only: accuracy on change
the training never saw, which is what "unseen" promises.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

from search.data import Split
from search.reporting.plots import GAP, mosaic, save, subplots

SIZE = 28
CENTRE = (SIZE - 1) / 2
SUITE_SEED = 0  # one suite for every run: a champion's figures stand beside a challenger's, on the same digits
KEY_DIGITS = 16  # training digits every kind changes to name the suite (suite_key)
Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# --- noise -----------------------------------------------------------------------------------
def gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0.0, 0.2, x.shape)  # sigma 0.2 of the 0..1 range


def impulse_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    hit = rng.random(x.shape) < 0.10  # 10% of pixels black or white
    return np.where(hit, rng.integers(0, 2, x.shape), x)


def speckle_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grain that scales with the ink (a dim photo's sensor noise): x (1 + n), sigma 0.6."""
    return x * (1.0 + rng.normal(0.0, 0.6, x.shape))


# --- blur ------------------------------------------------------------------------------------
def gaussian_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.gaussian_filter(x, sigma=(0, 1.0, 1.0, 0))


def defocus_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mean over a disk of radius 1.5 px: a lens out of focus."""
    r, c = np.mgrid[-2:3, -2:3]
    disk = (r**2 + c**2 <= 1.5**2).astype(np.float32)
    return ndimage.convolve(x, (disk / disk.sum())[None, :, :, None], mode="constant")


def motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mean of 5 copies shifted along a line at a random angle (a camera moved 4 px)."""
    angle = rng.uniform(0, math.pi, len(x))
    steps = np.arange(-2, 3)
    out = np.zeros_like(x)
    for step in steps:
        out += _affine(x, np.tile(np.eye(2), (len(x), 1, 1)), np.stack([step * np.sin(angle), step * np.cos(angle)], 1))
    return out / len(steps)


# --- geometry --------------------------------------------------------------------------------
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


def perspective(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A page photographed at a slant: one side of the digit 30% taller than the other
    (a keystone, not an affine map), left-right or top-bottom at random."""
    r, c = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) - CENTRE
    tilt = 0.3 / CENTRE * rng.choice([-1, 1], len(x))[:, None, None]
    across = rng.random(len(x))[:, None, None] < 0.5
    stretch = 1 + tilt * np.where(across, c[None], r[None])
    rows = np.where(across, r[None] / stretch, r[None]) + CENTRE
    cols = np.where(across, c[None], c[None] / stretch) + CENTRE
    return _sample(x, rows, cols)


def elastic(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A shaky hand: every pixel moved by a smooth random field (sigma 4 px, up to about 2 px)."""
    field = ndimage.gaussian_filter(rng.uniform(-1, 1, (2, len(x), SIZE, SIZE)), sigma=(0, 0, 4, 4))
    field *= 2.0 / np.maximum(np.abs(field).max(axis=(2, 3), keepdims=True), 1e-6)
    r, c = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    return _sample(x, r[None] + field[0], c[None] + field[1])


# --- stroke ----------------------------------------------------------------------------------
def thick_strokes(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.grey_dilation(x, size=(1, 2, 2, 1))


def thin_strokes(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return ndimage.grey_erosion(x, size=(1, 2, 2, 1))


def broken_strokes(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pen running dry: the ink missing in smooth blobs over a quarter of the frame."""
    blobs = ndimage.gaussian_filter(rng.random((len(x), SIZE, SIZE)), sigma=(0, 1.5, 1.5))
    gaps = blobs < np.quantile(blobs, 0.25, axis=(1, 2), keepdims=True)
    return np.where(gaps[..., None], 0.0, x)


# --- occlusion -------------------------------------------------------------------------------
def occlusion(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A black 7x7 square centred on a random pixel of the stroke."""
    ink = rng.random((len(x), SIZE * SIZE)) * (x.reshape(len(x), -1) > 0.5)
    centre_r, centre_c = np.divmod(ink.argmax(axis=1), SIZE)
    r, c = np.arange(SIZE)[None, :, None], np.arange(SIZE)[None, None, :]
    inside = (np.abs(r - centre_r[:, None, None]) <= 3) & (np.abs(c - centre_c[:, None, None]) <= 3)
    return np.where(inside[..., None], 0.0, x)


def cut_edge(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit cut by a tight crop: the outer 20% of its ink, on one side at random, gone."""
    ink = x[..., 0] > 0.1
    rows, cols = ink.any(axis=2), ink.any(axis=1)
    first = lambda m: m.argmax(axis=1)  # noqa: E731
    last = lambda m: SIZE - 1 - m[:, ::-1].argmax(axis=1)  # noqa: E731
    top, bottom, left, right = first(rows), last(rows), first(cols), last(cols)
    side = rng.integers(0, 4, len(x))
    height, width = 0.2 * (bottom - top + 1), 0.2 * (right - left + 1)
    r, c = np.arange(SIZE)[None, :, None], np.arange(SIZE)[None, None, :]
    column = lambda v: v[:, None, None]  # noqa: E731
    cut = np.select(
        [column(side == 0), column(side == 1), column(side == 2)],
        [r < column(top + height), r > column(bottom - height), c < column(left + width)],
        c > column(right - width),
    )
    return np.where(cut[..., None], 0.0, x)


# --- intensity and background ------------------------------------------------------------------
def low_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 0.35 * x  # faint grey strokes


def brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + 0.35  # a grey background


def inverted(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1.0 - x  # dark ink on white paper, as people write


def uneven_lighting(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A lamp to one side: the background rises from 0 to 0.4 across the frame in a random direction."""
    angle = rng.uniform(0, 2 * math.pi, len(x))[:, None, None]
    r, c = np.mgrid[0:SIZE, 0:SIZE] / (SIZE - 1) - 0.5
    ramp = 0.2 + 0.4 * (r[None] * np.sin(angle) + c[None] * np.cos(angle)) / math.sqrt(0.5)
    return 0.75 * x + np.clip(ramp, 0, 0.4)[..., None]


# --- clutter ---------------------------------------------------------------------------------
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


def ruled_paper(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey horizontal rules, 1 px every 7 px from a random offset: lined paper."""
    offset = rng.integers(0, 7, len(x))[:, None, None]
    rules = (np.arange(SIZE)[None, :, None] + offset) % 7 == 0
    return np.maximum(x, 0.5 * np.broadcast_to(rules, x.shape[:3])[..., None])


def neighbour_digit(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A digit cropped from a written number: 6 px of the next digit (another of the split) at one side."""
    other = x[rng.permutation(len(x))]
    side = rng.choice([-1, 1], len(x))
    shifted = np.stack([np.roll(o, s * (SIZE - 6), axis=1) for o, s in zip(other, side)])
    columns = np.arange(SIZE)[None, None, :, None]
    keep = np.where(side[:, None, None, None] > 0, columns < 6, columns >= SIZE - 6)
    return np.maximum(x, np.where(keep, shifted, 0.0))


# --- scanning and compression --------------------------------------------------------------------
def low_resolution(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resampled down to 10x10 and back up to 28x28 (linear): a small, blurred scan."""
    small = ndimage.zoom(x, (1, 10 / SIZE, 10 / SIZE, 1), order=1, grid_mode=True, mode="grid-constant")
    return ndimage.zoom(small, (1, SIZE / 10, SIZE / 10, 1), order=1, grid_mode=True, mode="nearest")


def pixelated(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Averaged over 2x2 blocks and shown as blocks: a coarse screen capture."""
    blocks = x.reshape(len(x), SIZE // 2, 2, SIZE // 2, 2, 1).mean(axis=(2, 4))
    return blocks.repeat(2, axis=1).repeat(2, axis=2)


def binarized(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (x > 0.5).astype(np.float32)  # a bilevel scan or fax: no grey


def jpeg(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saved as JPEG at quality 10 and read back: a heavily compressed photo."""
    out = np.empty_like(x)
    for i, image in enumerate(np.clip(x[..., 0] * 255 + 0.5, 0, 255).astype(np.uint8)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=10)
        out[i, :, :, 0] = np.asarray(Image.open(buffer), dtype=np.float32) / 255
    return out


@dataclass(frozen=True)
class Kind:
    corrupt: Corruption
    family: str
    trained: bool  # whether an augmentation may imitate it; False: held out, for the gate


# The suite: every kind of change once, with its family and whether training may
# imitate it. Every corruption takes float32 (N, 28, 28, 1) in [0, 1] and a
# generator; its result is clipped back to [0, 1].
KINDS: dict[str, Kind] = {
    f.__name__: Kind(f, family, trained)
    for family, kinds in {
        "noise": {gaussian_noise: True, impulse_noise: True, speckle_noise: False},
        "blur": {gaussian_blur: False, defocus_blur: False, motion_blur: False},
        "geometry": {rotation: True, shear: True, scale: True, translation: True, perspective: False, elastic: False},
        "stroke": {thick_strokes: True, thin_strokes: False, broken_strokes: False},
        "occlusion": {occlusion: True, cut_edge: False},
        "intensity": {low_contrast: False, brightness: False, inverted: False, uneven_lighting: False},
        "clutter": {line: True, ruled_paper: False, neighbour_digit: False},
        "scan": {low_resolution: False, pixelated: False, binarized: False, jpeg: False},
    }.items()
    for f, trained in kinds.items()
}
FAMILIES = tuple(dict.fromkeys(kind.family for kind in KINDS.values()))
HELD_OUT = tuple(name for name, kind in KINDS.items() if not kind.trained)
TRAINED = tuple(name for name, kind in KINDS.items() if kind.trained)


def _affine(x: np.ndarray, matrix: np.ndarray, shift: np.ndarray | None = None) -> np.ndarray:
    """Each image resampled (bilinear, black outside) at matrix @ (pixel - centre) + centre - shift."""
    grid = np.stack(np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")).reshape(2, -1) - CENTRE
    source = np.einsum("nij,jp->nip", matrix, grid) + CENTRE
    if shift is not None:
        source -= shift[:, :, None]
    return _sample(x, source[:, 0].reshape(-1, SIZE, SIZE), source[:, 1].reshape(-1, SIZE, SIZE))


def _sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Each image read (bilinear, black outside) at per-image source coordinates (N, 28, 28)."""
    rows, cols = np.broadcast_to(rows, (len(x), SIZE, SIZE)), np.broadcast_to(cols, (len(x), SIZE, SIZE))
    index = np.broadcast_to(np.arange(len(x))[:, None, None], rows.shape)
    return ndimage.map_coordinates(x[..., 0], np.stack([index, rows, cols]), order=1, cval=0.0)[..., None]


def corrupt(split: Split, name: str, seed: int) -> Split:
    """`split` with the kind of change `name`, the same digits for the same seed."""
    if name not in KINDS:
        raise ValueError(f"unknown kind of change {name!r}: choose one of {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, list(KINDS).index(name)])
    x = KINDS[name].corrupt(split.x.astype(np.float32), rng)
    return Split(np.clip(x, 0.0, 1.0).astype(np.float32), split.y)


def suite(split: Split, seed: int, size: int = 0, names: tuple[str, ...] = tuple(KINDS)) -> dict[str, Split]:
    """Every kind in `names` (all: the whole suite) of the first `size` digits of `split` (0: all of them)."""
    base = split if not size or size >= len(split) else Split(split.x[:size], split.y[:size])
    return {name: corrupt(base, name, seed) for name in names}


def digits_per_kind(size: int, available: int) -> int:
    """The digits each kind of the suite changes, asked for `size` (0: all) of a split of `available`."""
    return min(size or available, available)


def suite_key(train: Split, data_digest: str, size: int) -> str:
    """A name for the suite a run measures on: the data (its digest), the digits per kind,
    and what every kind does to a few training digits (the suite's code at work, so a
    changed kind changes the name). Runs with one key measure on the same digits."""
    sha = hashlib.sha256(f"{data_digest}:{size}:{SUITE_SEED}".encode())
    for name, changed in suite(train, SUITE_SEED, KEY_DIGITS).items():
        sha.update(name.encode() + changed.x.tobytes())
    return sha.hexdigest()


def heldout_probe(validation: Split, seed: int, per_kind: int = 64) -> Split:
    """A small set of validation digits, `per_kind` different ones under each held-out kind
    (repeating where the split is smaller): what each trial is measured on for the MLflow
    UI (`val_heldout_accuracy`), never scored on."""
    parts = []
    for i, name in enumerate(HELD_OUT):
        index = np.arange(i * per_kind, (i + 1) * per_kind) % len(validation)
        parts.append(corrupt(Split(validation.x[index], validation.y[index]), name, seed))
    return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


@dataclass(frozen=True)
class RobustnessReport:
    accuracy: dict[str, float]  # kind of change -> accuracy on its changed digits

    def _mean(self, names: tuple[str, ...]) -> float:
        present = [self.accuracy[name] for name in names if name in self.accuracy]
        return float(np.mean(present)) if present else math.nan

    @property
    def heldout_mean(self) -> float:
        """The mean over the held-out kinds: what the gate counts."""
        return self._mean(HELD_OUT)

    @property
    def trained_mean(self) -> float:
        """The mean over the kinds that training may imitate: shown beside, never gated."""
        return self._mean(TRAINED)

    @property
    def worst(self) -> tuple[str, float]:
        """The held-out kind the model does worst on."""
        held = {name: self.accuracy[name] for name in HELD_OUT if name in self.accuracy} or self.accuracy
        name = min(held, key=held.get)
        return name, held[name]

    @property
    def rows(self) -> list[tuple[str, str, bool, float]]:
        """(kind, family, trained-on, accuracy) for each kind measured, in the suite's order."""
        return [(name, KINDS[name].family, KINDS[name].trained, value) for name, value in self.accuracy.items()]

    def metrics(self) -> dict[str, float]:
        """robust_accuracy_<kind>, robust_heldout_accuracy_mean and robust_trained_accuracy_mean."""
        means = {"robust_heldout_accuracy_mean": self.heldout_mean, "robust_trained_accuracy_mean": self.trained_mean}
        return {**{f"robust_accuracy_{k}": v for k, v in self.accuracy.items()}, **{k: v for k, v in means.items() if not math.isnan(v)}}


def evaluate(predict: Callable[[np.ndarray], np.ndarray], corrupted: dict[str, Split], digits_per_call: int = 10_000) -> RobustnessReport:
    """Accuracy of `predict` (digits -> (N, 10) probabilities) on each changed split. Small
    splits are predicted together, about `digits_per_call` at a time: a model pays a fixed
    cost per call, which a call per kind of 500 digits would pay 28 times."""
    batches, batch, size = [], [], 0
    for name, split in corrupted.items():
        batch.append(name)
        size += len(split.y)
        if size >= digits_per_call:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    accuracy: dict[str, float] = {}
    for names in batches:
        digits = np.concatenate([corrupted[n].x for n in names])
        correct = np.asarray(predict(digits)).argmax(1) == np.concatenate([corrupted[n].y for n in names])
        ends = np.cumsum([len(corrupted[n].y) for n in names])[:-1]
        accuracy |= {n: float(part.mean()) for n, part in zip(names, np.split(correct, ends))}
    return RobustnessReport(accuracy)


def plot_examples(corrupted: dict[str, Split], report: RobustnessReport, path: Path, per_row: int = 10) -> Path:
    """A row of example digits per kind of change, labelled with its family, whether it is
    held out, and the model's accuracy on it: one mosaic, since 28 axes take seconds to lay out."""
    fig, ax = subplots(figsize=(per_row * 0.9 + 1.6, len(corrupted) * 1.0))
    rows = [split.x[:per_row, :, :, 0] for split in corrupted.values()]
    mosaic(ax, np.concatenate([np.pad(r, ((0, per_row - len(r)), (0, 0), (0, 0))) for r in rows]), per_row)
    for i, name in enumerate(corrupted):
        status = "trained-on" if KINDS[name].trained else "held out"
        label = f"{name}\n{KINDS[name].family}, {status}\n{report.accuracy[name]:.2%}"
        ax.text(-GAP, i * (SIZE + GAP) + SIZE / 2, label, ha="right", va="center", fontsize=7)
    fig.suptitle(f"Changed test digits: held-out kinds {report.heldout_mean:.2%}, trained-on kinds {report.trained_mean:.2%}", fontsize=10)
    return save(fig, path)
