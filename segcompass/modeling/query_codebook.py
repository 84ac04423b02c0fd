"""Query codebook: sparse SAE codes -> codebook tokens by a sparse gather weighted by h_j.

The paper's codebook is a matrix C in R^{d_sae x d_c}; each surviving atom j of a token
(|h_j| >= threshold, 2.0 in the paper) contributes C(h_j) := h_j * C[j]. We take the
*scaled row* reading (not C[j] plus a separate value embedding) because it is exactly what
the authors' dense Linear(d_sae -> d_c, no bias) over the thresholded codes computes, so
the sparse path reproduces their numbers while touching only the surviving rows of C.

Two granularities of codebook token (`mode`):

- ``per_token`` (default): one codebook token per LLM token, the sum over that token's
  surviving atoms, computed by ``embedding_bag(mode="sum", per_sample_weights=h)``. It equals
  the dense Linear's row for that token. The aggregator then attends over at most one entry
  per LLM token (~3400 for a paper-size sequence). This is what the aggregator consumes by
  default: self-attention cost grows with the square of the sequence length, and the
  per-atom sequence would be tens of times longer (3400 tokens x tens of active atoms ~ 1e5).
- ``per_atom``: one codebook token per surviving (token, atom) pair, ``embedding(j) * h_j``.
  Affordable only for short sequences (the embedded world), where it lets each slot attend
  to atoms individually.

Tokens with no surviving atom produce no codebook token (they carry no concept above the
threshold); the dense reference gives them an all-zero row. Provenance is kept as flat
"pair" arrays: every surviving (token, atom, h) and the codebook token it feeds.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.sparse import SparseCodes

CodebookMode = Literal["per_token", "per_atom"]


class SurvivingPairs(NamedTuple):
    """The (token, atom, h) triples whose |h| passes the threshold, in CSR order."""

    token: Tensor
    """(P,) int64 global token index (row of the SparseCodes), ascending."""
    atom: Tensor
    """(P,) int64 atom index j."""
    value: Tensor
    """(P,) float activation h_j (keeps its autograd history)."""


class CodebookTokens(NamedTuple):
    """Codebook tokens of a batch, padded per sample, with their provenance."""

    tokens: Tensor
    """(B, L, d_c) codebook tokens; zeros at padding."""
    padding_mask: Tensor
    """(B, L) bool, True at padding (PyTorch `key_padding_mask` convention)."""
    source_token: Tensor
    """(B, L) int64 global LLM-token index each codebook token came from; -1 at padding."""
    pair_position: Tensor
    """(P,) int64 flat index b * L + l of the codebook token each surviving pair feeds."""
    pair_token: Tensor
    """(P,) int64 global LLM-token index of each surviving pair."""
    pair_atom: Tensor
    """(P,) int64 atom index j of each surviving pair."""
    pair_value: Tensor
    """(P,) float h_j of each surviving pair (detached)."""
    pair_share: Tensor
    """(P,) float share |h_j| * ||C[j]|| / sum over the same codebook token (sums to 1 per
    codebook token; 1 in per_atom mode). Detached: it is for reading, not training."""


class QueryCodebook(nn.Module):
    """C in R^{d_sae x d_c}; sparse SAE codes -> codebook tokens, never densified."""

    def __init__(self, *, d_sae: int, d_c: int, threshold: float = 2.0,
                 mode: CodebookMode = "per_token", init_std: float = 0.02):
        super().__init__()
        if mode not in ("per_token", "per_atom"):
            raise ValueError(f"mode must be 'per_token' or 'per_atom', got {mode!r}")
        self.d_sae, self.d_c, self.threshold, self.mode = d_sae, d_c, float(threshold), mode
        # Small init (as transformers' embeddings): ~20 atoms with h ~ 3-10 sum to O(1).
        self.weight = nn.Parameter(torch.randn(d_sae, d_c) * init_std)

    def extra_repr(self) -> str:
        return f"d_sae={self.d_sae}, d_c={self.d_c}, threshold={self.threshold}, mode={self.mode}"

    def surviving_pairs(self, codes: SparseCodes) -> SurvivingPairs:
        """Drop atoms with |h_j| < threshold; (nnz,) -> (P,)."""
        if codes.d_sae != self.d_sae:
            raise ValueError(f"codes have d_sae={codes.d_sae}, codebook has {self.d_sae}")
        kept = (codes.values.abs() >= self.threshold).nonzero().squeeze(1)  # (P,) positions in CSR
        # Row of each survivor by binary search in the row pointers: O(P log N), no (nnz,) row ids.
        token = torch.searchsorted(codes.offsets, kept, right=True) - 1
        return SurvivingPairs(token, codes.indices[kept], codes.values[kept])

    def _bag_vectors(self, pairs: SurvivingPairs) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token sums. Returns (U, d_c) vectors, (U,) token ids, (U,) bag sizes."""
        item_token, counts = torch.unique_consecutive(pairs.token, return_counts=True)
        starts = counts.cumsum(0) - counts
        # sum_j h_j C[j] over each token's bag: reads P rows of C, never a (U, d_sae) matrix.
        vectors = F.embedding_bag(pairs.atom, self.weight, starts, mode="sum",
                                  per_sample_weights=pairs.value.to(self.weight.dtype))
        return vectors, item_token, counts

    def token_vectors(self, codes: SparseCodes) -> Tensor:
        """(n_tokens, d_c) per-token codebook sums, zero rows where nothing survives.

        The sparse twin of `dense_reference`: same numbers, only surviving rows read.
        """
        pairs = self.surviving_pairs(codes)
        vectors, item_token, _ = self._bag_vectors(pairs)
        out = vectors.new_zeros(codes.n_tokens, self.d_c)
        return out.index_put_((item_token,), vectors)  # in place on a fresh buffer: no copy

    def dense_reference(self, codes: SparseCodes) -> Tensor:
        """(n_tokens, d_c) the authors' dense path: densify, zero |h| < threshold, Linear.

        Slow reference for parity tests and the benchmark: materialises (n_tokens, d_sae).
        """
        dense = codes.to_dense().to(self.weight.dtype)  # (N, d_sae)
        dense = dense.masked_fill_(dense.abs() < self.threshold, 0.0)  # in place: one dense copy
        return F.linear(dense, self.weight.t())  # Linear(d_sae -> d_c, bias=False)

    def forward(self, codes: SparseCodes, token_sample_index: Tensor,
                num_samples: int) -> CodebookTokens:
        """Sparse codes of all tokens of a batch -> padded codebook tokens per sample.

        `token_sample_index` (n_tokens,) int64 says which sample each CSR row belongs to;
        codebook tokens keep their tokens' order within a sample.
        """
        if token_sample_index.shape != (codes.n_tokens,):
            raise ValueError(f"token_sample_index must be ({codes.n_tokens},), "
                             f"got {tuple(token_sample_index.shape)}")
        pairs = self.surviving_pairs(codes)
        if self.mode == "per_token":
            vectors, item_token, counts = self._bag_vectors(pairs)
            pair_item = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
        else:
            # (P,) -> (P, d_c): one token per pair, h_j * C[j].
            vectors = F.embedding(pairs.atom, self.weight) * pairs.value.to(self.weight.dtype)[:, None]
            item_token = pairs.token
            pair_item = torch.arange(len(item_token), device=item_token.device)
        item_flat, padding_mask, source_token, length = _pack_items(
            item_token, token_sample_index, num_samples)
        flat = vectors.new_zeros(num_samples * length, self.d_c)
        tokens = flat.index_put_((item_flat,), vectors).view(num_samples, length, self.d_c)
        return CodebookTokens(
            tokens=tokens, padding_mask=padding_mask, source_token=source_token,
            pair_position=item_flat[pair_item], pair_token=pairs.token, pair_atom=pairs.atom,
            pair_value=pairs.value.detach(), pair_share=self._pair_share(pairs, pair_item))

    @torch.no_grad()
    def _pair_share(self, pairs: SurvivingPairs, pair_item: Tensor) -> Tensor:
        """(P,) |h_j| ||C[j]|| normalised within each codebook token."""
        # Norms of all rows (a reduction, no copy), then a gather: never a (P, d_c) temporary.
        row_norm = torch.linalg.vector_norm(self.weight, dim=1)  # (d_sae,)
        magnitude = pairs.value.detach().abs().to(self.weight.dtype) * row_norm[pairs.atom]
        n_items = int(pair_item.max()) + 1 if len(pair_item) else 0
        total = magnitude.new_zeros(n_items).index_add_(0, pair_item, magnitude)
        return magnitude / total[pair_item].clamp_min(torch.finfo(magnitude.dtype).tiny)


