"""Figure 8: OLS fits with a 95% confidence band of the mean, Pearson r and p.

Two uses, as in the paper's appendix C.1:
  left   one point per training batch: the frozen SAE's reconstruction MSE on the batch's
         hooked activations (x) vs the batch's Dice loss of the predicted masks (y), read
         from training-log records (`records_xy`);
  right  one point per test instance: heatmap IoU vs mask IoU against that instance's
         ground truth (`instance_ious`). For one instance the paper's cIoU (Σ I / Σ U)
         is its IoU; slots are matched to instances by Hungarian matching on the masks'
         soft IoU, and instances left without a slot (more targets than slots) are counted
         but get no point.

Band: the OLS mean ŷ(x0) = a + b x0 ± t_{(1+level)/2, n-2} · s · sqrt(1/n + (x0 - x̄)² / Sxx),
s² = SSE / (n - 2) (the band of the fitted mean, not a prediction band).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import stats

from analyses.patches import as_numpy
from analyses.plotting import label_axes, new_figure
from segcompass.matching import match_slots


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


def correlate(x, y, *, level: float = 0.95, n_grid: int = 100) -> CorrelationResult:
    """OLS fit of y on x, Pearson r and p, and the `level` confidence band of the mean."""
    x, y = as_numpy(x).astype(np.float64).ravel(), as_numpy(y).astype(np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x has {x.size} values and y {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = x.size
    if n < 3:
        raise ValueError(f"need at least 3 finite (x, y) points for a fit with a band, got {n}")
    if np.ptp(x) == 0:
        raise ValueError("x is constant: no regression line")
    mean_x, mean_y = x.mean(), y.mean()
    sxx, sxy = ((x - mean_x) ** 2).sum(), ((x - mean_x) * (y - mean_y)).sum()
    slope = sxy / sxx
    intercept = mean_y - slope * mean_x
    residual = y - (intercept + slope * x)
    s = math.sqrt((residual**2).sum() / (n - 2))
    grid = np.linspace(x.min(), x.max(), n_grid)
    half = stats.t.ppf((1 + level) / 2, n - 2) * s * np.sqrt(1 / n + (grid - mean_x) ** 2 / sxx)
    fit = intercept + slope * grid
    if np.ptp(y) == 0:
        r, p = float("nan"), float("nan")  # Pearson r is undefined for constant y
    else:
        r, p = stats.pearsonr(x, y)
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
    if isinstance(records, (str, Path)):
        records = read_records(records)
    records = list(records)
    pairs = [(r[x_key], r[y_key]) for r in records
             if isinstance(r.get(x_key), (int, float)) and isinstance(r.get(y_key), (int, float))]
    if not pairs:
        seen = sorted({k for r in records for k in r})
        raise ValueError(f"no record holds both {x_key!r} and {y_key!r}; keys present: {seen}")
    xy = np.asarray(pairs, dtype=np.float64)
    return xy[:, 0], xy[:, 1]


class InstanceIoUs(NamedTuple):
    heatmap_iou: np.ndarray
    """(n,) IoU of the matched slot's binarised heatmap with the instance."""
    mask_iou: np.ndarray
    """(n,) IoU of the matched slot's binarised mask with the instance."""
    n_unmatched: int
    """Instances that got no slot (more targets than slots): no point for them."""


def _iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    inter, union = (pred & target).sum().item(), (pred | target).sum().item()
    return inter / union if union else 1.0


def instance_ious(heatmap_probs, mask_probs, targets, *, heatmap_threshold: float = 0.5,
                  mask_threshold: float = 0.5) -> InstanceIoUs:
    """Per target instance of one sample: (heatmap IoU, mask IoU) of the slot matched to it.

    heatmap_probs, mask_probs (K, H, W) probabilities in the targets' frame (resample
    first); targets (N, H, W) instance masks, N may be 0. Slots are matched to instances
    on the masks' soft IoU (`segcompass.matching.match_slots`).
    """
    heat = torch.as_tensor(as_numpy(heatmap_probs), dtype=torch.float32)
    masks = torch.as_tensor(as_numpy(mask_probs), dtype=torch.float32)
    gt = torch.as_tensor(as_numpy(targets)).bool()
    if heat.shape != masks.shape or heat.shape[1:] != gt.shape[1:]:
        raise ValueError(f"heatmaps {tuple(heat.shape)}, masks {tuple(masks.shape)} and targets "
                         f"{tuple(gt.shape)} must share (H, W) and the slot count")
    match = match_slots(masks, gt.float())
    pairs = list(zip(match.slot.tolist(), match.target.tolist()))
    heat_iou = [_iou(heat[k] > heatmap_threshold, gt[t]) for k, t in pairs]
    mask_iou = [_iou(masks[k] > mask_threshold, gt[t]) for k, t in pairs]
    return InstanceIoUs(np.asarray(heat_iou), np.asarray(mask_iou), len(gt) - len(pairs))


def concat_instance_ious(parts: Sequence[InstanceIoUs]) -> InstanceIoUs:
    """The instances of many samples in one InstanceIoUs."""
    return InstanceIoUs(np.concatenate([p.heatmap_iou for p in parts] or [np.zeros(0)]),
                        np.concatenate([p.mask_iou for p in parts] or [np.zeros(0)]),
                        sum(p.n_unmatched for p in parts))


def plot_correlation(result: CorrelationResult, x, y, *, xlabel: str, ylabel: str, title: str,
                     ax=None) -> Figure:
    """Scatter of the points, the OLS line, its confidence band and an r / p / n annotation."""
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
    ax.text(0.03, 0.97, f"Pearson r = {result.pearson_r:.3f}\np = {result.p_value:.2g}\nn = {result.n}",
            transform=ax.transAxes, va="top", ha="left",
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.8})
    label_axes(ax, xlabel, ylabel, title)
    ax.legend(loc="lower right", fontsize="small")
    return fig
