"""Figure 4: token groups from token types, target and other-object masks; active-atom counts per
group; the within-image referred-vs-other control."""

import numpy as np
import pytest
import torch

from analyses.activation_patterns import (CAVEAT, EXCLUDED, GROUP_LABELS, GROUPS, active_atoms_by_group,
                                          active_counts, active_counts_reference, min_margin, paired_difference,
                                          plot_active_atoms, token_groups)
from analyses.plotting import legend_texts, save_png
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes

I, P, R, S = TokenType.IMAGE, TokenType.PROMPT, TokenType.RESPONSE, TokenType.SPECIAL
Q, C, INST, BG, OTHER = range(5)


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


def other_objects():
    """Sample 0: an object at pixels [3:8, 3:8] beside the target (disjoint pixels, but it shares
    patch (1,1) with it); sample 1: an object in patch (0,0) and no target."""
    first = np.zeros((8, 8), bool)
    first[3:8, 3:8] = True
    second = np.zeros((8, 8), bool)
    second[0:2, 0:2] = True
    return [[first], [second]]


def test_token_groups_split_referred_other_and_background():
    types, grid, sample, masks = two_samples()
    groups = token_groups(types, grid, sample, masks, (4, 4), other_masks=other_objects())
    n = len(types) // 2
    image = np.full(16, BG)
    image[[0, 1, 4]] = INST  # only the target
    image[5] = EXCLUDED  # patch (1,1): target pixel (2,2) and the other object's (3,3)
    image[[6, 7, 9, 10, 11, 13, 14, 15]] = OTHER  # patch rows/cols 1-3 of the other object
    assert groups[2:18].tolist() == image.tolist()
    assert groups[n + 2:n + 18].tolist() == [OTHER] + [BG] * 15  # no target: its object is "other"
    assert groups[18:21].tolist() == [Q] * 3 and groups[n + 18:n + 21].tolist() == [Q] * 3
    # without the other objects their patches are background (the paper's split)
    assert (token_groups(types, grid, sample, masks, (4, 4)) == OTHER).sum() == 0
    empty = token_groups(types, grid, sample, masks, (4, 4), other_masks=[[], np.zeros((0, 8, 8), bool)])
    assert np.array_equal(empty, token_groups(types, grid, sample, masks, (4, 4)))


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


def planted_codes(groups: np.ndarray, atoms_per_group=(5, 7, 8, 2, 6), seed=0) -> SparseCodes:
    """Group g's tokens get atoms_per_group[g] atoms with |h| in [2.5, 4]; excluded tokens 1."""
    rng = np.random.default_rng(seed)
    dense = np.zeros((len(groups), 256), np.float32)
    for t, g in enumerate(groups):
        n = atoms_per_group[g] if g >= 0 else 1
        dense[t, rng.choice(256, n, replace=False)] = rng.uniform(2.5, 4, n) * rng.choice([-1, 1], n)
    return SparseCodes.from_dense(torch.from_numpy(dense))


def test_planted_instance_atoms_exceed_background_at_every_threshold(tmp_path):
    types, grid, sample, masks = two_samples()
    groups = token_groups(types, grid, sample, masks, (4, 4), other_masks=other_objects())
    taus = [0.0, 0.1, 0.5, 1.0, 2.0]
    codes = planted_codes(groups)
    table = active_atoms_by_group(codes, groups, taus)
    at_zero = table[table.tau == 0].set_index("group")
    assert at_zero["mean"].to_dict() == {"question": 5, "cot": 7, "instance_image": 8, "background_image": 2,
                                         "other_instance_image": 6}
    assert at_zero["n_tokens"].to_dict() == {"question": 6, "cot": 4, "instance_image": 3,
                                             "background_image": 19, "other_instance_image": 9}
    assert (at_zero["sem"] == 0).all()
    assert min_margin(table, "instance_image", "background_image") == 6
    assert min_margin(table, "instance_image", "other_instance_image") == 2
    assert min_margin(table, "cot", "background_image") == 5
    paired = paired_difference(codes, groups, sample, taus)  # only sample 0 has both
    assert paired.n_images.tolist() == [1] * 5 and paired.mean_difference.tolist() == [2.0] * 5
    fig = plot_active_atoms(table, {"referred - other instances": paired})
    path = save_png(fig, tmp_path / "fig4.png")
    assert path.stat().st_size > 10_000
    ax = fig.axes[0]
    assert "threshold" in ax.get_xlabel() and "active atoms" in ax.get_ylabel()
    assert [t.split(" (n=")[0] for t in legend_texts(fig)] == [GROUP_LABELS[g] for g in GROUPS] + [
        "referred - other instances"]
    assert CAVEAT.split()[0] in fig.get_suptitle() and "causal attention" in fig.get_suptitle()


