"""Referring / reasoning segmentation metrics: gIoU, cIoU, and gRefCOCO's N-acc and T-acc.

Per sample, the prediction and the ground truth (the union of the target instances) are
compared on the pixels that are not ignored: ignore pixels are removed from both before
counting the intersection I and the union U.

- gIoU = mean over samples of I / U, where a sample whose prediction and target are both
  empty scores 1 (gRefCOCO's convention for a correctly rejected no-target expression,
  also LISA's `union == 0` rule) and contributes 0 / 0 to cIoU.
- cIoU = sum(I) / sum(U) over the split (1.0 if every sample is empty/empty).
- N-acc = no-target samples predicted empty / no-target samples (ReLA: TP / (TP + FN)).
- T-acc = target samples predicted non-empty / target samples (ReLA: TN / (TN + FP)).
  Either is NaN when the split has no sample of its kind (ReLA prints 0, which reads as
  a failure).

"Empty" and "no-target" are judged on the non-ignored pixels: a target that lies wholly
in the ignore region counts as no target. `MetricAccumulator` streams samples (one at a
time or a batch at a time); `reference_scores` is the plain loop it is tested against.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


class SplitScores(NamedTuple):
    giou: float
    """Mean per-sample IoU (empty prediction on empty target = 1)."""
    ciou: float
    """Sum of intersections / sum of unions."""
    n_acc: float
    """Fraction of no-target samples predicted empty (NaN if there are none)."""
    t_acc: float
    """Fraction of target samples predicted non-empty (NaN if there are none)."""
    n_samples: int
    n_no_target: int

    def as_dict(self) -> dict[str, float | int | None]:
        """JSON-able: NaN becomes None."""
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in self._asdict().items()}


class SampleCounts(NamedTuple):
    intersection: np.ndarray
    """(B,) int64 |pred & gt| on non-ignored pixels."""
    union: np.ndarray
    """(B,) int64 |pred | gt| on non-ignored pixels."""
    pred_empty: np.ndarray
    """(B,) bool: no predicted pixel outside the ignore region."""
    gt_empty: np.ndarray
    """(B,) bool: no target pixel outside the ignore region (a no-target sample)."""


def _as_bool(x) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == bool else x != 0


def batch_counts(pred, gt, ignore=None) -> SampleCounts:
    """Vectorised per-sample counts of (B, H, W) predictions and targets (any non-zero is
    foreground), with an optional (B, H, W) or (H, W) ignore mask."""
    pred, gt = _as_bool(pred), _as_bool(gt)
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be (B, H, W)")
    if ignore is not None:
        valid = ~np.broadcast_to(_as_bool(ignore), pred.shape)
        pred, gt = pred & valid, gt & valid
    flat_pred = pred.reshape(len(pred), -1)  # (B, H, W) -> (B, H*W)
    flat_gt = gt.reshape(len(gt), -1)
    pred_area = np.count_nonzero(flat_pred, axis=1)
    gt_area = np.count_nonzero(flat_gt, axis=1)
    inter = np.count_nonzero(flat_pred & flat_gt, axis=1)
    union = pred_area + gt_area - inter
    return SampleCounts(inter.astype(np.int64), union.astype(np.int64),
                        pred_area == 0, gt_area == 0)


def sample_iou(intersection: np.ndarray, union: np.ndarray) -> np.ndarray:
    """(B,) float64 I / U, with 1.0 where U == 0 (both empty)."""
    intersection, union = np.asarray(intersection), np.asarray(union)
    return np.where(union == 0, 1.0, intersection / np.maximum(union, 1))


def target_union(gt) -> np.ndarray:
    """(H, W) bool of a ground truth given as (H, W) or as (N, H, W) instance masks."""
    gt = _as_bool(gt)
    if gt.ndim == 3:
        return gt.any(axis=0)
    if gt.ndim != 2:
        raise ValueError(f"gt must be (H, W) or (N, H, W), got {gt.shape}")
    return gt


class MetricAccumulator:
    """Streams samples into the split's gIoU, cIoU, N-acc and T-acc."""

    def __init__(self) -> None:
        self._parts: list[SampleCounts] = []

    def add(self, pred, gt, ignore=None) -> None:
        """One sample: pred (H, W); gt (H, W) or (N, H, W) instances (N may be 0, but
        then the (0, H, W) shape still gives the size); ignore (H, W) or None."""
        union = target_union(gt)  # (0, H, W) gives an all-False (H, W)
        pred = _as_bool(pred)
        if pred.shape != union.shape:
            raise ValueError(f"prediction {pred.shape} and target {union.shape} differ in size")
        self.add_batch(pred[None], union[None], None if ignore is None else _as_bool(ignore)[None])

    def add_batch(self, pred, gt, ignore=None) -> None:
        """(B, H, W) predictions and target unions, optional (B, H, W) ignore masks."""
        self._parts.append(batch_counts(pred, gt, ignore))

    def counts(self) -> SampleCounts:
        """Every sample added so far, concatenated."""
        if not self._parts:
            empty = np.zeros(0, np.int64)
            return SampleCounts(empty, empty, empty.astype(bool), empty.astype(bool))
        return SampleCounts(*(np.concatenate(f) for f in zip(*self._parts)))

    def result(self) -> SplitScores:
        return scores_from_counts(self.counts())


def scores_from_counts(c: SampleCounts) -> SplitScores:
    n = len(c.intersection)
    if n == 0:
        return SplitScores(math.nan, math.nan, math.nan, math.nan, 0, 0)
    giou = float(sample_iou(c.intersection, c.union).mean())
    total_u = int(c.union.sum())
    ciou = float(c.intersection.sum()) / total_u if total_u else 1.0
    no_target = c.gt_empty
    n_no_target = int(no_target.sum())
    n_acc = float((c.pred_empty & no_target).sum()) / n_no_target if n_no_target else math.nan
    n_target = n - n_no_target
    t_acc = float((~c.pred_empty & ~no_target).sum()) / n_target if n_target else math.nan
    return SplitScores(giou, ciou, n_acc, t_acc, n, n_no_target)


def reference_scores(preds: Sequence, gts: Sequence, ignores: Sequence | None = None
                     ) -> SplitScores:
    """Slow, plain-Python definition of the same scores (for parity tests)."""
    ious, inters, unions, no_target, correct_empty, target, found = [], 0, 0, 0, 0, 0, 0
    for k, (pred, gt) in enumerate(zip(preds, gts)):
        pred, gt = _as_bool(pred).copy(), target_union(gt).copy()
        if ignores is not None and ignores[k] is not None:
            pred[_as_bool(ignores[k])] = False
            gt[_as_bool(ignores[k])] = False
        inter, union = int((pred & gt).sum()), int((pred | gt).sum())
        ious.append(1.0 if union == 0 else inter / union)
        inters, unions = inters + inter, unions + union
        if not gt.any():
            no_target += 1
            correct_empty += int(not pred.any())
        else:
            target += 1
            found += int(pred.any())
    if not ious:
        return SplitScores(math.nan, math.nan, math.nan, math.nan, 0, 0)
    return SplitScores(sum(ious) / len(ious), inters / unions if unions else 1.0,
                       correct_empty / no_target if no_target else math.nan,
                       found / target if target else math.nan, len(ious), no_target)
