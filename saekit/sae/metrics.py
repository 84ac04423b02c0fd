"""Reconstruction and sparsity metrics of an SAE over activations, with sae-lens's
definitions (`sae_lens.evals.get_sparsity_and_variance_metrics`), accumulated chunk by
chunk and split by token type.

Over N tokens with input x, reconstruction x̂ and latents f (sums in float64):

    mse                 (1/N) Σ_b ‖x_b − x̂_b‖²                  (summed over d_in, as the loss)
    explained_variance  1 − mse / ((1/N) Σ_b ‖x_b‖² − ‖x̄‖²)     the variance about the mean x̄,
                                                                 not about zero
    cossim              (1/N) Σ_b cos(x_b, x̂_b)
    l2_norm_in / _out   (1/N) Σ_b ‖x_b‖ / ‖x̂_b‖;  l2_ratio (1/N) Σ_b ‖x̂_b‖/‖x_b‖ (‖x_b‖ < 1e-4 -> 1)
    relative_reconstruction_bias   mean ‖x̂‖² / mean ⟨x, x̂⟩      (Wright & Sharkey 2024, eq. 10)
    l0, l1              (1/N) Σ_b #{i: f_bi ≠ 0},  (1/N) Σ_b Σ_i |f_bi|
    feature density     per latent, the fraction of tokens where it is non-zero; dead: 0,
                        dense: above `dense_threshold`

sae-lens averages relative_reconstruction_bias over its evaluation batches; here it is
over all tokens (the same with one batch, which is how the parity test compares them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from saekit.inputs import TOKEN_TYPE_NAMES

DENSITY_BINS = tuple(float(e) for e in range(-8, 1))  # log10 feature density, 1e-8 .. 1
_SCALARS = ("mse", "cossim", "l2_norm_in", "l2_norm_out", "l2_ratio", "l0", "l1")


class _Group:
    """float64 running sums for one token group."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device):
        self.n = 0
        self.sums = {name: 0.0 for name in _SCALARS}
        self.x_sum = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.x_sq = 0.0
        self.x_hat_sq = 0.0
        self.x_dot_x_hat = 0.0
        self.fired = torch.zeros(d_sae, dtype=torch.float64, device=device)

    def add(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        """x, x̂: (n, d_in) float32; f: (n, d_sae) dense latents."""
        if x.shape[0] == 0:
            return
        self.n += x.shape[0]
        resid = (x - x_hat).pow(2).sum(dim=-1)  # (n,)
        norm_in, norm_out = x.norm(dim=-1), x_hat.norm(dim=-1)  # (n,)
        safe_in = torch.where(norm_in.abs() < 1e-4, torch.ones_like(norm_in), norm_in)
        cossim = (x / norm_in.unsqueeze(1) * (x_hat / norm_out.unsqueeze(1))).sum(dim=-1)
        active = f != 0
        per_token = {"mse": resid, "cossim": cossim, "l2_norm_in": norm_in, "l2_norm_out": norm_out,
                     "l2_ratio": norm_out / safe_in, "l0": active.sum(dim=-1).float(),
                     "l1": f.abs().sum(dim=-1)}
        for name, values in per_token.items():
            self.sums[name] += values.double().sum().item()
        x64 = x.double()
        self.x_sum += x64.sum(dim=0)
        self.x_sq += x64.pow(2).sum().item()
        self.x_hat_sq += x_hat.double().pow(2).sum().item()
        self.x_dot_x_hat += (x64 * x_hat.double()).sum().item()
        self.fired += active.sum(dim=0).double()

    def result(self, dense_threshold: float) -> dict[str, Any]:
        if self.n == 0:
            return {"n_tokens": 0}
        out: dict[str, Any] = {"n_tokens": self.n}
        out.update({name: value / self.n for name, value in self.sums.items()})
        total_variance = self.x_sq / self.n - (self.x_sum / self.n).pow(2).sum().item()
        mse = out["mse"]
        out["explained_variance"] = (1.0 - mse / total_variance if total_variance >= 1e-10
                                     else float(mse < 1e-10))
        out["relative_reconstruction_bias"] = (self.x_hat_sq / self.n) / (self.x_dot_x_hat / self.n)
        density = self.density()
        out["dead_latents"] = int((density == 0).sum())
        out["dense_latents"] = int((density > dense_threshold).sum())
        return out

    def density(self) -> Tensor:
        return (self.fired / max(self.n, 1)).cpu()


class SparsityStats:
    """Accumulates the metrics over chunks of (x, x̂, f, token types): one group over every
    token and one per token type present."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu"):
        self.d_in, self.d_sae, self.device = d_in, d_sae, torch.device(device)
        self.all = _Group(d_in, d_sae, self.device)
        self.by_type: dict[int, _Group] = {}

    @torch.no_grad()
    def add(self, x: Tensor, x_hat: Tensor, f: Tensor, token_types: Tensor | None = None) -> None:
        x, x_hat, f = x.float(), x_hat.float(), f.float()
        self.all.add(x, x_hat, f)
        if token_types is None:
            return
        token_types = token_types.to(x.device)
        for code in torch.unique(token_types).tolist():
            rows = token_types == code
            group = self.by_type.setdefault(int(code), _Group(self.d_in, self.d_sae, self.device))
            group.add(x[rows], x_hat[rows], f[rows])

    def feature_density(self) -> dict[str, Tensor]:
        """Per latent (d_sae,) density over all tokens ("all") and each token type."""
        out = {"all": self.all.density()}
        out.update({TOKEN_TYPE_NAMES[c]: g.density() for c, g in sorted(self.by_type.items())})
        return out

    def result(self, dense_threshold: float = 0.1) -> dict[str, Any]:
        """{"all": metrics, "image": ..., ...} plus "latents" (dead/dense counts and the
        log10-density histogram of the live latents)."""
        out = {"all": self.all.result(dense_threshold)}
        out.update({TOKEN_TYPE_NAMES[c]: g.result(dense_threshold) for c, g in sorted(self.by_type.items())})
        density = self.all.density()
        live = density[density > 0]
        counts = torch.histc(live.log10().clamp(DENSITY_BINS[0], DENSITY_BINS[-1]).float(),
                             bins=len(DENSITY_BINS) - 1, min=DENSITY_BINS[0], max=DENSITY_BINS[-1])
        dead = int((density == 0).sum())
        dense = int((density > dense_threshold).sum())
        out["latents"] = {
            "d_sae": self.d_sae, "dead": dead, "dead_fraction": dead / self.d_sae, "dense": dense,
            "dense_fraction": dense / self.d_sae, "dense_threshold": dense_threshold,
            "median_density_of_live": float(live.median()) if live.numel() else math.nan,
            "log10_density_histogram": {"edges": list(DENSITY_BINS),
                                        "counts": [int(c) for c in counts.tolist()]}}
        return out
