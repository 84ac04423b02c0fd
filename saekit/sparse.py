"""Sparse SAE codes in CSR layout: the one format saekit's encoder emits and clients read."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SparseCodes(NamedTuple):
    """Active SAE atoms of `n_tokens` tokens, row-compressed (CSR).

    Token t's atoms are `indices[offsets[t]:offsets[t+1]]` with activations
    `values[offsets[t]:offsets[t+1]]`, atom indices ascending within a token.
    """

    indices: Tensor
    """(nnz,) int64 atom index j in [0, d_sae)."""
    values: Tensor
    """(nnz,) float activation h_j (non-zero)."""
    offsets: Tensor
    """(n_tokens + 1,) int64 row pointers; offsets[0] == 0, offsets[-1] == nnz."""
    d_sae: int
    """Width of the dictionary the indices refer to."""

    @property
    def n_tokens(self) -> int:
        return self.offsets.numel() - 1

    def row_ids(self) -> Tensor:
        """(nnz,) int64 token index of each stored activation."""
        counts = self.offsets.diff()
        return torch.repeat_interleave(torch.arange(self.n_tokens, device=counts.device), counts)

    def to_dense(self) -> Tensor:
        """(n_tokens, d_sae) dense matrix. For tests and small inputs only."""
        dense = torch.zeros(self.n_tokens, self.d_sae, dtype=self.values.dtype, device=self.values.device)
        dense[self.row_ids(), self.indices] = self.values
        return dense

    @staticmethod
    def from_dense(dense: Tensor) -> "SparseCodes":
        """CSR codes of the non-zero entries of a (n_tokens, d_sae) matrix (reference path)."""
        rows, cols = dense.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=dense.shape[0])
        offsets = torch.zeros(dense.shape[0] + 1, dtype=torch.int64, device=dense.device)
        offsets[1:] = counts.cumsum(0)
        return SparseCodes(cols, dense[rows, cols], offsets, dense.shape[1])