def _pack_items(item_token: Tensor, token_sample_index: Tensor,
                num_samples: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Place items (one per codebook token) into a padded (B, L) layout by sample.

    Returns (U,) flat positions b * L + l, (B, L) padding mask, (B, L) source tokens, L.
    """
    device = item_token.device
    item_sample = token_sample_index.to(device)[item_token]  # (U,)
    if len(item_sample) and (int(item_sample.min()) < 0 or int(item_sample.max()) >= num_samples):
        raise ValueError(f"token_sample_index must lie in [0, {num_samples})")
    counts = torch.bincount(item_sample, minlength=num_samples)  # (B,)
    length = int(counts.max()) if len(counts) else 0
    order = torch.argsort(item_sample, stable=True)  # token order kept within a sample
    starts = counts.cumsum(0) - counts  # (B,) first sorted item of each sample
    sorted_sample = item_sample[order]
    rank = torch.arange(len(order), device=device) - starts[sorted_sample]
    item_flat = torch.empty_like(order)
    item_flat[order] = sorted_sample * length + rank
    position = torch.arange(length, device=device)
    padding_mask = position[None, :] >= counts[:, None]  # (B, L)
    source_token = torch.full((num_samples * length,), -1, dtype=torch.int64, device=device)
    source_token[item_flat] = item_token
    return item_flat, padding_mask, source_token.view(num_samples, length), length
