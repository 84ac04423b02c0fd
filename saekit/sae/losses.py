"""SAE training losses: a hand-written forward + backward for the standard SAE (the fast
path), its autograd reference, and the TopK SAE's loss with the AuxK dead-latent term
through autograd (the dense reference of the TopK family's sparse path, `saekit.sae.sparse_step`).

Standard SAE (SAE-V recipe; equal to sae-lens's `StandardTrainingSAE` with lp_norm 1 and
apply_b_dec_to_input False), over a batch of n rows:

    L = (1/n) Σ_b [ Σ_d (x̂_bd − x_bd)²  +  α Σ_i f_bi ‖W_dec,i‖₂ ]

Why a hand-written backward: autograd allocates a fresh (n × d_sae) tensor for every
intermediate and gradient (1 GiB each at n 4096, d_sae 65536). On a CPU the default
allocator returns such blocks to the kernel and maps them again on every step, and that
churn costs more than the matmuls. The fast path writes every wide intermediate into two
preallocated buffers, so the only passes over (n × d_sae) memory are the five matmuls,
one in-place ReLU, one in-place ReLU-backward and two column sums. (Folding the sums into
the matmuls with an appended column of ones measured slower here: 257-wide operands
leave MKL's fast kernels.)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saekit.sae.model import SparseAutoencoder


class StepStats(NamedTuple):
    """Loss terms of one batch (0-d tensors, detached) and which latents fired."""

    loss: Tensor
    """Total loss that was differentiated."""
    mse: Tensor
    """Squared error summed over d_in, averaged over rows."""
    sparsity: Tensor
    """standard: Σ_i f_i·‖W_dec,i‖ averaged over rows (before α); topk: the AuxK loss (before its coefficient and scale)."""
    fvu: Tensor
    """Fraction of variance unexplained: Σ(x̂−x)² / Σ(x − mean_rows(x))²."""
    fired: Tensor
    """(d_sae,) bool: latent was non-zero for at least one row."""
    l0: Tensor | None
    """Mean number of non-zero latents per row (only when asked for: it costs a pass)."""


class LossTerms(NamedTuple):
    """Differentiable loss terms of the autograd paths."""

    loss: Tensor
    """Total loss."""
    mse: Tensor
    """Σ_d (x̂−x)² averaged over rows."""
    sparsity: Tensor
    """standard: mean Σ_i f_i‖W_dec,i‖; topk: the AuxK reconstruction loss."""
    f: Tensor
    """(n, d_sae) latent activations."""
    x_hat: Tensor
    """(n, d_in) reconstruction."""


def _fvu(err: Tensor, x: Tensor) -> Tensor:
    """Σ err² / Σ (x − mean over rows)², for (n, d) tensors."""
    centred = x - x.mean(dim=0, keepdim=True)
    return err.pow(2).sum() / centred.pow(2).sum().clamp_min(torch.finfo(x.dtype).tiny)


def standard_loss_reference(sae: SparseAutoencoder, x: Tensor, l1_coefficient: float) -> LossTerms:
    """The standard SAE loss with autograd (the slow reference of `StandardFastStep`)."""
    f = sae.encode(x)  # (n, d_sae)
    x_hat = sae.decode(f)  # (n, d_in)
    mse = (x_hat - x).pow(2).sum(dim=-1).mean()
    sparsity = (f * sae.W_dec.norm(dim=1)).sum(dim=-1).mean()
    return LossTerms(mse + l1_coefficient * sparsity, mse, sparsity, f, x_hat)


class StandardFastStep:
    """Forward + backward of the standard SAE loss into preallocated buffers.

    `__call__(x)` leaves the gradients in `sae.W_enc.grad`, ... (views of the buffers:
    never zero them with `set_to_none=False` between steps, just call again).
    """

    def __init__(self, sae: SparseAutoencoder, batch_size: int, l1_coefficient: float):
        if sae.architecture != "standard" or sae.apply_b_dec_to_input:
            raise ValueError("the fast path trains standard SAEs with apply_b_dec_to_input=False")
        self.sae, self.l1 = sae, l1_coefficient
        d, D, kw = sae.d_in, sae.d_sae, {"dtype": sae.W_enc.dtype, "device": sae.W_enc.device}
        self.pre = torch.empty(batch_size, D, **kw)
        """(B, D) pre-activations, then f = ReLU(pre) in place."""
        self.grad = torch.empty(batch_size, D, **kw)
        """(B, D) ∂L/∂f, then ∂L/∂pre in place."""
        self.err = torch.empty(batch_size, d, **kw)
        """(B, d) x̂, then x̂ − x in place."""
        self.grad_x_hat = torch.empty(batch_size, d, **kw)
        self.f_sum = torch.empty(D, **kw)
        self.W_enc_grad = torch.empty(d, D, **kw)
        self.b_enc_grad = torch.empty(D, **kw)
        self.W_dec_grad = torch.empty(D, d, **kw)
        self.b_dec_grad = torch.empty(d, **kw)

    @torch.no_grad()
    def __call__(self, x: Tensor, *, want_l0: bool = False) -> StepStats:
        """x: (n, d_in) with n <= the buffers' batch size."""
        sae, n = self.sae, x.shape[0]
        x = x.contiguous()
        f = torch.addmm(sae.b_enc, x, sae.W_enc, out=self.pre[:n]).relu_()  # (n, D)
        err = torch.addmm(sae.b_dec, f, sae.W_dec, out=self.err[:n]).sub_(x)  # (n, d) x̂ − x
        grad_x_hat = torch.mul(err, 2.0 / n, out=self.grad_x_hat[:n])  # ∂L/∂x̂ (n, d)
        dec_norm = sae.W_dec.norm(dim=1)  # (D,)
        f_sum = torch.sum(f, dim=0, out=self.f_sum)  # (D,) Σ_b f
        # ∂/∂W_dec,i of (α/n) Σ_b f_bi ‖W_dec,i‖ = (α/n) (Σ_b f_bi) W_dec,i / ‖W_dec,i‖
        norm_grad_scale = (f_sum / dec_norm).mul_(self.l1 / n).unsqueeze(1)  # (D, 1)
        torch.mm(f.T, grad_x_hat, out=self.W_dec_grad).addcmul_(sae.W_dec, norm_grad_scale)  # (D, d)
        torch.sum(grad_x_hat, dim=0, out=self.b_dec_grad)
        # ∂L/∂f = ∂L/∂x̂ W_dec^T + (α/n)‖W_dec,i‖, then through the ReLU (zero where f == 0)
        grad = torch.addmm(dec_norm * (self.l1 / n), grad_x_hat, sae.W_dec.T, out=self.grad[:n])
        torch.ops.aten.threshold_backward.grad_input(grad, f, 0.0, grad_input=grad)
        torch.mm(x.T, grad, out=self.W_enc_grad)  # (d, n) @ (n, D)
        torch.sum(grad, dim=0, out=self.b_enc_grad)
        sae.W_enc.grad, sae.b_enc.grad = self.W_enc_grad, self.b_enc_grad
        sae.W_dec.grad, sae.b_dec.grad = self.W_dec_grad, self.b_dec_grad
        mse = err.pow(2).sum() / n
        sparsity = f_sum.dot(dec_norm) / n
        l0 = torch.count_nonzero(f) / n if want_l0 else None
        return StepStats(mse + self.l1 * sparsity, mse, sparsity, _fvu(err, x), f_sum > 0, l0)


