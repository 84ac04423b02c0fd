"""Builders for the SegCompass head, with every number in one place (`HEAD_PRESETS`).

Paper presets (llava-1.5-7b / 13b, qwen2.5-vl-7b): d_sae 65536, codebook d_c 512, threshold
2.0, 2 pre-norm encoder blocks (8 heads, ff 2048), K_s = 6 slots (the paper's maximum),
slot mapper 4 heads x 64 over SAM ViT-H keys (256 x 64 x 64), heatmaps upsampled 4x to
SAM's 256^2 mask-prompt size. The world presets are the same architecture, narrow, for the
tiny twins (d_model 128) and the small SAM (`sam-tiny-16`).

`d_llm` and `d_sae` must match the policy and the SAE actually loaded: pass them as
overrides (`head_config("tiny-llava", d_sae=sae.cfg.d_sae)`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from transformers import SamModel

from saekit.errors import UserError
from segcompass.modeling.concept_aggregator import ConceptAggregator
from segcompass.modeling.mask_decoder import SlotMaskDecoder
from segcompass.modeling.query_codebook import QueryCodebook
from segcompass.modeling.sam_backbone import SamBackbone
from segcompass.modeling.segcompass_head import SegCompassHead
from segcompass.modeling.slot_mapper import SlotMapper


@dataclass(frozen=True)
class HeadConfig:
    """Dimensions of the codebook -> aggregator -> slot mapper -> mask decoder head."""

    d_sae: int = 65536
    """SAE dictionary width (the codebook's rows)."""
    d_llm: int = 4096
    """Hidden size of the policy (concentration-token states e_k)."""
    d_c: int = 512
    """Codebook / concept representation width."""
    threshold: float = 2.0
    """Atoms with |h_j| below this are dropped before the codebook (paper: 2.0)."""
    codebook_tokens: Literal["per_token", "per_atom"] = "per_token"
    """Aggregator input: one codebook token per LLM token (sum of its atoms) or per (token, atom)."""
    num_slots: int = 6
    """K_s, slots (concentration tokens) per sample (paper: at most 6)."""
    aggregator_layers: int = 2
    """Pre-norm Transformer encoder blocks in the concept aggregator."""
    aggregator_heads: int = 8
    """Attention heads of the aggregator."""
    aggregator_ff: int = 2048
    """Feed-forward width of the aggregator."""
    dropout: float = 0.0
    """Dropout in the aggregator blocks."""
    query_dim: int = 512
    """d_q, width of the slot queries Q_k = MLP([e_k; r_k])."""
    query_mlp_hidden: int = 1024
    """Hidden width of the query MLP and the confidence head."""
    mapper_heads: int = 4
    """N_h, slot-mapper score heads."""
    mapper_head_dim: int = 64
    """d_h, slot-mapper head width."""
    map_head_hidden: int = 32
    """Channels of the conv map head F_map."""
    confidence_uses_query: bool = True
    """Feed Q_k to the confidence head besides the pooled scores (the paper's F_conf sees S only)."""
    key_kernel: int = 1
    """Side of the slot mapper's key projection W^K over the image embedding: 1 = the paper's
    per-position projection; 3 lets each key see its 3x3 neighbourhood of embedding cells."""
    policy_image_keys: bool = False
    """Add the policy's own image tokens (layer-L states, the ones the SAE reads) to the slot
    mapper's keys, bilinearly resized to the SAM grid (`SlotMapper(policy_dim=...)`). Off in
    the paper presets (SAM ViT-H keys only); on for the world, whose small SAM stand-in
    barely encodes shape. Needs a square grid of image tokens (LLaVA)."""
    sam_preset: str = "sam-vit-h"
    """SAM preset whose image embedding, prompt encoder and mask decoder the head uses."""
    routing: Literal["paper", "concepts"] = "paper"
    """What the slot mapper reads. 'paper': raw concentration-token states e_k (and, with
    `policy_image_keys`, raw image-token states). 'concepts': only thresholded SAE atoms and
    SAM's embedding: e_k is read as its own SAE code through the codebook, the keys add the
    image tokens' codes through a key codebook (`SegCompassHead`), so the atoms decide."""

    def __post_init__(self) -> None:
        for name in ("d_sae", "d_llm", "d_c", "num_slots", "aggregator_heads", "aggregator_ff",
                     "query_dim", "query_mlp_hidden", "mapper_heads", "mapper_head_dim", "map_head_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"HeadConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_c % self.aggregator_heads:
            raise ValueError(f"d_c {self.d_c} must be divisible by aggregator_heads {self.aggregator_heads}")
        if self.key_kernel % 2 == 0:
            raise ValueError(f"HeadConfig.key_kernel must be odd, got {self.key_kernel}")
        if self.threshold < 0 or not 0 <= self.dropout < 1:
            raise ValueError("threshold must be >= 0 and dropout in [0, 1)")
        if self.routing not in ("paper", "concepts"):
            raise ValueError(f"routing must be paper or concepts, got {self.routing!r}")
        if self.codebook_tokens not in ("per_token", "per_atom"):
            raise ValueError(f"codebook_tokens must be per_token or per_atom, got {self.codebook_tokens!r}")


_PAPER = HeadConfig()
# The threshold is in the SAE's own units: on the world SAE (layer 2 of the tiny policy,
# inputs normalised to E||x|| = sqrt(d_in)) the median |h| is ~0.35 and 1% exceed 1.3, so
# the paper's 2.0 would drop every atom; 0.75 keeps ~15 atoms per token (the paper's
# regime: a small fraction of each token's active atoms).
_WORLD = HeadConfig(d_sae=4096, d_llm=128, d_c=128, threshold=0.75, num_slots=4, aggregator_heads=4, aggregator_ff=256,
                    query_dim=128, query_mlp_hidden=256, mapper_heads=4, mapper_head_dim=32,
                    map_head_hidden=16, policy_image_keys=True, sam_preset="sam-tiny-16")

HEAD_PRESETS: dict[str, HeadConfig] = {
    "llava-1.5-7b": dataclasses.replace(_PAPER, d_llm=4096),
    "llava-1.5-13b": dataclasses.replace(_PAPER, d_llm=5120),
    "qwen2.5-vl-7b": dataclasses.replace(_PAPER, d_llm=3584),
    "tiny-llava": _WORLD,
    "tiny-qwen2.5-vl": _WORLD,
    # concept routing reading every active atom: the codes are then all the head knows
    "tiny-llava-concepts": dataclasses.replace(_WORLD, routing="concepts", threshold=0.0),
}


def head_config(preset: str, **overrides) -> HeadConfig:
    """The preset's HeadConfig with `overrides` (e.g. d_sae of the loaded SAE) applied."""
    if preset not in HEAD_PRESETS:
        raise UserError(f"unknown head preset {preset!r}; choose one of {', '.join(HEAD_PRESETS)}")
    return dataclasses.replace(HEAD_PRESETS[preset], **overrides)


def build_codebook(cfg: HeadConfig) -> QueryCodebook:
    return QueryCodebook(d_sae=cfg.d_sae, d_c=cfg.d_c, threshold=cfg.threshold, mode=cfg.codebook_tokens)


def build_aggregator(cfg: HeadConfig) -> ConceptAggregator:
    return ConceptAggregator(num_slots=cfg.num_slots, d_model=cfg.d_c, num_layers=cfg.aggregator_layers,
                             num_heads=cfg.aggregator_heads, ff_dim=cfg.aggregator_ff, dropout=cfg.dropout)


def build_slot_mapper(cfg: HeadConfig, *, image_dim: int) -> SlotMapper:
    # concept routing: queries and policy keys are codebook vectors (d_c), not raw states (d_llm)
    query_in = cfg.d_c if cfg.routing == "concepts" else cfg.d_llm
    policy_keys = cfg.d_c if cfg.routing == "concepts" else (cfg.d_llm if cfg.policy_image_keys else 0)
    return SlotMapper(llm_dim=query_in, concept_dim=cfg.d_c, image_dim=image_dim, query_dim=cfg.query_dim,
                      mlp_hidden=cfg.query_mlp_hidden, num_heads=cfg.mapper_heads,
                      head_dim=cfg.mapper_head_dim, map_hidden=cfg.map_head_hidden, upsample=4,
                      confidence_uses_query=cfg.confidence_uses_query, key_kernel=cfg.key_kernel,
                      policy_dim=policy_keys)


def build_mask_decoder(sam: SamModel) -> SlotMaskDecoder:
    """SAM's prompt encoder, mask decoder and grid encoding, shared (not copied) with `sam`."""
    return SlotMaskDecoder(prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder,
                           positional_embedding=sam.shared_image_embedding)


def build_backbone(sam: SamModel, *, trainable: bool = False) -> SamBackbone:
    return SamBackbone(vision_encoder=sam.vision_encoder, trainable=trainable)


def build_head(cfg: HeadConfig, sam: SamModel) -> SegCompassHead:
    """The full head; its mask decoder is `sam`'s (load or build `sam` for cfg.sam_preset)."""
    return SegCompassHead(codebook=build_codebook(cfg), aggregator=build_aggregator(cfg),
                          slot_mapper=build_slot_mapper(cfg, image_dim=sam.config.vision_config.output_channels),
                          mask_decoder=build_mask_decoder(sam),
                          key_codebook=build_codebook(cfg) if cfg.routing == "concepts" else None)
