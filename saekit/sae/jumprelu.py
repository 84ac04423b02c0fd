"""JumpReLU SAE training: sae-lens's recipe (DeepMind's JumpReLU with an L0 penalty).

    pre = x W_enc + b_enc,   f = pre · H(pre − θ),   x̂ = f W_dec + b_dec
    L   = (1/n) Σ_b ‖x̂ − x‖²  +  λ(step) · (1/n) Σ_b Σ_i H(pre_bi − θ_i)

H is the Heaviside step, whose derivative in θ is replaced by a straight-through
pseudo-derivative of bandwidth ε: ∂/∂θ of pre·H(pre − θ) is −(θ/ε)·K((pre − θ)/ε) and of
H(pre − θ) is −(1/ε)·K((pre − θ)/ε), with K the rectangle 1[|u| < 1/2]; pre gets the plain
gradient H(pre − θ) (sae-lens's `jumprelu_ste_to_input=False`, DeepMind's choice). θ is
projected to θ >= 0 before every step, and λ warms up linearly over `l0_warmup_steps`
(sae-lens's CoefficientScheduler). These are sae-lens's `JumpReLU` / `Step` functions and
`JumpReLUTrainingSAE` loss ("step" sparsity mode); `tests/saekit/test_sae_architectures.py`
holds the two to each other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.sae.losses import StepStats, _fvu
from saekit.sae.model import SparseAutoencoder


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """f = pre·H(pre − θ), with the straight-through θ-gradient of bandwidth ε."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = (threshold / eps) * _rectangle((pre - threshold) / eps) * grad  # (n, d_sae)
        return (pre > threshold).to(grad.dtype) * grad, -ste.sum(dim=0), None


class StepFunction(torch.autograd.Function):
    """H(pre − θ), with the straight-through θ-gradient of bandwidth ε (none to pre)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        ste = (1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return None, -ste.sum(dim=0), None


def l0_coefficient_at(l0_coefficient: float, warmup_steps: int, step: int) -> float:
    """λ of step `step` (0-based): 0 at step 0, rising linearly to λ at `warmup_steps`."""
    if warmup_steps <= 0:
        return l0_coefficient
    return l0_coefficient * min(step, warmup_steps) / warmup_steps


def jumprelu_step(sae: SparseAutoencoder, x: Tensor, *, l0_coefficient: float, bandwidth: float,
                  want_l0: bool = False) -> StepStats:
    """Forward + autograd backward of the JumpReLU loss; gradients left in the parameters
    (θ's too). `sparsity` in the stats is the mean L0 before λ."""
    if sae.architecture != "jumprelu" or sae.apply_b_dec_to_input:
        raise ValueError("jumprelu_step trains jumprelu SAEs with apply_b_dec_to_input=False")
    with torch.no_grad():
        sae.threshold.clamp_(min=0.0)
    for p in sae.parameters():
        p.grad = None
    pre = sae.hidden_pre(x)  # (n, d_sae)
    f = JumpReLUFunction.apply(pre, sae.threshold, bandwidth)
    x_hat = sae.decode(f)  # (n, d_in)
    mse = (x_hat - x).pow(2).sum(dim=-1).mean()
    l0 = StepFunction.apply(pre, sae.threshold, bandwidth).sum(dim=-1).mean()
    loss = mse + l0_coefficient * l0
    loss.backward()
    with torch.no_grad():
        active = f != 0
        return StepStats(loss.detach(), mse.detach(), l0.detach(), _fvu(x_hat - x, x),
                         active.any(dim=0), active.sum() / x.shape[0] if want_l0 else None)
