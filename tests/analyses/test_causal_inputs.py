"""HeadInputs surgery on constructed batches: take / permute / concat round-trip, code donors keep
their rows, CSR edits against dense references, dose ranks and keeps, the sparse SAE decode."""

import numpy as np
import pytest
import torch

from analyses.causal_dose import dose_keep, within_sample_rank
from analyses.causal_edits import derangement
from analyses.causal_inputs import (concat_inputs, empty_codes, permute_samples, replace_in_rows, sample_ranges,
                                    select_entries, take_samples, with_codes_from)
from analyses.causal_pass import sparse_decode, variance_sums
from saekit.sparse import SparseCodes
from segcompass.model import HeadInputs

COUNTS = (4, 2, 5)
D_SAE, K, GRID, D_LLM = 16, 2, 4, 6


def make_inputs(seed: int = 0) -> HeadInputs:
    """3 samples with 4, 2 and 5 SAE tokens; slot and image rows inside each sample's rows (or -1)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(COUNTS)
    dense = torch.rand(n, D_SAE, generator=g) * (torch.rand(n, D_SAE, generator=g) < 0.3)
    dense[5] = 0  # a token with no atom
    sample = torch.repeat_interleave(torch.arange(3), torch.tensor(COUNTS))
    starts = torch.tensor([0, 4, 6])
    slot_rows = torch.stack([starts + 3 * (torch.tensor(COUNTS) > 3), starts]).T.contiguous()  # (3, K)
    slot_rows[1, 1] = -1
    image_rows = torch.stack([starts + i if i < 2 else torch.full((3,), -1) for i in range(GRID)], dim=1)
    return HeadInputs(SparseCodes.from_dense(dense), sample, torch.randn(3, K, D_LLM, generator=g),
                      torch.randn(3, 2, 2, 2, generator=g), torch.randn(3, GRID, D_LLM, generator=g),
                      slot_rows, image_rows)


def assert_inputs_equal(a: HeadInputs, b: HeadInputs):
    for field in ("indices", "values", "offsets"):
        assert torch.equal(getattr(a.codes, field), getattr(b.codes, field)), field
    for field in ("token_sample_index", "slot_embeddings", "image_embeddings", "policy_image", "slot_rows",
                  "image_rows"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def sample_dense(inputs: HeadInputs, b: int) -> torch.Tensor:
    start, stop = sample_ranges(inputs)[b].tolist()
    return inputs.codes.to_dense()[start:stop]


def test_take_all_permute_inverse_and_concat_are_identities():
    inputs = make_inputs()
    assert_inputs_equal(take_samples(inputs, [0, 1, 2]), inputs)
    order = torch.tensor([2, 0, 1])
    assert_inputs_equal(permute_samples(permute_samples(inputs, order), torch.argsort(order)), inputs)
    assert_inputs_equal(concat_inputs([take_samples(inputs, [0]), take_samples(inputs, [1, 2])]), inputs)
    with pytest.raises(ValueError):
        permute_samples(inputs, [0, 0, 1])


def test_permuted_samples_keep_their_codes_and_rows():
    inputs = make_inputs()
    order = [2, 0, 1]
    out = permute_samples(inputs, order)
    dense_in, dense_out = inputs.codes.to_dense(), out.codes.to_dense()
    for b, src in enumerate(order):
        assert torch.equal(sample_dense(out, b), sample_dense(inputs, src))
        assert torch.equal(out.slot_embeddings[b], inputs.slot_embeddings[src])
        for field in ("slot_rows", "image_rows"):
            new, old = getattr(out, field)[b], getattr(inputs, field)[src]
            assert torch.equal(new < 0, old < 0)
            assert torch.equal(dense_out[new[new >= 0]], dense_in[old[old >= 0]])  # same token's code
            assert (out.token_sample_index[new[new >= 0]] == b).all()


def test_code_donors_move_codes_and_rows_only():
    inputs = make_inputs()
    mixed = take_samples(inputs, [0, 1], codes_from=[2, 2])  # repeats allowed
    assert torch.equal(mixed.slot_embeddings, inputs.slot_embeddings[[0, 1]])
    assert torch.equal(mixed.policy_image, inputs.policy_image[[0, 1]])
    for b in range(2):
        assert torch.equal(sample_dense(mixed, b), sample_dense(inputs, 2))
    assert mixed.slot_rows.tolist() == [[3, 0], [8, 5]]
    via_donor = with_codes_from(take_samples(inputs, [0, 1]), take_samples(inputs, [2, 2]))
    assert_inputs_equal(via_donor, mixed)


def test_csr_edits_match_dense_references():
    codes = make_inputs().codes
    dense = codes.to_dense()
    keep = codes.values > 0.5
    kept = select_entries(codes, keep)
    assert torch.equal(kept.to_dense(), dense * (dense > 0.5))
    assert empty_codes(codes).to_dense().abs().sum() == 0 and empty_codes(codes).n_tokens == codes.n_tokens
    rows, remove, add, values = torch.tensor([1, 7]), torch.tensor([0, 3]), torch.tensor([3, 9]), torch.tensor([2.5, 4.0])
    edited = replace_in_rows(codes, rows, remove, add, values)
    want = dense.clone()
    want[rows[:, None], torch.tensor([0, 3, 9])] = 0
    want[rows[:, None], add] = values
    assert torch.equal(edited.to_dense(), want)
    ref = SparseCodes.from_dense(want)
    assert torch.equal(edited.offsets, ref.offsets) and torch.equal(edited.indices, ref.indices)


def test_derangement_moves_every_sample():
    for n in (2, 3, 10):
        order = derangement(n, seed=n)
        assert sorted(order.tolist()) == list(range(n)) and (order != np.arange(n)).all()
    assert np.array_equal(derangement(7, 3), derangement(7, 3))
    with pytest.raises(ValueError):
        derangement(1, 0)


def test_dose_ranks_and_keeps():
    scores = np.array([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    sample = np.array([0, 0, 0, 1, 1, 1])
    pool = np.array([True, True, True, True, True, False])
    rank = within_sample_rank(scores, sample, pool)
    assert rank.tolist() == [2, 0, 1, 1, 0, -1]
    size = np.array([3, 2])
    assert dose_keep(rank, sample, size, 0, "deletion").all()
    assert dose_keep(rank, sample, size, 100, "insertion").all()
    assert dose_keep(rank, sample, size, 0, "insertion").tolist() == [False] * 5 + [True]  # outside the pool: kept
    assert dose_keep(rank, sample, size, 100, "deletion").tolist() == [False] * 5 + [True]
    # 10% of 3 and of 2 pairs rounds up to one pair each: the top one
    assert dose_keep(rank, sample, size, 10, "deletion").tolist() == [True, False, True, True, False, True]


def test_sparse_decode_and_variance_explained():
    from saekit.sae.model import SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(d_in=D_LLM, d_sae=D_SAE)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    codes = make_inputs().codes
    torch.testing.assert_close(sparse_decode(sae, codes), sae.decode(codes.to_dense()))
    x = sparse_decode(sae, codes).detach()
    sums = variance_sums(sae, x, codes)
    assert sums.explained()["thresholded"] == pytest.approx(1.0)
    assert sums.n == codes.n_tokens
