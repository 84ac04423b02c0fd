"""Faithfulness evaluators that re-run only what one slot needs, and read its heatmap or mask.

`analyses.faithfulness.slot_mask_evaluator` runs the whole head and decodes all K slots
(the reference). The SAM-style decoder treats every slot as its own batch entry, so one
slot's mask needs only that slot decoded: `slot_mask_evaluator` here does exactly that
(about K times less decoder work, the decoder being most of the head's cost), and
`slot_heatmap_evaluator` stops before the decoder (soft IoU by default). It measures the
concept pathway's own output: a decoder that has learned to ignore its dense prompt makes
masks blind to the codes while the heatmaps still follow them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from analyses.faithfulness import Evaluate
from saekit.sparse import SparseCodes
from segcompass.matching import soft_iou


@torch.no_grad()
def slot_logits(head, codes: SparseCodes, slot_embeddings: Tensor, image_embeddings: Tensor, slot: int, *,
                decode: bool = True, policy_image: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(heatmap logits (4h, 4w), mask logits (4h, 4w) or None) of `slot` of one sample.

    The same steps as `SegCompassHead.forward` for a batch of one: codes of the sample's
    tokens, slot_embeddings (1, K, d_llm), image_embeddings (1, C, h, w), policy_image
    (1, g*g, d_llm) when the slot mapper keys on the policy's image tokens.
    """
    index = torch.zeros(codes.n_tokens, dtype=torch.int64, device=codes.indices.device)
    cb = head.codebook(codes, index, 1)
    agg = head.aggregator(cb.tokens, cb.padding_mask)
    mapped = head.slot_mapper(slot_embeddings, agg.concepts, image_embeddings, policy_image)
    heatmap = mapped.heatmap_logits[:, slot:slot + 1]  # (1, K, 4h, 4w) -> (1, 1, 4h, 4w)
    if not decode:
        return heatmap[0, 0], None
    return heatmap[0, 0], head.mask_decoder(heatmap, image_embeddings).mask_logits[0, 0]


def _iou(logits: Tensor, target: Tensor, threshold: float) -> float:
    if logits.shape != target.shape:  # (h', w') -> the target's frame
        logits = F.interpolate(logits[None, None].float(), size=tuple(target.shape), mode="bilinear",
                               align_corners=False)[0, 0]
    pred = logits > threshold
    union = (pred | target).sum().item()
    return (pred & target).sum().item() / union if union else 1.0


def slot_mask_evaluator(head, slot_embeddings: Tensor, image_embeddings: Tensor, target: Tensor, slot: int, *,
                        logit_threshold: float = 0.0, policy_image: Tensor | None = None) -> Evaluate:
    """evaluate(codes) -> IoU of `slot`'s mask with `target` (4h, 4w) bool, decoding that slot only."""
    target = target.bool()
    return lambda codes: _iou(slot_logits(head, codes, slot_embeddings, image_embeddings, slot,
                                          policy_image=policy_image)[1], target, logit_threshold)


def slot_heatmap_evaluator(head, slot_embeddings: Tensor, image_embeddings: Tensor, target: Tensor, slot: int, *,
                           soft: bool = True, logit_threshold: float = 0.0,
                           policy_image: Tensor | None = None) -> Evaluate:
    """evaluate(codes) -> IoU of `slot`'s heatmap with `target` (its frame or resampled to it).

    Soft IoU of the heatmap probabilities by default: a heatmap still learning can stay
    below 0.5 everywhere, so its hard IoU is 0 whatever the codes, while its soft IoU
    follows every change. `soft=False`: hard IoU of logit > logit_threshold.
    """
    target = target.bool()

    def evaluate(codes: SparseCodes) -> float:
        heat = slot_logits(head, codes, slot_embeddings, image_embeddings, slot, decode=False,
                           policy_image=policy_image)[0]
        if not soft:
            return _iou(heat, target, logit_threshold)
        if heat.shape != target.shape:
            heat = F.interpolate(heat[None, None].float(), size=tuple(target.shape), mode="bilinear",
                                 align_corners=False)[0, 0]
        return float(soft_iou(heat.sigmoid()[None], target.float()[None])[0, 0])

    return evaluate
