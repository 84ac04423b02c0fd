"""Shared plotting and writing helpers: Agg figures, readable axes, atomic PNG/CSV/JSON.

Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas, never through
`pyplot`: no global backend is switched and nothing is left in pyplot's figure registry.
In a notebook, run `%matplotlib inline` once: IPython then renders a returned Figure.
`save_png` refuses a figure a reader could not read: every axes needs x and y labels,
and every axes with more than one labelled artist needs a legend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from saekit.atomic import atomic_file, atomic_write_text

GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728", "#9467bd")
"""Line colours in a fixed order, so a group keeps its colour across figures."""


def new_figure(ncols: int = 1, *, width: float = 6.4, height: float = 4.2) -> tuple[Figure, list[Axes]]:
    """A Figure on an Agg canvas with `ncols` side-by-side axes (each `width` x `height` inches)."""
    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def label_axes(ax: Axes, xlabel: str, ylabel: str, title: str | None = None) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)


def missing_labels(fig: Figure) -> list[str]:
    """What a reader would miss: '<axes i>: no x label' etc.; empty when the figure is readable."""
    problems = []
    for i, ax in enumerate(fig.axes):
        if not ax.get_xlabel():
            problems.append(f"axes {i}: no x label")
        if not ax.get_ylabel():
            problems.append(f"axes {i}: no y label")
        handles, _ = ax.get_legend_handles_labels()
        if len(handles) > 1 and ax.get_legend() is None:
            problems.append(f"axes {i}: {len(handles)} labelled artists but no legend")
    return problems


def legend_texts(fig: Figure) -> list[str]:
    """Every legend entry of every axes, in order (for tests and checks)."""
    return [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def save_png(fig: Figure, path: str | Path, *, dpi: int = 150) -> Path:
    """Write `fig` as a PNG (temporary sibling, then rename); raises if axes are unlabelled."""
    if problems := missing_labels(fig):
        raise ValueError(f"figure for {path} is not readable: {'; '.join(problems)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write a DataFrame as CSV without its index, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, frame.to_csv(index=False))
    return path


def write_json(record: Any, path: str | Path) -> Path:
    """Write a JSON-able record (numpy scalars/arrays and NaN allowed: NaN -> null), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(jsonable(record), indent=2) + "\n")
    return path


def write_outputs(out_dir: str | Path, stem: str, *, table: pd.DataFrame | None = None,
                  figure: Figure | None = None, summary: Any = None) -> dict[str, Path]:
    """Write `<stem>.csv`, `<stem>.png` and `<stem>.json` (whichever are given) into out_dir.

    Returns {"csv"|"png"|"json": path} for what was written, ready for an index page.
    """
    out_dir = Path(out_dir)
    written = {}
    if table is not None:
        written["csv"] = write_csv(table, out_dir / f"{stem}.csv")
    if figure is not None:
        written["png"] = save_png(figure, out_dir / f"{stem}.png")
    if summary is not None:
        written["json"] = write_json(summary, out_dir / f"{stem}.json")
    return written


def jsonable(value: Any) -> Any:
    """Plain Python for json.dumps: numpy -> lists/scalars, NaN/inf -> None, tuples -> lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
