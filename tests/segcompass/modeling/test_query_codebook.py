"""Query codebook: sparse gather vs the authors' dense Linear (values and gradients), layout, provenance."""

import pytest
import torch

from saekit.sparse import SparseCodes
from segcompass.modeling.query_codebook import QueryCodebook

D_SAE, D_C = 300, 16


def random_codes(n_tokens: int, seed: int = 0, *, d_sae: int = D_SAE) -> SparseCodes:
    """Codes with both signs, values straddling the threshold, and some empty tokens."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(n_tokens, d_sae, generator=g) * 3
    dense[torch.rand(n_tokens, d_sae, generator=g) > 0.1] = 0  # ~10% active
    dense[::5] = dense[::5].clamp(-1.5, 1.5)  # every 5th token: nothing survives |h| >= 2
    dense[1, 7], dense[1, 8] = 2.0, -2.0  # exactly at the threshold: kept
    dense[3:4] = 0  # a token with no active atom at all (repeated CSR offset)
    return SparseCodes.from_dense(dense)


def codebook(mode: str = "per_token", threshold: float = 2.0) -> QueryCodebook:
    torch.manual_seed(0)
    return QueryCodebook(d_sae=D_SAE, d_c=D_C, threshold=threshold, mode=mode, init_std=0.5)


def test_sparse_matches_dense_values_and_gradients():
    cb = codebook()
    codes = random_codes(40)
    values = codes.values.clone().requires_grad_(True)
    sparse_codes = codes._replace(values=values)
    upstream = torch.randn(40, D_C)

    sparse = cb.token_vectors(sparse_codes)
    (sparse * upstream).sum().backward()
    grad_w_sparse, grad_v_sparse = cb.weight.grad.clone(), values.grad.clone()
    cb.weight.grad, values.grad = None, None

    dense = cb.dense_reference(sparse_codes)
    (dense * upstream).sum().backward()
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_w_sparse, cb.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_v_sparse, values.grad, atol=1e-5, rtol=1e-5)
    assert (dense[::5] == 0).all()  # tokens with no surviving atom have a zero row
    below = codes.values.abs() < 2.0
    assert below.any() and (values.grad[below] == 0).all()  # dropped atoms get no gradient


def test_threshold_keeps_equal_and_drops_below():
    cb = codebook()
    pairs = cb.surviving_pairs(random_codes(10))
    assert (pairs.value.abs() >= 2.0).all()
    kept = {(int(t), int(a)) for t, a in zip(pairs.token, pairs.atom)}
    assert (1, 7) in kept and (1, 8) in kept


def test_forward_pads_per_sample_in_token_order():
    cb = codebook()
    codes = random_codes(30)
    # Interleaved samples: the layout must not assume contiguous rows per sample.
    sample = torch.tensor([0, 1, 2] * 10)
    out = cb(codes, sample, num_samples=3)
    per_token = cb.token_vectors(codes)
    alive = per_token.abs().sum(1) > 0
    for b in range(3):
        expected_tokens = [t for t in range(30) if sample[t] == b and alive[t]]
        n = len(expected_tokens)
        assert out.source_token[b, :n].tolist() == expected_tokens
        assert (out.source_token[b, n:] == -1).all() and out.padding_mask[b, n:].all()
        assert not out.padding_mask[b, :n].any()
        torch.testing.assert_close(out.tokens[b, :n], per_token[expected_tokens])
        assert (out.tokens[b, n:] == 0).all()
    length = out.tokens.shape[1]
    # Every pair points at the codebook token of its own LLM token.
    assert (out.source_token.flatten()[out.pair_position] == out.pair_token).all()
    share_sum = torch.zeros(3 * length).index_add_(0, out.pair_position, out.pair_share)
    torch.testing.assert_close(share_sum[~out.padding_mask.flatten()], torch.ones(int((~out.padding_mask).sum())))


def test_per_atom_tokens_sum_to_dense_rows():
    cb = codebook("per_atom")
    codes = random_codes(12, seed=3)
    out = cb(codes, torch.zeros(12, dtype=torch.int64), num_samples=1)
    assert out.tokens.shape[1] == len(out.pair_atom)  # one codebook token per surviving pair
    assert torch.equal(out.pair_share, torch.ones_like(out.pair_share))
    summed = torch.zeros(12, D_C).index_add_(0, out.source_token[0], out.tokens[0])
    torch.testing.assert_close(summed, cb.dense_reference(codes), atol=1e-5, rtol=1e-5)
    expected = out.pair_value[:, None] * cb.weight[out.pair_atom]
    torch.testing.assert_close(out.tokens[0], expected)


def test_nothing_survives_gives_empty_sequence():
    cb = codebook(threshold=100.0)
    out = cb(random_codes(6), torch.tensor([0, 0, 0, 1, 1, 1]), num_samples=2)
    assert out.tokens.shape == (2, 0, D_C) and out.padding_mask.shape == (2, 0)
    assert len(out.pair_atom) == 0


def test_rejects_mismatched_inputs():
    cb = codebook()
    with pytest.raises(ValueError, match="d_sae"):
        cb.surviving_pairs(random_codes(3, d_sae=D_SAE + 1))
    with pytest.raises(ValueError, match="token_sample_index"):
        cb(random_codes(4), torch.zeros(3, dtype=torch.int64), num_samples=1)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        cb(random_codes(4), torch.tensor([0, 1, 1, 1]), num_samples=1)
