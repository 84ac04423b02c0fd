"""Hungarian matching of slots to target instances on soft IoU (scipy's linear_sum_assignment)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor


class Match(NamedTuple):
    """A one-to-one assignment of min(K, N) slots to targets."""

    slot: Tensor
    """(M,) int64 slot indices, ascending."""
    target: Tensor
    """(M,) int64 target indices matched to those slots."""
    score: Tensor
    """(M,) soft IoU of each matched pair."""


def soft_iou(probs: Tensor, targets: Tensor, eps: float = 1e-6) -> Tensor:
    """(K, H, W) probabilities x (N, H, W) targets in [0, 1] -> (K, N) soft IoU.

    sum(p t) / (sum p + sum t - sum(p t)): the IoU of binary masks, made continuous.
    """
    p, t = probs.flatten(1).float(), targets.flatten(1).float()  # (K, HW), (N, HW)
    intersection = p @ t.T  # (K, N)
    union = p.sum(1)[:, None] + t.sum(1)[None, :] - intersection
    return intersection / (union + eps)


def hungarian_match(scores: Tensor) -> Match:
    """Maximise the total of a (K, N) score matrix over one-to-one pairs (min(K, N) of them)."""
    k, n = scores.shape
    if k == 0 or n == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=scores.device)
        return Match(empty, empty, scores.new_zeros(0))
    values = np.nan_to_num(scores.detach().float().cpu().numpy(), nan=0.0)
    rows, cols = linear_sum_assignment(values, maximize=True)  # rows ascending
    slot = torch.as_tensor(rows, dtype=torch.int64, device=scores.device)
    target = torch.as_tensor(cols, dtype=torch.int64, device=scores.device)
    return Match(slot, target, scores.detach()[slot, target])


def match_slots(probs: Tensor, targets: Tensor) -> Match:
    """Match (K, H, W) slot probabilities to (N, H, W) targets by soft IoU."""
    return hungarian_match(soft_iou(probs, targets))
