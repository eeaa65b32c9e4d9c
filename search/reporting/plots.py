"""Figures for files only: matplotlib's object API, so no GUI backend is chosen at import."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

__all__ = ["save", "subplots"]


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
