"""Figure 4: token groups from token types and target masks; active-atom counts per group."""

import numpy as np
import pytest
import torch

from analyses.activation_patterns import (EXCLUDED, GROUPS, active_atoms_by_group, active_counts,
                                          active_counts_reference, min_margin, plot_active_atoms, token_groups)
from analyses.plotting import legend_texts, save_png
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes

I, P, R, S = TokenType.IMAGE, TokenType.PROMPT, TokenType.RESPONSE, TokenType.SPECIAL
Q, C, INST, BG = range(4)


def two_samples():
    """Sample 0: CLS-like off-grid image token, a 4x4 grid, 3 prompt, 2 response tokens;
    sample 1: the same layout without a target."""
    layout = [S, I] + [I] * 16 + [P] * 3 + [R] * 2 + [S]
    grid = [(-1, -1), (-1, -1)] + [(r, c) for r in range(4) for c in range(4)] + [(-1, -1)] * 6
    types = torch.tensor(layout * 2, dtype=torch.int8)
    image_grid = torch.tensor(grid * 2, dtype=torch.int16)
    sample = torch.tensor([0] * len(layout) + [1] * len(layout))
    mask = np.zeros((8, 8), bool)
    mask[0:3, 0:3] = True  # patch (0,0) full, (0,1)/(1,0) half, (1,1) a quarter
    return types, image_grid, sample, [mask[None], np.zeros((0, 8, 8), bool)]


def test_token_groups_hand_case():
    types, grid, sample, masks = two_samples()
    groups = token_groups(types, grid, sample, masks, (4, 4))
    n = len(types) // 2
    first, second = groups[:n], groups[n:]
    image = np.full(16, BG)
    image[[0, 1, 4, 5]] = INST  # row-major patches (0,0), (0,1), (1,0), (1,1)
    assert first.tolist() == [EXCLUDED, EXCLUDED] + image.tolist() + [Q] * 3 + [C] * 2 + [EXCLUDED]
    assert second.tolist() == [EXCLUDED, EXCLUDED] + [BG] * 16 + [Q] * 3 + [C] * 2 + [EXCLUDED]
    strict = token_groups(types, grid, sample, masks, [(4, 4), (4, 4)], min_fraction=0.5)
    assert np.flatnonzero(strict[:n] == INST).tolist() == [2]  # only the full patch (0,0)


def test_active_counts_hand_case_and_parity():
    dense = torch.zeros(3, 10)
    dense[0, [1, 4, 6, 9]] = torch.tensor([0.05, -0.5, 1.5, 3.0])  # |h| counts, sign ignored
    codes = SparseCodes.from_dense(dense)
    taus = [0.0, 0.1, 1.0, 2.0, 5.0]
    assert active_counts(codes, taus)[:, 0].tolist() == [4, 3, 2, 1, 0]
    assert active_counts(codes, taus)[:, 1:].sum() == 0  # empty rows count zero atoms
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(50, 64, generator=g) * (torch.rand(50, 64, generator=g) < 0.2)
    codes = SparseCodes.from_dense(rand)
    assert np.array_equal(active_counts(codes, taus), active_counts_reference(codes, taus))


def planted_codes(groups: np.ndarray, atoms_per_group=(5, 7, 8, 2), seed=0) -> SparseCodes:
    """Group g's tokens get atoms_per_group[g] atoms with |h| in [2.5, 4]; excluded tokens 1."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((len(groups), 256), np.float32)
    for t, g in enumerate(groups):
        n = atoms_per_group[g] if g >= 0 else 1
        dense[t, rng.choice(256, n, replace=False)] = rng.uniform(2.5, 4, n) * rng.choice([-1, 1], n)
    return SparseCodes.from_dense(torch.from_numpy(dense))


def test_planted_instance_atoms_exceed_background_at_every_threshold(tmp_path):
    types, grid, sample, masks = two_samples()
    groups = token_groups(types, grid, sample, masks, (4, 4))
    table = active_atoms_by_group(planted_codes(groups), groups, [0.0, 0.1, 0.5, 1.0, 2.0])
    at_zero = table[table.tau == 0].set_index("group")
    assert at_zero["mean"].to_dict() == {"question": 5, "cot": 7, "instance_image": 8, "background_image": 2}
    assert at_zero["n_tokens"].to_dict() == {"question": 6, "cot": 4, "instance_image": 4,
                                             "background_image": 28}
    assert (at_zero["sem"] == 0).all()
    assert min_margin(table, "instance_image", "background_image") == 6
    assert min_margin(table, "cot", "background_image") == 5
    fig = plot_active_atoms(table)
    path = save_png(fig, tmp_path / "fig4.png")
    assert path.stat().st_size > 10_000
    ax = fig.axes[0]
    assert "threshold" in ax.get_xlabel() and "active atoms" in ax.get_ylabel()
    assert [t.split(" (")[0] for t in legend_texts(fig)] == [g.replace("_", " ") for g in GROUPS]


def test_mixed_magnitudes_give_falling_counts_and_a_valid_sem():
    types, grid, sample, masks = two_samples()
    groups = token_groups(types, grid, sample, masks, (4, 4))
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(len(groups), 128, generator=g) * (torch.rand(len(groups), 128, generator=g) < 0.3)
    table = active_atoms_by_group(SparseCodes.from_dense(dense), groups, [0.0, 0.25, 0.5, 0.75])
    for name in GROUPS:
        means = table[table.group == name].sort_values("tau")["mean"].to_numpy()
        assert (np.diff(means) < 0).all()
    bg = table[(table.group == "background_image") & (table.tau == 0.25)].iloc[0]
    counts = (dense[torch.from_numpy(groups == BG)] > 0.25).sum(1).double()
    assert bg["mean"] == pytest.approx(counts.mean().item())
    assert bg["sem"] == pytest.approx((counts.std() / counts.numel() ** 0.5).item())


def test_group_labels_must_match_the_codes():
    with pytest.raises(ValueError, match="group labels"):
        active_atoms_by_group(SparseCodes.from_dense(torch.ones(3, 4)), np.zeros(2, np.int8), [0.0])
