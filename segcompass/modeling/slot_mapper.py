"""Slot mapper: slot queries attend to image keys -> heatmap logits H_k and confidences c_k.

Paper, Eq. (2) and (5):
    Q_k = MLP([e_k ; r_k])                                   (B, K_s, d_q)
    S   = [(Q W^Q_i)(K W^K_i)^T / sqrt(d_h)]_{i=1..N_h}      (B, N_h, K_s, h, w)
    H_k = F_map(S),  c_k = F_conf(S)
with K the image embedding (SAM ViT-H: 256 x 64 x 64) and N_h x d_h = 4 x 64. W^K is a
1x1 convolution (the paper's per-position projection) or, with `key_kernel` k > 1, a k x k
one, so each key also sees its neighbours.

F_map is a small conv head applied to each slot's N_h score maps, its output bilinearly
upsampled by `upsample` (4: SAM's mask prompt is 4x the embedding side, 256^2 for 64^2).
With `policy_dim` > 0 the keys also read the policy's own image tokens (B, n, d_llm), a
square grid of n = g^2 patches: each is layer-normed, projected per position and bilinearly
resized to the SAM grid, then added to SAM's keys (a projection of the concatenated
features, computed in two parts). An addition for the embedded world, whose small SAM
stand-in barely reads an object's shape from an 8-pixel cell while the world policy's image
tokens do (ViT-H's features are semantic; docs/results.md).

F_conf pools each head's score map (max and mean over positions); with
`confidence_uses_query` it also sees Q_k, so a slot can report "nothing to find" from the
reasoning alone (an addition to the paper's S-only head, switchable).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SlotMapperOutput(NamedTuple):
    heatmap_logits: Tensor
    """(B, K_s, upsample*h, upsample*w) heatmap logits at the mask-prompt resolution."""
    confidence_logits: Tensor
    """(B, K_s) confidence logits c_k (sigmoid -> probability that the slot holds a target)."""


class SlotMapper(nn.Module):
    def __init__(self, *, llm_dim: int, concept_dim: int, image_dim: int, query_dim: int,
                 mlp_hidden: int, num_heads: int = 4, head_dim: int = 64, map_hidden: int = 32,
                 upsample: int = 4, confidence_uses_query: bool = True, key_kernel: int = 1,
                 policy_dim: int = 0):
        super().__init__()
        if key_kernel < 1 or key_kernel % 2 == 0:
            raise ValueError(f"SlotMapper: key_kernel must be odd and >= 1, got {key_kernel}")
        self.num_heads, self.head_dim, self.upsample = num_heads, head_dim, upsample
        self.confidence_uses_query = confidence_uses_query
        self.query_mlp = nn.Sequential(nn.Linear(llm_dim + concept_dim, mlp_hidden), nn.GELU(),
                                       nn.Linear(mlp_hidden, query_dim))
        self.query_proj = nn.Linear(query_dim, num_heads * head_dim)  # W^Q_i, all heads
        # W^K_i; a kernel > 1 lets each key see its neighbourhood (the world SAM's cells, 8 px
        # each, barely encode shape on their own), 1 is the paper's per-position projection
        self.key_proj = nn.Conv2d(image_dim, num_heads * head_dim, kernel_size=key_kernel, padding=key_kernel // 2)
        self.policy_dim = policy_dim
        if policy_dim:  # residual-stream states have no fixed scale: normed before projecting
            self.policy_key = nn.Sequential(nn.LayerNorm(policy_dim), nn.Linear(policy_dim, num_heads * head_dim))
        self.map_head = nn.Sequential(
            nn.Conv2d(num_heads, map_hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(map_hidden, map_hidden, 3, padding=1), nn.GELU(),
            nn.Conv2d(map_hidden, 1, 1))
        conf_in = 2 * num_heads + (query_dim if confidence_uses_query else 0)
        self.confidence_head = nn.Sequential(nn.Linear(conf_in, mlp_hidden), nn.GELU(),
                                             nn.Linear(mlp_hidden, 1))

    def keys(self, image_embeddings: Tensor, policy_image: Tensor | None = None) -> Tensor:
        """SAM embedding (B, C, h, w) [+ policy image tokens (B, g*g, d_llm)] -> keys (B, N_h*d_h, h, w)."""
        keys = self.key_proj(image_embeddings)
        if not self.policy_dim:
            return keys
        if policy_image is None:
            raise ValueError("SlotMapper: built with policy_dim > 0, so it needs the policy's image tokens")
        batch, n_tokens, _ = policy_image.shape
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"SlotMapper: policy image keys need a square grid of image tokens, got {n_tokens}")
        grid = self.policy_key(policy_image.to(keys.dtype)).transpose(1, 2) \
            .reshape(batch, -1, side, side)  # (B, g*g, N_h*d_h) -> (B, N_h*d_h, g, g)
        return keys + F.interpolate(grid, size=keys.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, slot_embeddings: Tensor, concepts: Tensor, image_embeddings: Tensor,
                policy_image: Tensor | None = None) -> SlotMapperOutput:
        """slot_embeddings e (B, K, d_llm), concepts r (B, K, d_c), image (B, C, h, w),
        policy_image (B, g*g, d_llm) when built with policy_dim > 0."""
        batch, slots, _ = concepts.shape
        _, _, height, width = image_embeddings.shape
        query = self.query_mlp(torch.cat([slot_embeddings.to(concepts.dtype), concepts], -1))  # (B, K, d_q)
        q = self.query_proj(query).view(batch, slots, self.num_heads, self.head_dim)  # (B, K, N_h, d_h)
        k = self.keys(image_embeddings.to(concepts.dtype), policy_image) \
            .view(batch, self.num_heads, self.head_dim, height, width)  # (B, N_h, d_h, h, w)
        scores = torch.einsum("bknd,bndyx->bnkyx", q, k) / math.sqrt(self.head_dim)  # (B, N_h, K, h, w)
        per_slot = scores.transpose(1, 2).reshape(batch * slots, self.num_heads, height, width)
        heatmap = self.map_head(per_slot)  # (B*K, 1, h, w)
        heatmap = F.interpolate(heatmap, scale_factor=self.upsample, mode="bilinear",
                                align_corners=False)
        heatmap = heatmap.view(batch, slots, height * self.upsample, width * self.upsample)
        pooled = torch.cat([scores.amax(dim=(-2, -1)), scores.mean(dim=(-2, -1))], dim=1)  # (B, 2N_h, K)
        features = pooled.transpose(1, 2)  # (B, K, 2N_h)
        if self.confidence_uses_query:
            features = torch.cat([features, query], dim=-1)
        confidence = self.confidence_head(features).squeeze(-1)  # (B, K)
        return SlotMapperOutput(heatmap_logits=heatmap, confidence_logits=confidence)
