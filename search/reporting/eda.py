"""Exploratory figures of the data, written as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from search.data import MnistData, Split
from search.reporting.plots import mosaic, save, subplots


def sample_grid(split: Split, path: Path, seed: int, rows: int = 4, cols: int = 8) -> Path:
    """A grid of random images of `split`, each titled with its label."""
    picks = np.random.default_rng(seed).choice(len(split), size=rows * cols, replace=False)
    fig, ax = subplots(figsize=(cols * 1.2, rows * 1.4))
    mosaic(ax, split.x[picks, :, :, 0], cols, [f"label {split.y[i]}" for i in picks])
    ax.axis("off")
    fig.suptitle(f"{rows * cols} random training digits")
    return save(fig, path)


def label_distribution(data: MnistData, path: Path) -> Path:
    """Images per digit in the train, validation and test splits, side by side."""
    splits = {"train": data.train, "validation": data.validation, "test": data.test}
    digits = np.arange(10)
    width = 0.8 / len(splits)
    fig, ax = subplots(figsize=(8, 4))
    for k, (name, split) in enumerate(splits.items()):
        counts = np.bincount(split.y, minlength=10)
        ax.bar(digits + (k - 1) * width, counts, width, label=f"{name} ({len(split):,})")
    ax.set_xticks(digits)
    ax.set_xlabel("digit")
    ax.set_ylabel("images")
    ax.set_title("Label distribution per split")
    ax.legend()
    return save(fig, path)
