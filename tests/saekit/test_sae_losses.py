"""SAE training maths: the hand-written standard-SAE backward against autograd and against
sae-lens's own training SAE, the TopK AuxK loss against a per-row loop, the learning-rate
schedule and the memory estimate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from saekit.errors import UserError
from saekit.sae.config import GIB, SAETrainConfig, memory_estimate
from saekit.sae.losses import StandardFastStep, standard_loss_reference, topk_loss
from saekit.sae.model import SparseAutoencoder
from saekit.sae.training import lr_at

D_IN, D_SAE = 24, 96


def _sae(architecture: str = "standard", dtype=torch.float64, k: int | None = None) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=k, dtype=dtype)
    sae.init_weights_(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial biases and decoder norms
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen, dtype=dtype) * 0.05)
        sae.b_dec.copy_(torch.randn(D_IN, generator=gen, dtype=dtype) * 0.1)
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=gen, dtype=dtype) * 3 + 0.5)
    return sae


def _x(n: int, dtype=torch.float64, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2 + 0.3


def _reference_grads(sae: SparseAutoencoder, x: torch.Tensor, l1: float):
    for p in sae.parameters():
        p.grad = None
    terms = standard_loss_reference(sae, x, l1)
    terms.loss.backward()
    return terms, {name: p.grad.clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_fast_standard_step_matches_autograd(dtype, tol):
    sae = _sae(dtype=dtype)
    fast = StandardFastStep(sae, batch_size=64, l1_coefficient=5.0)
    for n, seed in ((64, 2), (37, 3)):  # a full batch, then a partial one reusing the buffers
        x = _x(n, dtype, seed)
        stats = fast(x, want_l0=True)
        got = {name: p.grad.clone() for name, p in sae.named_parameters()}
        terms, expected = _reference_grads(sae, x, 5.0)
        assert stats.loss.item() == pytest.approx(terms.loss.item(), rel=tol)
        assert stats.mse.item() == pytest.approx(terms.mse.item(), rel=tol)
        assert stats.l0.item() == pytest.approx((terms.f > 0).sum().item() / n, rel=1e-6)
        assert torch.equal(stats.fired, (terms.f > 0).any(dim=0))
        fvu = (terms.x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert stats.fvu.item() == pytest.approx(fvu.item(), rel=tol)
        for name, grad in expected.items():
            scale = grad.abs().max().item()
            assert scale > 0, name
            assert (got[name] - grad).abs().max().item() <= tol * scale * 10, name


def test_reference_loss_equals_sae_lens_training_sae():
    from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    ours = _sae(dtype=torch.float32)
    theirs = StandardTrainingSAE(StandardTrainingSAEConfig(
        d_in=D_IN, d_sae=D_SAE, l1_coefficient=5.0, apply_b_dec_to_input=False))
    theirs.load_state_dict(ours.state_dict())
    x = _x(50, torch.float32)
    out = theirs.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={"l1": 5.0}, dead_neuron_mask=None, n_training_steps=0,
        is_logging_step=False))
    out.loss.backward()
    fast = StandardFastStep(ours, 50, 5.0)
    stats = fast(x)
    assert stats.loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
    assert stats.mse.item() == pytest.approx(out.losses["mse_loss"].item(), rel=1e-5)
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(getattr(ours, name).grad, param.grad, rtol=1e-4, atol=1e-6)


def test_topk_aux_loss_matches_a_per_row_loop():
    sae = _sae("topk", k=4)
    x = _x(12)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # 32 dead latents
    aux_k = 6
    terms = topk_loss(sae, x, dead, aux_k=aux_k, aux_coefficient=0.5)
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        aux_total = 0.0
        for row in range(x.shape[0]):
            kept = pre[row].topk(4).indices
            f = torch.zeros(D_SAE, dtype=x.dtype)
            f[kept] = pre[row, kept].relu()
            x_hat = f @ sae.W_dec + sae.b_dec
            dead_ids = dead.nonzero().squeeze(1)
            chosen = dead_ids[pre[row, dead_ids].topk(aux_k).indices]
            aux_f = torch.zeros(D_SAE, dtype=x.dtype)
            aux_f[chosen] = pre[row, chosen].relu()
            aux_total += ((aux_f @ sae.W_dec) - (x[row] - x_hat)).pow(2).sum().item()
        aux = aux_total / x.shape[0]
    mse = (terms.x_hat - x).pow(2).sum(-1).mean().item()
    assert terms.sparsity.item() == pytest.approx(aux, rel=1e-10)
    assert terms.loss.item() == pytest.approx(mse + 0.5 * min(32 / aux_k, 1.0) * aux, rel=1e-10)
    assert ((terms.f != 0).sum(dim=1) <= 4).all()
    no_dead = topk_loss(sae, x, torch.zeros(D_SAE, dtype=torch.bool), aux_k=aux_k, aux_coefficient=0.5)
    assert no_dead.loss.item() == pytest.approx(mse, rel=1e-12)


def _cfg(**overrides) -> SAETrainConfig:
    values = dict(out=Path("o"), cache=Path("c"), d_sae=64, batch_size=10, training_tokens=1000,
                  warmup_steps=10, lr=1e-3, lr_end_ratio=0.1)
    values.update(overrides)
    return SAETrainConfig(**values)


def test_lr_schedule_warmup_then_cosine_to_end_ratio():
    cfg = _cfg()  # 100 steps, 10 of warm-up
    assert lr_at(cfg, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 9) == pytest.approx(1e-3)
    assert lr_at(cfg, 10) == pytest.approx(1e-3)
    middle = 10 + (99 - 10) / 2
    assert lr_at(cfg, int(middle)) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))
    assert lr_at(cfg, 99) == pytest.approx(1e-4)
    values = [lr_at(cfg, s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_config_checks_are_one_line_user_errors():
    with pytest.raises(UserError, match="warmup_steps .100. must be smaller than the number of steps .100"):
        _cfg(warmup_steps=100)
    with pytest.raises(UserError, match="give --cache DIR, or --model NAME and --data DATA"):
        SAETrainConfig(out=Path("o"))
    with pytest.raises(UserError, match="token types"):
        _cfg(token_types=("pixels",))
    with pytest.raises(UserError, match="k .100. must not exceed d_sae .64."):
        _cfg(architecture="topk", k=100)


def test_memory_estimate_of_the_paper_configuration():
    est = memory_estimate(4096, 65536, 4096)
    n_params = 2 * 4096 * 65536 + 65536 + 4096
    assert est.parameters == 4 * n_params
    assert (est.parameters + est.adam) / GIB == pytest.approx(6.0, rel=1e-3)  # weights + Adam: ~6 GiB
    # two (4096 x 65536) fp32 buffers (2 GiB) + four (4096 x 4096) row buffers (0.25 GiB)
    assert est.activations / GIB == pytest.approx(2.25, rel=1e-3)
    assert "GiB" in est.describe() and f"{est.total / GIB:.3g} GiB" in est.describe()
