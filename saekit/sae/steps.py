"""What differs between the SAE architectures during training, in one place: the module
each trains, its initialisation, its step (loss + backward) and what follows the
optimiser step. `saekit.sae.training` runs the same loop around all of them.

    architecture  module    step                                   after the optimiser
    standard      standard  StandardFastStep (hand-written, dense) -
    topk          topk      TopKFamilyStep, per-row top-k          unit decoder rows
    batchtopk     jumprelu  TopKFamilyStep, batch top-k·n, θ EMA   unit decoder rows
    matryoshka    jumprelu  TopKFamilyStep, + nested level MSEs    unit decoder rows
    jumprelu      jumprelu  jumprelu_step (autograd, STE)          -
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from saekit.sae.config import TOPK_FAMILY, SAETrainConfig
from saekit.sae.jumprelu import jumprelu_step, l0_coefficient_at
from saekit.sae.losses import StandardFastStep, StepStats
from saekit.sae.model import INFERENCE_ARCHITECTURE, SparseAutoencoder
from saekit.sae.sparse_step import TopKFamilyStep

Step = Callable[[Tensor, Tensor, int, bool], StepStats]
"""(x, dead latents (d_sae,) bool, step index, want_l0) -> stats, gradients left in the SAE."""

SPARSITY_METRIC = {"standard": "l1", "jumprelu": "l0_penalty"}
"""Name of `StepStats.sparsity` in metrics.jsonl (the TopK family's is the AuxK loss)."""


def new_sae(cfg: SAETrainConfig, d_in: int, dtype: torch.dtype, device: torch.device) -> SparseAutoencoder:
    """The module `cfg.architecture` trains, initialised from `cfg.seed` (sae-lens's init;
    unit decoder rows for the TopK family; JumpReLU's θ at `threshold_init`; BatchTopK's
    θ, an EMA and no parameter of the optimiser, at 0)."""
    sae = SparseAutoencoder(d_in=d_in, d_sae=cfg.d_sae, architecture=INFERENCE_ARCHITECTURE[cfg.architecture],
                            k=cfg.k, dtype=dtype, device=device)
    sae.init_weights_(torch.Generator().manual_seed(cfg.seed),
                      decoder_norm=1.0 if cfg.architecture in TOPK_FAMILY else None)
    if cfg.architecture == "jumprelu":
        with torch.no_grad():
            sae.threshold.fill_(cfg.threshold_init)
    elif hasattr(sae, "threshold"):
        sae.threshold.requires_grad_(False)
    return sae


def build_step(cfg: SAETrainConfig, sae: SparseAutoencoder, aux_k: int) -> Step:
    """The step function of `cfg.architecture` (buffers allocated once, here)."""
    if cfg.architecture == "standard":
        fast = StandardFastStep(sae, cfg.batch_size, cfg.l1_coefficient)
        return lambda x, dead, step, want_l0: fast(x, want_l0=want_l0)
    if cfg.architecture in TOPK_FAMILY:
        selection = "topk" if cfg.architecture == "topk" else "batchtopk"
        sparse = TopKFamilyStep(sae, cfg.batch_size, selection=selection, k=cfg.k, levels=cfg.levels, aux_k=aux_k,
                                aux_coefficient=cfg.aux_coefficient, threshold_lr=cfg.topk_threshold_lr)
        return lambda x, dead, step, want_l0: sparse(x, dead, want_l0=want_l0)
    return lambda x, dead, step, want_l0: jumprelu_step(
        sae, x, l0_coefficient=l0_coefficient_at(cfg.l0_coefficient, cfg.l0_warmup_steps, step),
        bandwidth=cfg.bandwidth, want_l0=want_l0)


@torch.no_grad()
def after_optimizer_step(cfg: SAETrainConfig, sae: SparseAutoencoder) -> None:
    """TopK family: rescale decoder rows to unit norm, so the top-k choice compares
    activations that decode at the same scale (what sae-lens gets from
    rescale_acts_by_decoder_norm)."""
    if cfg.architecture in TOPK_FAMILY:
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
