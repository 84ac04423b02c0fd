"""Figure 5: top-K% token coverage of target instances vs the other instances of the same images
and vs the random-K% expectation."""

import numpy as np
import pytest
import torch

from analyses.instance_coverage import (coverage_curve, n_top, per_instance_coverage, plot_coverage,
                                        sample_coverage, sampled_random_coverage, token_magnitude)
from analyses.patches import patch_pixel_counts
from analyses.plotting import legend_texts, save_png
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes

# Patch magnitudes of the 4x4 hand case: (0,0) > (0,1) > (1,0) > (3,3) > the rest; (1,1) lowest.
HAND_SCORES = np.array([[10.0, 9.0, 1.0, 1.1],
                        [8.0, 0.5, 1.2, 1.3],
                        [1.4, 1.5, 1.6, 1.7],
                        [1.8, 1.9, 2.0, 7.0]])


def one_sample_tokens(scores: np.ndarray):
    """Tokens: BOS, the grid's image tokens (one atom each, |h| = the patch score), 2 prompt tokens."""
    rows, cols = scores.shape
    n_image = rows * cols
    types = torch.tensor([TokenType.SPECIAL] + [TokenType.IMAGE] * n_image + [TokenType.PROMPT] * 2)
    grid = torch.tensor([(-1, -1)] + [(r, c) for r in range(rows) for c in range(cols)] + [(-1, -1)] * 2)
    dense = torch.zeros(len(types), 8, dtype=torch.float64)
    dense[1:1 + n_image, 3] = -torch.from_numpy(scores.reshape(-1))  # sign must not matter
    dense[-2:, 5] = 100.0  # strong text tokens must not enter the image ranking
    return SparseCodes.from_dense(dense), types, grid, torch.zeros(len(types), dtype=torch.int64)


def hand_instances():
    a = np.zeros((8, 8), bool)
    a[0:4, 0:4] = True  # patches (0,0), (0,1), (1,0), (1,1): 16 pixels
    b = np.zeros((8, 8), bool)
    b[6:8, 5:8] = True  # 2 pixels in patch (3,2), 4 in patch (3,3)
    return np.stack([a, b])


def test_hand_computed_coverage_on_a_4x4_grid():
    codes, types, grid, sample = one_sample_tokens(HAND_SCORES)
    ks = [6.25, 25, 50, 100]
    per = per_instance_coverage(codes, types, grid, sample, [hand_instances()], (4, 4), ks)
    # K=6.25%: patch (0,0). 25%: + (0,1), (1,0), (3,3). 50%: + (3,2), (3,1), (3,0), (2,3).
    assert np.allclose(per.coverage[0], [4 / 16, 12 / 16, 12 / 16, 1.0])
    assert np.allclose(per.coverage[1], [0.0, 4 / 6, 1.0, 1.0])
    assert np.allclose(per.random, [[1 / 16, 4 / 16, 8 / 16, 1.0]] * 2)
    assert per.sample.tolist() == [0, 0] and per.referred.tolist() == [True, True]
    table = coverage_curve(codes, types, grid, sample, [hand_instances()], (4, 4), ks)
    assert np.allclose(table.coverage, [(4 / 16) / 2, (12 / 16 + 4 / 6) / 2, (12 / 16 + 1) / 2, 1.0])
    assert np.allclose(table.ratio, table.coverage / table.random)
    assert table.n_instances.tolist() == [2] * 4
    assert table.n_other_instances.tolist() == [0] * 4 and table.other_coverage.isna().all()


def test_referred_against_the_other_instances_of_the_image():
    """Instance b of the hand case as the image's other object: same ranking, same numbers."""
    codes, types, grid, sample = one_sample_tokens(HAND_SCORES)
    a, b = hand_instances()
    ks = [6.25, 25, 50, 100]
    per = per_instance_coverage(codes, types, grid, sample, [a[None]], (4, 4), ks, other_masks=[[b]])
    assert per.referred.tolist() == [True, False]
    assert np.allclose(per.coverage, [[4 / 16, 12 / 16, 12 / 16, 1.0], [0.0, 4 / 6, 1.0, 1.0]])
    table = coverage_curve(codes, types, grid, sample, [a[None]], (4, 4), ks, other_masks=[[b]])
    assert np.allclose(table.coverage, [4 / 16, 12 / 16, 12 / 16, 1.0])
    assert np.allclose(table.other_coverage, [0.0, 4 / 6, 1.0, 1.0])
    assert np.allclose(table.paired_difference, [4 / 16, 12 / 16 - 4 / 6, 12 / 16 - 1, 0.0])
    assert table.n_paired_images.tolist() == [1] * 4 and table.paired_difference_sem.isna().all()
    assert np.allclose(table.ratio_vs_other[1:], table.coverage[1:] / table.other_coverage[1:])
    assert (table.n_instances.iloc[0], table.n_other_instances.iloc[0]) == (1, 1)


def test_magnitudes_and_top_k_rounding():
    dense = torch.tensor([[3.0, -4.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, -2.0]])
    codes = SparseCodes.from_dense(dense)
    assert token_magnitude(codes, "l2").tolist() == [5.0, 0.0, 2.0]
    assert token_magnitude(codes, "l1").tolist() == [7.0, 0.0, 2.0]
    assert token_magnitude(codes, "max").tolist() == [4.0, 0.0, 2.0]
    with pytest.raises(ValueError, match="magnitude"):
        token_magnitude(codes, "l3")
    assert [n_top(k, 16) for k in (0, 6.25, 10, 25, 100)] == [0, 1, 2, 4, 16]
    assert n_top(10, 576) == 58


