"""Concept aggregator: K_s learned slot queries + codebook tokens -> concept representations r_k.

Pre-norm Transformer encoder blocks (paper: 2 blocks, d 512, 8 heads, ff 2048) over the
sequence [slot queries ; codebook tokens], with a key padding mask so samples with
different numbers of codebook tokens share a batch. The first K_s outputs are r_k.

Provenance: the aggregator also returns the slots' attention weights over the codebook
tokens from the *last* block, averaged over heads. That is the exact mixing weight with
which each codebook token's value entered r_k in the final block. We do not use attention
rollout: with only two blocks and the slots also attending to each other, rollout mixes in
slot-to-slot paths and needs the full (S x S) matrices of every block, while the last-block
rows are what a reader can check against the code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AggregatorOutput(NamedTuple):
    concepts: Tensor
    """(B, K_s, d_c) concept representations r_k (after the final LayerNorm)."""
    slot_attention: Tensor
    """(B, K_s, L) last-block attention of each slot to each codebook token, mean over heads.
    Softmax runs over slots and codebook tokens together, so a row sums to <= 1 (the rest
    went to the slots); 0 at padding."""


class PreNormEncoderBlock(nn.Module):
    """x + MHA(LN(x)); x + FF(LN(x)). Can also return the first rows' attention weights."""

    def __init__(self, *, d_model: int, num_heads: int, ff_dim: int, dropout: float = 0.0):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim, self.dropout = num_heads, d_model // num_heads, dropout
        self.norm_attn = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.norm_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_dim, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_padding_mask: Tensor,
                weight_rows: int = 0) -> tuple[Tensor, Tensor | None]:
        """x (B, S, D), key_padding_mask (B, S) True = pad.

        Returns x (B, S, D) and, if `weight_rows` > 0, the attention weights of the first
        `weight_rows` queries (B, H, weight_rows, S).
        """
        batch, seq, dim = x.shape
        # (B, S, D) -> (B, S, 3, H, Dh) -> 3 x (B, H, S, Dh)
        q, k, v = self.qkv(self.norm_attn(x)).view(batch, seq, 3, self.num_heads, self.head_dim) \
            .permute(2, 0, 3, 1, 4).unbind(0)
        attend = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, S) True = may attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend,
                                             dropout_p=self.dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, seq, dim)  # (B, H, S, Dh) -> (B, S, D)
        x = x + self.drop(self.out_proj(out))
        x = x + self.drop(self.ff(self.norm_ff(x)))
        weights = None
        if weight_rows:
            # Only the first rows' softmax: (B, H, rows, S), cheap next to the full attention.
            logits = q[:, :, :weight_rows] @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            weights = logits.masked_fill(~attend, float("-inf")).softmax(-1)
        return x, weights


class ConceptAggregator(nn.Module):
    """[K_s slot queries ; codebook tokens] -> pre-norm encoder -> first K_s outputs."""

    def __init__(self, *, num_slots: int, d_model: int, num_layers: int = 2, num_heads: int = 8,
                 ff_dim: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.num_slots = num_slots
        self.slot_queries = nn.Parameter(torch.randn(num_slots, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            PreNormEncoderBlock(d_model=d_model, num_heads=num_heads, ff_dim=ff_dim, dropout=dropout)
            for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(d_model)  # pre-norm stacks end with a norm

    def forward(self, tokens: Tensor, padding_mask: Tensor) -> AggregatorOutput:
        """tokens (B, L, d_c), padding_mask (B, L) True = pad -> AggregatorOutput."""
        batch, length, _ = tokens.shape
        slots = self.slot_queries.to(tokens.dtype).expand(batch, -1, -1)  # (K, D) -> (B, K, D)
        x = torch.cat([slots, tokens], dim=1)  # (B, K + L, D)
        slot_pad = padding_mask.new_zeros(batch, self.num_slots)
        key_padding_mask = torch.cat([slot_pad, padding_mask], dim=1)  # (B, K + L)
        weights = None
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            x, weights_i = block(x, key_padding_mask, weight_rows=self.num_slots if last else 0)
            weights = weights_i if last else weights
        concepts = self.final_norm(x[:, :self.num_slots])
        if weights is None:  # no blocks: nothing attended
            slot_attention = tokens.new_zeros(batch, self.num_slots, length)
        else:
            # (B, H, K, K + L) -> mean over heads, keep the codebook-token columns -> (B, K, L)
            slot_attention = weights.mean(1)[:, :, self.num_slots:]
        return AggregatorOutput(concepts=concepts, slot_attention=slot_attention.detach())
