"""Segmentation supervision of the head: L = lambda_s * L_seg + lambda_c * L_conf.

Paper, Sec. 3.3: slots are matched one-to-one to target instances (Hungarian on soft IoU);
    L_seg  = BCE(heatmap H_k, matched target) + lambda_D * Dice(mask M_k, matched target),
             averaged over the matched pairs of the batch;
    L_conf = 1/K_s sum_k BCE(c_k, y_k), y_k = 1 if slot k is matched, averaged over the batch.
A no-target sample has no matched pair: it adds nothing to L_seg and trains all its
confidences toward 0. With more targets than slots, min(K_s, N) pairs are matched and the
rest are counted in `num_unmatched_targets`.

Targets live in the model's padded square frame (see `segcompass.postprocess.targets_to_frame`)
at any resolution; they are area-resized to the heatmap and mask resolutions here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from segcompass.matching import Match, hungarian_match, soft_iou
from segcompass.postprocess import resize_targets


@dataclass(frozen=True)
class SegLossConfig:
    seg_weight: float = 1.0
    """lambda_s, weight of L_seg (paper: 1.0)."""
    conf_weight: float = 0.2
    """lambda_c, weight of L_conf (paper: 0.2)."""
    dice_weight: float = 0.6
    """lambda_D, weight of the mask Dice loss inside L_seg (paper: 0.6)."""
    heatmap_dice_weight: float = 0.0
    """Extra Dice loss on the matched heatmaps (paper: 0, BCE only). Trained from scratch, a
    BCE-only heatmap collapses to 'background everywhere' (targets cover ~2% of the pixels)
    and the mask decoder learns to ignore its prompt; a Dice term keeps it localised."""
    match_on: Literal["mask", "heatmap", "mean"] = "mask"
    """Soft IoU used for matching: of the masks, of the heatmaps, or their mean."""
    dice_smooth: float = 1.0
    """Additive smoothing of the Dice ratio (keeps empty-vs-empty finite)."""

    def __post_init__(self) -> None:
        for name in ("seg_weight", "conf_weight", "dice_weight", "heatmap_dice_weight", "dice_smooth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.match_on not in ("mask", "heatmap", "mean"):
            raise ValueError(f"match_on must be mask, heatmap or mean, got {self.match_on!r}")


class SegLossOutput(NamedTuple):
    total: Tensor
    """lambda_s * seg + lambda_c * conf (scalar)."""
    seg: Tensor
    """heatmap_bce + lambda_D * mask_dice (scalar; 0 when nothing is matched)."""
    heatmap_bce: Tensor
    """Mean per-pixel BCE of matched heatmaps (scalar)."""
    mask_dice: Tensor
    """Mean Dice loss of matched masks (scalar)."""
    conf: Tensor
    """Mean confidence BCE over all samples and slots (scalar)."""
    num_matched: int
    """Matched (slot, target) pairs in the batch."""
    num_targets: int
    """Target instances in the batch."""
    num_unmatched_targets: int
    """Targets left without a slot (more targets than slots)."""
    matches: list[Match]
    """Per-sample assignment (slot, target, soft IoU)."""


def dice_loss(mask_logits: Tensor, targets: Tensor, smooth: float = 1.0) -> Tensor:
    """(M, H, W) logits vs (M, H, W) targets in [0, 1] -> (M,) 1 - soft Dice."""
    p, t = mask_logits.sigmoid().flatten(1), targets.flatten(1)
    return 1 - (2 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)


def _match_scores(heatmap: Tensor, mask: Tensor, resized: tuple[Tensor, Tensor], match_on: str) -> Tensor:
    """(K, N) soft IoU of one sample's slots vs its (heatmap-size, mask-size) targets."""
    with torch.no_grad():
        by_mask = soft_iou(mask.sigmoid(), resized[1]) if match_on != "heatmap" else None
        by_heat = soft_iou(heatmap.sigmoid(), resized[0]) if match_on != "mask" else None
    if by_mask is None:
        return by_heat
    return by_mask if by_heat is None else (by_mask + by_heat) / 2


def segmentation_loss(heatmap_logits: Tensor, mask_logits: Tensor, confidence_logits: Tensor,
                      targets: Sequence[Tensor], config: SegLossConfig = SegLossConfig(),
                      active_slots: Sequence[int] | None = None) -> SegLossOutput:
    """heatmap_logits (B, K, Hh, Wh), mask_logits (B, K, Hm, Wm), confidence_logits (B, K);
    targets: B tensors (N_b, H, W) in the model frame, N_b >= 0 -> SegLossOutput.

    active_slots[b]: only slots 0..active_slots[b]-1 of sample b may be matched (the prompt
    asked for that many concentration tokens; a single-object prompt asks for one, and the
    predictor reads slot 0). The others only learn confidence 0. Default: all K slots.
    """
    batch, slots = confidence_logits.shape
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} target sets for a batch of {batch}")
    heat_size, mask_size = tuple(heatmap_logits.shape[-2:]), tuple(mask_logits.shape[-2:])
    labels = torch.zeros_like(confidence_logits)
    matches, pair_sample, pair_slot, heat_gt, mask_gt = [], [], [], [], []
    for b, target in enumerate(targets):
        target = target.to(heatmap_logits.device)
        resized = (resize_targets(target, heat_size), resize_targets(target, mask_size))
        usable = slots if active_slots is None else int(active_slots[b])
        match = hungarian_match(_match_scores(heatmap_logits[b, :usable], mask_logits[b, :usable], resized,
                                              config.match_on))
        matches.append(match)
        labels[b, match.slot] = 1.0
        pair_sample += [b] * len(match.slot)
        pair_slot.append(match.slot)
        heat_gt.append(resized[0][match.target])
        mask_gt.append(resized[1][match.target])
    conf = F.binary_cross_entropy_with_logits(confidence_logits, labels)
    num_matched = len(pair_sample)
    if num_matched:
        index = (torch.tensor(pair_sample, device=heatmap_logits.device), torch.cat(pair_slot))
        heat_bce = F.binary_cross_entropy_with_logits(
            heatmap_logits[index], torch.cat(heat_gt).to(heatmap_logits.dtype))
        mask_dice = dice_loss(mask_logits[index], torch.cat(mask_gt).to(mask_logits.dtype),
                              config.dice_smooth).mean()
        heat_dice = dice_loss(heatmap_logits[index], torch.cat(heat_gt).to(heatmap_logits.dtype),
                              config.dice_smooth).mean()
    else:  # keep the graph (every parameter gets a zero gradient, as DDP expects)
        heat_bce = heatmap_logits.sum() * 0.0
        mask_dice = mask_logits.sum() * 0.0
        heat_dice = heat_bce
    seg = heat_bce + config.heatmap_dice_weight * heat_dice + config.dice_weight * mask_dice
    num_targets = sum(int(t.shape[0]) for t in targets)
    return SegLossOutput(
        total=config.seg_weight * seg + config.conf_weight * conf, seg=seg, heatmap_bce=heat_bce,
        mask_dice=mask_dice, conf=conf, num_matched=num_matched, num_targets=num_targets,
        num_unmatched_targets=num_targets - num_matched, matches=matches)
