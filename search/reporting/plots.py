"""Figures for files only: matplotlib's object API, so no GUI backend is chosen at import."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = ["mosaic", "save", "subplots"]
GAP = 3  # pixels between two images of a mosaic
TITLE = 8  # pixels of white above each image of a titled mosaic, for its title


def subplots(rows: int = 1, cols: int = 1, **kwargs):
    """A figure and its axes, as `pyplot.subplots` returns them, without pyplot's global state."""
    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(rows, cols, **kwargs)


def save(fig: Figure, path: Path) -> Path:
    """Write `fig` as a PNG at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")  # the image grows to hold long titles and labels rather than cut them
    return path


def mosaic(ax: Axes, images: np.ndarray, cols: int, titles: Sequence[str] = (), **title_style) -> None:
    """Greyscale images (N, H, W) in [0, 1] drawn as one picture of `cols` columns, each
    image titled above: one axes for them all, since a figure of hundreds of axes takes
    seconds to lay out."""
    n, h, w = images.shape
    rows, top = max(1, -(-n // cols)), TITLE if titles else 0
    row_h, col_w = top + h + GAP, w + GAP
    canvas = np.full((rows * row_h - GAP, cols * col_w - GAP), 1.0 if titles else 0.5, np.float32)
    for i, image in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * row_h + top : r * row_h + top + h, c * col_w : c * col_w + w] = image
    ax.imshow(canvas, cmap="gray", vmin=0.0, vmax=1.0)
    for i, title in enumerate(titles):
        r, c = divmod(i, cols)
        ax.text(c * col_w + w / 2, r * row_h + top - 1, title, ha="center", va="bottom", fontsize=9, **title_style)
    ax.set_xticks([])
    ax.set_yticks([])