def test_paired_difference_hand_case():
    """Image 0: referred tokens with 4 and 2 atoms, other 1 -> d = 2; image 1: referred 5, other 1
    and 3 -> d = 3; image 2 has no other instance and image 3 no referred one: not paired.
    At τ = 1 the weak atoms (|h| = 0.5) drop out."""
    groups = np.array([INST, INST, OTHER, BG, INST, OTHER, OTHER, INST, OTHER, Q])
    samples = np.array([0, 0, 0, 0, 1, 1, 1, 2, 3, 3])
    strong = [4, 2, 1, 7, 5, 1, 3, 9, 9, 9]
    weak = [0, 0, 0, 0, 0, 0, 2, 0, 0, 0]  # image 1's second other token: 2 weak atoms
    dense = torch.zeros(len(groups), 16)
    for t, (a, w) in enumerate(zip(strong, weak)):
        dense[t, :a] = 2.0
        dense[t, a:a + w] = -0.5
    table = paired_difference(SparseCodes.from_dense(dense), groups, samples, [0.0, 1.0])
    # τ = 0: image 1's other tokens have 1 and 5 atoms -> mean 3, d = 2; τ = 1: 1 and 3 -> d = 3
    assert table.n_images.tolist() == [2, 2]
    assert table.mean_difference.tolist() == [2.0, 2.5]
    assert table["sem"].tolist() == pytest.approx([0.0, 0.5])
    assert table.fraction_positive.tolist() == [1.0, 1.0]
    background = paired_difference(SparseCodes.from_dense(dense), groups, samples, [0.0], baseline="background_image")
    assert background.n_images.tolist() == [1] and background.mean_difference.tolist() == [3 - 7]
    none = paired_difference(SparseCodes.from_dense(dense), np.full(len(groups), BG), samples, [0.0])
    assert none.n_images.tolist() == [0] and np.isnan(none.mean_difference).all()


def test_saliency_alone_separates_instance_from_background_but_not_from_other_instances():
    """Codes that depend on the image only (every object patch alike, background weak), as image
    tokens before the instruction must under causal attention: instance > background at every τ,
    but the within-image referred - other difference is 0."""
    types, grid, sample, masks = two_samples()
    groups = token_groups(types, grid, sample, masks, (4, 4), other_masks=other_objects())
    codes = planted_codes(groups, atoms_per_group=(5, 7, 8, 2, 8))
    taus = [0.0, 0.5, 2.0]
    table = active_atoms_by_group(codes, groups, taus)
    assert min_margin(table, "instance_image", "background_image") == 6
    paired = paired_difference(codes, groups, sample, taus)
    assert paired.mean_difference.tolist() == [0.0] * 3


def test_mixed_magnitudes_give_falling_counts_and_a_valid_sem():
    types, grid, sample, masks = two_samples()
    groups = token_groups(types, grid, sample, masks, (4, 4))
    g = torch.Generator().manual_seed(1)
    dense = torch.rand(len(groups), 128, generator=g) * (torch.rand(len(groups), 128, generator=g) < 0.3)
    table = active_atoms_by_group(SparseCodes.from_dense(dense), groups, [0.0, 0.25, 0.5, 0.75])
    for name in GROUPS[:4]:  # no other-object masks given: that group is empty
        means = table[table.group == name].sort_values("tau")["mean"].to_numpy()
        assert (np.diff(means) < 0).all()
    bg = table[(table.group == "background_image") & (table.tau == 0.25)].iloc[0]
    counts = (dense[torch.from_numpy(groups == BG)] > 0.25).sum(1).double()
    assert bg["mean"] == pytest.approx(counts.mean().item())
    assert bg["sem"] == pytest.approx((counts.std() / counts.numel() ** 0.5).item())


def test_group_labels_must_match_the_codes():
    with pytest.raises(ValueError, match="group labels"):
        active_atoms_by_group(SparseCodes.from_dense(torch.ones(3, 4)), np.zeros(2, np.int8), [0.0])