def planted_world(n_samples=40, grid=(8, 8), size=32, planted=True, seed=0, others=False):
    """Random rectangular instances (drawn in order, a later one hiding an earlier one's pixels);
    tokens over instances get large magnitudes when planted. With `others`, every sample also
    holds 1-2 objects that are not referred, planted exactly like the referred ones (codes that
    depend on the image alone): returns (codes, types, grid, sample, masks, other_masks)."""
    rng = np.random.default_rng(seed)
    codes_rows, types, grids, samples, masks, other_masks = [], [], [], [], [], []
    for s in range(n_samples):
        labels = np.full((size, size), -1)
        n_referred, n_other = rng.integers(1, 3), (rng.integers(1, 3) if others else 0)
        for i in range(n_referred + n_other):
            y, x = rng.integers(0, size - 8, 2)
            labels[y:y + rng.integers(4, 9), x:x + rng.integers(4, 9)] = i
        objects = [labels == i for i in range(n_referred + n_other)]
        on = patch_pixel_counts(labels >= 0, grid) > 0  # (rows, cols)
        magnitude = rng.uniform(0.5, 1.5, grid) + (3.0 * on if planted else 0.0)
        codes_rows.append(magnitude.reshape(-1))
        types += [TokenType.IMAGE] * on.size
        grids += [(r, c) for r in range(grid[0]) for c in range(grid[1])]
        samples += [s] * on.size
        masks.append(np.stack(objects[:n_referred]))
        other_masks.append(objects[n_referred:])
    dense = torch.zeros(len(types), 4, dtype=torch.float64)
    dense[:, 0] = torch.from_numpy(np.concatenate(codes_rows))
    out = (SparseCodes.from_dense(dense), torch.tensor(types), torch.tensor(grids), torch.tensor(samples), masks)
    return (*out, other_masks) if others else out


def test_planted_magnitudes_cover_instances_beyond_random(tmp_path):
    codes, types, grid, sample, masks = planted_world()
    table = coverage_curve(codes, types, grid, sample, masks, (8, 8), [5, 10, 20, 50, 100])
    ten = table[table.k_percent == 10].iloc[0]
    assert ten.ratio >= 2.0 and ten.coverage > ten.random
    assert (table.coverage >= table.random - 1e-12).all() and table.coverage.iloc[-1] == pytest.approx(1.0)
    fig = plot_coverage(table)
    path = save_png(fig, tmp_path / "fig5.png")
    assert path.stat().st_size > 10_000
    assert fig.axes[0].get_xlabel().startswith("K") and "coverage" in fig.axes[0].get_ylabel()
    assert legend_texts(fig) == [f"referred instances, top-K% by l2 (n={table.n_instances.iloc[0]})",
                                 "random K% (expectation)"]
    assert "causal attention" in fig.get_suptitle()


def test_image_only_codes_beat_random_but_not_the_other_instances(tmp_path):
    """Every object planted alike (saliency, all a code can carry before the instruction): the
    referred instances beat random K% by far, yet match the other instances of their images."""
    codes, types, grid, sample, masks, others = planted_world(n_samples=60, others=True, seed=5)
    table = coverage_curve(codes, types, grid, sample, masks, (8, 8), [5, 10, 20, 50, 100], other_masks=others)
    ten = table[table.k_percent == 10].iloc[0]
    assert ten.ratio >= 2.0
    assert table.n_paired_images.iloc[0] == 60
    assert (table.paired_difference.abs() <= 2 * table.paired_difference_sem + 0.02).all()
    assert np.allclose(table.ratio_vs_other[table.k_percent >= 20], 1.0, atol=0.15)
    fig = plot_coverage(table)
    save_png(fig, tmp_path / "fig5_other.png")
    assert legend_texts(fig)[1] == f"other instances of the same images (n={table.n_other_instances.iloc[0]})"


def test_unplanted_magnitudes_match_random():
    codes, types, grid, sample, masks = planted_world(n_samples=120, planted=False, seed=3)
    table = coverage_curve(codes, types, grid, sample, masks, (8, 8), [10, 30, 50])
    assert np.allclose(table.ratio, 1.0, atol=0.2)


def test_analytic_random_matches_sampling():
    rng = np.random.default_rng(0)
    counts = np.stack([patch_pixel_counts(rng.random((16, 16)) > 0.7, (4, 4)) for _ in range(3)])
    ks = [10, 25, 60]
    sampled = sampled_random_coverage(counts, ks, draws=4000, rng=rng)
    assert np.allclose(sampled, [[n_top(k, 16) / 16 for k in ks]] * 3, atol=0.02)
    # A score map equal to the patch counts ranks patches by instance pixels: coverage >= random.
    ranked = sample_coverage(counts[0].astype(float), counts[:1], ks, rng)
    assert (ranked >= sampled[:1] - 0.02).all()


def test_incomplete_grid_is_an_error():
    codes, types, grid, sample = one_sample_tokens(HAND_SCORES)
    with pytest.raises(ValueError, match="do not fill"):
        per_instance_coverage(codes, types, grid, sample, [hand_instances()], (4, 5), [10])
