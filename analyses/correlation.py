"""Figure 8: OLS fits with a 95% confidence band of the mean, Pearson r and p, and the controls
that keep the figure's two panels from being true by construction.

left   one point per training batch: the frozen SAE's reconstruction MSE on the batch's hooked
       activations (x) vs the batch's Dice loss of the predicted masks (y), read from the
       training log (`training_series`). Both fall as training goes on, so their raw
       correlation mostly says that both follow the step. The panel is a partial correlation
       with the step held fixed (`partial_correlation`): x and y are each regressed on a smooth
       function of the step (`step_basis`: linear and log terms plus hinges at quantile knots)
       and the residuals are correlated; the fit's degrees of freedom drop by the number of step
       terms. The log has one record per step, so "across samples within a step" is not
       available; the raw correlation is kept beside the partial one.
right  the paper plots, per test instance, the heatmap's IoU against the mask's IoU with the
       ground truth. The mask decoder takes the slot's heatmap as its dense prompt
       (`segcompass.modeling.mask_decoder`), so a mask follows its heatmap by construction and
       that correlation says nothing about the concept pathway. The panel is replaced by a
       comparison against ground truth alone (`referred_vs_other`): per test image, the
       heatmap of the model's most confident slot (chosen without the ground truth) is scored
       on the referred object and on each other object of the same image; a hit is an image
       whose best-scoring object is a referred one, against the chance rate
       n_referred / n_objects that a heatmap blind to the instruction would reach.
       An object's score is the mean heatmap probability over its pixels: a uniform heatmap
       scores every object alike whatever its size (an IoU would favour large objects), and no
       binarisation threshold is needed.

Band: the OLS mean ŷ(x0) = a + b x0 ± t_{(1+level)/2, df} · s · sqrt(1/n + (x0 - x̄)² / Sxx),
s² = SSE / df, df = n - 2 - (covariates partialled out) (the band of the fitted mean, not a
prediction band).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from analyses.patches import as_numpy
from analyses.plotting import label_axes, new_figure


TRAINING_X_KEY = "sae_mse"
"""Training-log key of the frozen SAE's reconstruction MSE on the batch's hooked activations."""
TRAINING_Y_KEY = "mask_dice"
"""Training-log key of the batch's Dice loss on matched masks (`segcompass.training.supervised` writes it)."""


class ConfidenceBand(NamedTuple):
    x: np.ndarray
    """(n_grid,) evenly spaced x from min(x) to max(x)."""
    lower: np.ndarray
    """(n_grid,) lower edge of the confidence band of the fitted mean."""
    upper: np.ndarray
    """(n_grid,) upper edge."""


class CorrelationResult(NamedTuple):
    slope: float
    """OLS slope b of y = a + b x."""
    intercept: float
    """OLS intercept a."""
    pearson_r: float
    p_value: float
    """Two-sided p of H0: r = 0 (t test with n - 2 degrees of freedom)."""
    n: int
    band: ConfidenceBand
    level: float
    """Confidence level of the band (0.95)."""

    def summary(self) -> dict:
        """JSON-able scalars (no band)."""
        return {"slope": self.slope, "intercept": self.intercept, "pearson_r": self.pearson_r,
                "p_value": self.p_value, "n": self.n, "level": self.level}


