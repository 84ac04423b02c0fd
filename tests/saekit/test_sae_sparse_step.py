"""The TopK family's sparse training step: its selections are sae-lens's TopK / BatchTopK,
its loss is sae-lens's (BatchTopK, Matryoshka), and its hand-written backward equals
autograd on the dense latents (values and gradients), AuxK included."""

from __future__ import annotations

import pytest
import torch

from saekit.sae.model import SparseAutoencoder
from saekit.sae.sparse_step import (TopKFamilyStep, dense_reference_loss, select_aux, select_batchtopk,
                                    select_topk)

D_IN, D_SAE, N = 16, 96, 24


def _dense(entries, n: int, width: int) -> torch.Tensor:
    return torch.zeros(n, width).index_put((entries.rows, entries.cols), entries.values)


def _sae(architecture: str, seed: int = 0) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, architecture=architecture,
                            k=4 if architecture == "topk" else None)
    sae.init_weights_(torch.Generator().manual_seed(seed), decoder_norm=1.0)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.b_enc.add_(torch.randn(D_SAE, generator=gen) * 0.1)
        sae.b_dec.add_(torch.randn(D_IN, generator=gen) * 0.1)
        sae.W_enc.add_(torch.randn(D_IN, D_SAE, generator=gen) * 0.05)
    return sae


def _x(seed: int = 2) -> torch.Tensor:
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def test_topk_selection_is_sae_lens_topk():
    from sae_lens.saes.topk_sae import TopK

    pre = torch.randn(N, D_SAE, generator=torch.Generator().manual_seed(0))
    ours = select_topk(pre, 5)
    assert torch.equal(_dense(ours, N, D_SAE), TopK(5)(pre))
    assert (ours.rows[1:] >= ours.rows[:-1]).all()


@pytest.mark.parametrize("k", [1, 3, 2.5])
@pytest.mark.parametrize("guess", [None, 0.5, 100.0])
def test_batchtopk_selection_is_sae_lens_batchtopk(k, guess):
    """Exact whatever the starting cut: a fine guess, none, or one above the batch's cut."""
    from sae_lens.saes.batchtopk_sae import BatchTopK

    pre = torch.randn(N, D_SAE, generator=torch.Generator().manual_seed(1))
    pre[3] += 4.0  # one row far above the rest holds many more than k of the batch's entries
    ours = select_batchtopk(pre, k, guess)
    assert torch.equal(_dense(ours, N, D_SAE), BatchTopK(k)(pre))
    assert (ours.rows == 3).sum() > 2 * k


def test_batchtopk_with_fewer_positive_values_than_k_n():
    from sae_lens.saes.batchtopk_sae import BatchTopK

    pre = -torch.rand(N, D_SAE)
    pre[0, :3] = 1.0
    for guess in (None, 0.5):
        assert torch.equal(_dense(select_batchtopk(pre, 4, guess), N, D_SAE), BatchTopK(4)(pre))


def test_aux_selection_takes_only_dead_latents():
    pre = torch.randn(N, D_SAE, generator=torch.Generator().manual_seed(2))
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::7] = True
    aux = select_aux(pre, dead, 3)
    assert dead[aux.cols].all()
    expected = pre.masked_fill(~dead, float("-inf")).topk(3, dim=-1)
    assert torch.equal(_dense(aux, N, D_SAE), torch.zeros(N, D_SAE).scatter(-1, expected.indices,
                                                                          expected.values.relu()))


CASES = {  # name: (module architecture, selection, k, levels)
    "topk": ("topk", "topk", 4, (D_SAE,)),
    "batchtopk": ("jumprelu", "batchtopk", 4, (D_SAE,)),
    "matryoshka": ("jumprelu", "batchtopk", 4, (12, 40, D_SAE)),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_backward_equals_autograd_on_dense_latents(name, with_dead):
    architecture, selection, k, levels = CASES[name]
    sae, x = _sae(architecture), _x()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    if with_dead:
        dead[5::3] = True
    step = TopKFamilyStep(sae, N, selection=selection, k=k, levels=levels, aux_k=6, aux_coefficient=0.5)
    parts = step.forward(x, dead)
    stats = step(x, dead, want_l0=True)
    fast = {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}
    assert set(fast) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert (parts.aux is not None) == with_dead
    for p in sae.parameters():
        p.grad = None
    loss = dense_reference_loss(sae, x, parts.main, parts.aux, levels, parts.aux_scale)
    loss.backward()
    torch.testing.assert_close(stats.loss, loss.detach(), rtol=1e-5, atol=1e-6)
    for key, grad in fast.items():
        torch.testing.assert_close(grad, getattr(sae, key).grad, rtol=1e-4, atol=1e-6, msg=key)
    assert stats.l0 == pytest.approx(parts.main.values.numel() / N)
    assert torch.equal(stats.fired, torch.bincount(parts.main.cols, minlength=D_SAE) > 0)


def test_batchtopk_threshold_follows_sae_lens_ema():
    sae, x = _sae("jumprelu"), _x()
    step = TopKFamilyStep(sae, N, selection="batchtopk", k=4, levels=(D_SAE,), aux_k=6,
                          aux_coefficient=0.0, threshold_lr=0.25)
    smallest = step.forward(x, torch.zeros(D_SAE, dtype=torch.bool)).main.values.min().item()
    step(x, torch.zeros(D_SAE, dtype=torch.bool))
    assert torch.allclose(sae.threshold, torch.full((D_SAE,), 0.25 * smallest))


@pytest.mark.parametrize("name", ["batchtopk", "matryoshka"])
def test_loss_equals_sae_lens_training_forward_pass(name):
    """Unit decoder rows (saekit keeps them so) make sae-lens's rescale_acts_by_decoder_norm a
    no-op, so the two losses agree term by term (no dead latents: AuxK is zero in both)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    architecture, selection, k, levels = CASES[name]
    sae, x = _sae(architecture), _x()
    common = dict(d_in=D_IN, d_sae=D_SAE, k=k, apply_b_dec_to_input=False)
    if name == "batchtopk":
        theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(**common))
    else:
        theirs = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
            **common, matryoshka_widths=list(levels)))
    with torch.no_grad():
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(theirs, key).copy_(getattr(sae, key))
    out = theirs.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    step = TopKFamilyStep(sae, N, selection=selection, k=k, levels=levels, aux_k=8, aux_coefficient=1.0)
    stats = step(x, torch.zeros(D_SAE, dtype=torch.bool))
    torch.testing.assert_close(stats.loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.mse, out.losses["mse_loss"].detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_sparse_step_equals_the_autograd_topk_step(with_dead):
    """saekit.sae.losses.topk_step (dense autograd, the TopK path before the sparse one) is
    the same loss and gradients."""
    from saekit.sae.losses import topk_step

    sae, x = _sae("topk"), _x()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    if with_dead:
        dead[::4] = True
    stats = TopKFamilyStep(sae, N, selection="topk", k=4, levels=(D_SAE,), aux_k=6, aux_coefficient=0.5)(x, dead)
    fast = {name: p.grad.clone() for name, p in sae.named_parameters()}
    reference = topk_step(sae, x, dead, aux_k=6, aux_coefficient=0.5)
    torch.testing.assert_close(stats.loss, reference.loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(stats.fired, reference.fired)
    for name, grad in fast.items():
        torch.testing.assert_close(grad, getattr(sae, name).grad, rtol=1e-4, atol=1e-6, msg=name)