def topk_loss(sae: SparseAutoencoder, x: Tensor, dead: Tensor, *, aux_k: int,
              aux_coefficient: float) -> LossTerms:
    """TopK SAE loss with AuxK (Gao et al. 2024, as sae-lens and EleutherAI sparsify).

    loss = mse + aux_coefficient·min(n_dead/aux_k, 1)·‖ê − (x − x̂)‖², where ê decodes
    (without bias) the top-min(aux_k, n_dead) ReLU'd pre-activations among the dead
    latents (`dead`, (d_sae,) bool) and the residual x − x̂ is a constant target.
    """
    pre = sae.hidden_pre(x)  # (n, D)
    f = sae.activate(pre)
    x_hat = sae.decode(f)  # (n, d)
    mse = (x_hat - x).pow(2).sum(dim=-1).mean()
    n_dead = int(dead.sum())
    if n_dead == 0 or aux_coefficient == 0:
        return LossTerms(mse, mse, mse.new_zeros(()), f, x_hat)
    k_aux = min(aux_k, n_dead)
    dead_pre = pre.masked_fill(~dead, float("-inf"))  # (n, D): live latents never chosen
    values, indices = dead_pre.topk(k_aux, dim=-1, sorted=False)  # (n, k_aux)
    aux_f = torch.zeros_like(pre).scatter_(-1, indices, values.relu())
    residual = (x - x_hat).detach()  # (n, d)
    aux = (aux_f @ sae.W_dec - residual).pow(2).sum(dim=-1).mean()
    scale = min(n_dead / aux_k, 1.0)
    return LossTerms(mse + aux_coefficient * scale * aux, mse, aux, f, x_hat)


def topk_step(sae: SparseAutoencoder, x: Tensor, dead: Tensor, *, aux_k: int,
              aux_coefficient: float, want_l0: bool = False) -> StepStats:
    """Forward + autograd backward of `topk_loss`; gradients left in the parameters."""
    for p in sae.parameters():
        p.grad = None
    terms = topk_loss(sae, x, dead, aux_k=aux_k, aux_coefficient=aux_coefficient)
    terms.loss.backward()
    with torch.no_grad():
        f = terms.f
        l0 = (f != 0).sum() / x.shape[0] if want_l0 else None
        fired = (f != 0).any(dim=0)
        return StepStats(terms.loss.detach(), terms.mse.detach(), terms.sparsity.detach(),
                         _fvu(terms.x_hat - x, x), fired, l0)
