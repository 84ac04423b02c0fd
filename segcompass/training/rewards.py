"""GRPO rewards of SegCompass (paper, Appendix B.3): format score, mask score, weighted sum.

    reward = w_format * format + w_mask * mask          (paper: 0.3 / 0.7; Table 6 varies them)
             [+ w_consistency * consistency]            (world only; off unless its weight is set)

format ∈ {0, 0.9, 1.0} comes from `template.parse_response(text, K).format_score`, the
same parser that builds the prompt, so the reward asks for exactly the K concentration
tokens the prompt asked for (the authors' reward demands one while their multi-object
prompt asks for four).

mask ∈ [0, 1]:
  - single object: soft IoU of the first slot's probability mask with the target;
  - multi object: the slots whose confidence passes a threshold are matched to the
    targets (Hungarian on soft IoU); score = sum of matched soft IoUs / max(#kept, #targets),
    so missed targets and spurious slots both cost;
  - both sides empty = 1, exactly one empty = 0.
A slot only exists where the policy wrote a concentration token: slots past the response's
`slots_written` (filled with the last token's state by `policy.slot_inputs`) never count.
"Empty" for a probability mask means no pixel at or above 0.5.

consistency ∈ {0, 0.5, 1} (world samples only: they know their objects): 1 when the chain of
thought's answer line names exactly the targets (`policy_eval.judge`), 0.5 when every object
it names exists in the scene but they are not the targets, 0 otherwise (no parseable
answer, or an object that is not there).

All functions are pure (no model, no state); `mask_rewards` scores a batch of head outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from segcompass.matching import hungarian_match, soft_iou
from segcompass.postprocess import resize_targets
from segcompass.template import parse_response

MASK_ON = 0.5
"""Probability at which a mask pixel counts as foreground (for the emptiness rule)."""


@dataclass(frozen=True)
class RewardConfig:
    """Weights and threshold of the GRPO reward."""

    format_weight: float = 0.3
    """w_format (paper: 0.3)."""
    mask_weight: float = 0.7
    """w_mask (paper: 0.7)."""
    confidence_threshold: float = 0.5
    """Multi-object: a slot is a prediction when sigmoid(c_k) is at least this."""
    consistency_weight: float = 0.0
    """w_consistency (0: the term is left out)."""

    def __post_init__(self) -> None:
        if self.format_weight < 0 or self.mask_weight < 0 or self.consistency_weight < 0:
            raise ValueError(f"reward weights must be >= 0, got {self.format_weight}, {self.mask_weight}, "
                             f"{self.consistency_weight}")
        if not 0 <= self.confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold must lie in [0, 1], got {self.confidence_threshold}")


def format_reward(text: str, k: int) -> float:
    """0 / 0.9 / 1.0 for one decoded response that was asked for `k` concentration tokens."""
    return parse_response(text, k).format_score


def _is_empty(probs: Tensor) -> bool:
    return not bool((probs >= MASK_ON).any())


def single_object_mask_score(prob: Tensor, targets: Tensor) -> float:
    """prob (H, W) in [0, 1] vs targets (N, H, W) in [0, 1] (their union is the referent) -> [0, 1]."""
    target = targets.amax(0) if targets.shape[0] else torch.zeros_like(prob)
    pred_empty, target_empty = _is_empty(prob), not bool((target > 0).any())
    if pred_empty and target_empty:
        return 1.0
    if target_empty:
        return 0.0
    return float(soft_iou(prob[None], target[None])[0, 0])


def multi_object_mask_score(probs: Tensor, confidences: Tensor, targets: Tensor, threshold: float) -> float:
    """probs (K, H, W), confidences (K,) in [0, 1], targets (N, H, W) -> [0, 1].

    Slots with confidence >= threshold are matched one-to-one to the targets by soft IoU;
    the matched IoUs are summed and divided by max(#kept slots, N).
    """
    kept = probs[confidences >= threshold]  # (P, H, W)
    n_pred, n_target = kept.shape[0], targets.shape[0]
    if n_pred == 0 and n_target == 0:
        return 1.0
    if n_pred == 0 or n_target == 0:
        return 0.0
    match = hungarian_match(soft_iou(kept, targets))  # (P, N) -> min(P, N) pairs
    return float(match.score.sum()) / max(n_pred, n_target)


def mask_reward(probs: Tensor, confidences: Tensor, targets: Tensor, *, multi: bool, slots_written: int,
                threshold: float = 0.5) -> float:
    """One response: probs (K, H, W) and confidences (K,) of its slots, targets (N, H, W).

    Only the first `slots_written` slots exist; the single-object prompt reads slot 0.
    """
    written = max(0, min(int(slots_written), probs.shape[0]))
    if not multi:
        if written == 0:  # no concentration token: an empty prediction
            return single_object_mask_score(torch.zeros_like(probs[0]), targets)
        return single_object_mask_score(probs[0], targets)
    return multi_object_mask_score(probs[:written], confidences[:written], targets, threshold)


def mask_rewards(mask_logits: Tensor, confidence_logits: Tensor, targets: Sequence[Tensor],
                 multi: Sequence[bool], slots_written: Tensor, threshold: float = 0.5) -> Tensor:
    """A batch of head outputs -> (B,) float32 mask rewards (no gradient).

    mask_logits (B, K, m, m) in the model frame; confidence_logits (B, K); targets: B tensors
    (N_b, S, S) in the same frame at any resolution (area-resized to m here).
    """
    with torch.no_grad():
        probs, conf = mask_logits.float().sigmoid(), confidence_logits.float().sigmoid()
        size = tuple(mask_logits.shape[-2:])
        scores = [mask_reward(probs[b], conf[b], resize_targets(targets[b].to(probs.device), size),
                              multi=bool(multi[b]), slots_written=int(slots_written[b]), threshold=threshold)
                  for b in range(mask_logits.shape[0])]
    return torch.tensor(scores, dtype=torch.float32)


def consistency_reward(sample, text: str) -> float:
    """1 / 0.5 / 0 for one decoded response to one world sample (see the module docstring)."""
    from segcompass.world.policy_eval import judge

    judgement = judge(sample, text)
    if judgement.target_correct:
        return 1.0
    present = {(o.colour, o.shape) for o in sample.objects}
    return 0.5 if judgement.named and set(judgement.named) <= present else 0.0


def total_reward(format_score: Tensor, mask_score: Tensor, config: RewardConfig = RewardConfig(),
                 consistency: Tensor | None = None) -> Tensor:
    """w_format * format + w_mask * mask (+ w_consistency * consistency when that weight is set),
    elementwise."""
    total = config.format_weight * format_score + config.mask_weight * mask_score
    if config.consistency_weight:
        if consistency is None:
            raise ValueError("a consistency weight needs the consistency scores")
        total = total + config.consistency_weight * consistency.to(total.device, total.dtype)
    return total