def correlate(x, y, *, level: float = 0.95, n_grid: int = 100, covariates: int = 0) -> CorrelationResult:
    """OLS fit of y on x, Pearson r and p, and the `level` confidence band of the mean.

    `covariates`: terms already regressed out of x and y (`partial_correlation`); the t test
    and the band then use n - 2 - covariates degrees of freedom.
    """
    x, y = as_numpy(x).astype(np.float64).ravel(), as_numpy(y).astype(np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x has {x.size} values and y {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = x.size
    dof = n - 2 - covariates
    if dof < 1:
        raise ValueError(f"need at least {3 + covariates} finite (x, y) points for a fit with a band "
                         f"({covariates} covariates), got {n}")
    if np.ptp(x) == 0:
        raise ValueError("x is constant: no regression line")
    mean_x, mean_y = x.mean(), y.mean()
    sxx, sxy = ((x - mean_x) ** 2).sum(), ((x - mean_x) * (y - mean_y)).sum()
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    residual = y - (intercept + slope * x)
    s = math.sqrt((residual**2).sum() / dof)
    grid = np.linspace(x.min(), x.max(), n_grid)
    half = stats.t.ppf((1 + level) / 2, dof) * s * np.sqrt(1 / n + (grid - mean_x) ** 2 / sxx)
    fit = intercept + slope * grid
    if np.ptp(y) == 0:
        r, p = float("nan"), float("nan")  # Pearson r is undefined for constant y
    elif covariates == 0:
        r, p = stats.pearsonr(x, y)
    else:
        r = float(np.clip(sxy / math.sqrt(sxx * ((y - mean_y) ** 2).sum()), -1.0, 1.0))
        p = 0.0 if abs(r) == 1 else float(2 * stats.t.sf(abs(r) * math.sqrt(dof / (1 - r * r)), dof))
    return CorrelationResult(float(slope), float(intercept), float(r), float(p), int(n),
                             ConfidenceBand(grid, fit - half, fit + half), level)


def read_records(path: str | Path) -> list[dict]:
    """The JSON objects of a JSONL training log, one per line (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def records_xy(records: Iterable[Mapping] | str | Path, x_key: str = TRAINING_X_KEY,
               y_key: str = TRAINING_Y_KEY) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) float arrays from the records (or JSONL log) holding finite numbers at both keys.

    Training logs mix record kinds (step metrics, evaluations); those without both keys
    are skipped. Raises if none has them, naming the keys that do occur.
    """
    series = training_series(records, x_key, y_key)
    return series.x, series.y


class TrainingSeries(NamedTuple):
    """The training-log records holding both keys, in log order."""

    step: np.ndarray
    """(n,) float64 the record's `step`, or its position in the log where it has none."""
    x: np.ndarray
    """(n,) float64 values at the x key."""
    y: np.ndarray
    """(n,) float64 values at the y key."""


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def training_series(records: Iterable[Mapping] | str | Path, x_key: str = TRAINING_X_KEY,
                    y_key: str = TRAINING_Y_KEY, step_key: str = "step") -> TrainingSeries:
    """(step, x, y) of the records (or JSONL log) holding numbers at both keys (see `records_xy`)."""
    if isinstance(records, (str, Path)):
        records = read_records(records)
    records = list(records)
    rows = [(r[step_key] if _number(r.get(step_key)) else i, r[x_key], r[y_key]) for i, r in enumerate(records)
            if _number(r.get(x_key)) and _number(r.get(y_key))]
    if not rows:
        seen = sorted({k for r in records for k in r})
        raise ValueError(f"no record holds both {x_key!r} and {y_key!r}; keys present: {seen}")
    table = np.asarray(rows, dtype=np.float64)  # (n, 3)
    return TrainingSeries(table[:, 0], table[:, 1], table[:, 2])


# ---------------------------------------------------------------- step held fixed

def default_knots(n: int) -> int:
    """Hinge knots of the step trend for n points: one per 10 points beyond the first 10, at most 8."""
    return int(min(8, max(0, (n - 10) // 10)))


def step_basis(step, n_knots: int | None = None) -> np.ndarray:
    """(n, 2 + n_knots) smooth-trend terms of the step (no intercept): s, log(1 + s - min s), and
    hinges max(0, s - k) at the n_knots interior quantiles of the distinct steps.

    The log term follows a loss that falls fast early; the hinges make the trend piecewise
    linear, so any slow drift shared by two series is absorbed.
    """
    s = as_numpy(step).astype(np.float64).ravel()
    n_knots = default_knots(len(s)) if n_knots is None else n_knots
    columns = [s, np.log1p(s - s.min())]
    distinct = np.unique(s)
    if n_knots and len(distinct) > 2:
        knots = np.unique(np.quantile(distinct, np.arange(1, n_knots + 1) / (n_knots + 1)))
        columns += [np.maximum(0.0, s - k) for k in knots]
    return np.stack(columns, axis=1)


def residualize(values, basis: np.ndarray) -> np.ndarray:
    """(n,) residuals of the least-squares fit of values on [1, basis]."""
    values = as_numpy(values).astype(np.float64).ravel()
    design = np.column_stack([np.ones(len(values)), basis])  # (n, 1 + p)
    coefficients, *_ = np.linalg.lstsq(design, values, rcond=None)
    return values - design @ coefficients


class PartialCorrelation(NamedTuple):
    partial: CorrelationResult
    """Fit of y's residual on x's residual, degrees of freedom reduced by the step terms: its
    slope is y's coefficient on x with the step trend in the model (Frisch-Waugh-Lovell)."""
    raw: CorrelationResult
    """Fit of y on x, nothing held fixed."""
    x_residual: np.ndarray
    """(n,) x minus its step trend."""
    y_residual: np.ndarray
    """(n,) y minus its step trend."""
    step: np.ndarray
    """(n,) the step of each point kept (non-finite points are dropped)."""
    n_step_terms: int
    """Columns of the step basis (the degrees of freedom spent on the trend, intercept aside)."""


def partial_correlation(x, y, step, *, n_knots: int | None = None, level: float = 0.95) -> PartialCorrelation:
    """Correlation of x and y with the step held fixed: both regressed on `step_basis(step)`, the
    residuals correlated (non-finite points dropped first)."""
    x, y, step = (as_numpy(v).astype(np.float64).ravel() for v in (x, y, step))
    if not x.shape == y.shape == step.shape:
        raise ValueError(f"x, y and step must have one value per point, got {x.size}, {y.size}, {step.size}")
    keep = np.isfinite(x) & np.isfinite(y) & np.isfinite(step)
    x, y, step = x[keep], y[keep], step[keep]
    basis = step_basis(step, n_knots)
    rank = int(np.linalg.matrix_rank(np.column_stack([np.ones(len(step)), basis]))) - 1 if len(step) else 0
    rx, ry = residualize(x, basis), residualize(y, basis)
    return PartialCorrelation(correlate(rx, ry, level=level, covariates=rank), correlate(x, y, level=level),
                              rx, ry, step, rank)


# ---------------------------------------------------------------- heatmap vs ground truth

def object_scores(heatmap, objects) -> np.ndarray:
    """(n,) mean of an (H, W) heatmap over each of n (H, W) object masks (NaN for an empty mask)."""
    heat = as_numpy(heatmap).astype(np.float64)
    objects = as_numpy(objects).astype(bool)
    if objects.shape[1:] != heat.shape:
        raise ValueError(f"objects {objects.shape} and heatmap {heat.shape} must share (H, W)")
    area = objects.sum(axis=(1, 2))
    inside = (objects * heat).sum(axis=(1, 2))  # (n,)
    return np.where(area > 0, inside / np.maximum(area, 1), np.nan)


class ReferredVsOther(NamedTuple):
    """Per test image: the most confident slot's heatmap on its referred and other objects."""

    referred: np.ndarray
    """(n,) best score (mean heatmap probability inside the object) over the referred objects."""
    other: np.ndarray
    """(n,) best score over the image's other objects."""
    chance: np.ndarray
    """(n,) n_referred / n_objects: how often a heatmap blind to the instruction would score a
    referred object best."""
    sample: np.ndarray
    """(n,) int64 the image (sample index) of each point."""
    n_skipped: int
    """Images without a referred object or without another object (no comparison)."""

    def summary(self) -> dict:
        """JSON-able: hit rate against chance (exact one-sided p, ties as misses), mean scores."""
        n = len(self.referred)
        hits, ties = self.referred > self.other, self.referred == self.other
        difference = self.referred - self.other
        nan = float("nan")
        return {"n": n, "n_skipped": self.n_skipped, "slot": "most confident",
                "score": "mean heatmap probability inside the object",
                "hit_rate": float(hits.mean()) if n else nan, "tie_rate": float(ties.mean()) if n else nan,
                "chance_rate": float(self.chance.mean()) if n else nan,
                "hit_p_value": poisson_binomial_sf(int(hits.sum()), self.chance) if n else nan,
                "mean_referred": float(self.referred.mean()) if n else nan,
                "mean_other": float(self.other.mean()) if n else nan,
                "mean_difference": float(difference.mean()) if n else nan,
                "difference_sem": float(difference.std(ddof=1) / math.sqrt(n)) if n > 1 else nan}


def poisson_binomial_sf(hits: int, probabilities) -> float:
    """P(H >= hits) for H a sum of independent Bernoulli(p_i) (exact, by convolution)."""
    dist = np.ones(1)
    for p in as_numpy(probabilities).astype(np.float64).ravel():
        dist = np.convolve(dist, [1.0 - p, p])
    return float(min(1.0, dist[hits:].sum()))


class ImageComparison(NamedTuple):
    """One image of `ReferredVsOther`."""

    referred: float
    other: float
    chance: float


def referred_vs_other(heatmap_probs, confidences, objects, referred: Sequence[int]) -> ImageComparison | None:
    """The most confident slot's best score on the referred and on the other objects of one
    image, and the chance rate; None without a referred or another (non-empty) object.

    heatmap_probs (K, H, W) slot heatmap probabilities; confidences (K,) slot confidences (the
    most confident slot is scored: chosen without the ground truth); objects (n, H, W) every
    object of the image in the heatmap's frame; referred the indices of the targets.
    """
    heat = as_numpy(heatmap_probs)
    slot = int(np.argmax(as_numpy(confidences)))
    scores = object_scores(heat[slot], objects)  # (n,)
    present = ~np.isnan(scores)
    is_referred = np.zeros(len(scores), bool)
    is_referred[list(referred)] = True
    mine, others = scores[present & is_referred], scores[present & ~is_referred]
    if not len(mine) or not len(others):
        return None
    return ImageComparison(float(mine.max()), float(others.max()), len(mine) / (len(mine) + len(others)))


def concat_referred_vs_other(parts: Sequence[ImageComparison | None]) -> ReferredVsOther:
    """The images of `referred_vs_other` (one entry per sample, None where skipped) in one result."""
    kept = [(b, *part) for b, part in enumerate(parts) if part is not None]
    table = np.asarray([row[1:] for row in kept], dtype=np.float64).reshape(-1, 3)
    return ReferredVsOther(table[:, 0], table[:, 1], table[:, 2], np.asarray([row[0] for row in kept], np.int64),
                           len(parts) - len(kept))


def plot_referred_vs_other(result: ReferredVsOther, *, title: str, ax=None) -> Figure:
    """Best referred vs best other score per image, the no-preference diagonal, hit rate vs chance."""
    if ax is None:
        fig, (ax,) = new_figure(width=5.5, height=4.5)
    else:
        fig = ax.figure
    ax.scatter(result.other, result.referred, s=14, alpha=0.6, color="#2ca02c",
               label=f"images (n={len(result.referred)})")
    top = max(1e-6, float(np.nanmax(np.r_[result.other, result.referred], initial=0.0)))
    ax.plot([0, top], [0, top], linestyle="--", color="#7f7f7f", label="y = x (no preference)")
    summary = result.summary()
    ax.text(0.03, 0.97, f"referred best: {summary['hit_rate']:.2f}\nchance: {summary['chance_rate']:.2f}\n"
            f"p = {summary['hit_p_value']:.2g}", transform=ax.transAxes, va="top", ha="left",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    label_axes(ax, "heatmap on the best other object (mean prob.)", "heatmap on the referred object (mean prob.)",
               title)
    ax.legend(loc="lower right", fontsize="small")
    return fig


def plot_correlation(result: CorrelationResult, x, y, *, xlabel: str, ylabel: str, title: str,
                     ax=None, note: str | None = None) -> Figure:
    """Scatter of the points, the OLS line, its confidence band and an r / p / n annotation
    (`note` adds a line to it)."""
    if ax is None:
        fig, (ax,) = new_figure(width=5.5, height=4.5)
    else:
        fig = ax.figure
    ax.scatter(as_numpy(x), as_numpy(y), s=14, alpha=0.6, color="#1f77b4", label=f"points (n={result.n})")
    band = result.band
    ax.plot(band.x, result.intercept + result.slope * band.x, color="#d62728",
            label=f"OLS y = {result.intercept:.3g} + {result.slope:.3g} x")
    ax.fill_between(band.x, band.lower, band.upper, color="#d62728", alpha=0.2,
                    label=f"{round(result.level * 100)}% CI of the mean")
    text = f"Pearson r = {result.pearson_r:.3f}\np = {result.p_value:.2g}\nn = {result.n}"
    ax.text(0.03, 0.97, text + (f"\n{note}" if note else ""),
            transform=ax.transAxes, va="top", ha="left",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    label_axes(ax, xlabel, ylabel, title)
    ax.legend(loc="lower right", fontsize="small")
    return fig
