"""Causal faithfulness: deletion/insertion curves on a synthetic evaluate() with known answers,
CSR atom removal against a dense reference, and one run through a real SegCompassHead."""

import numpy as np
import pytest
import torch

from analyses.faithfulness import (active_atoms, curves_table, deletion_curves, drop_atoms, iou_drop, keep_atoms,
                                   normalised_auc, plot_faithfulness, slot_mask_evaluator, summarize)
from analyses.plotting import legend_texts, save_png
from saekit.sparse import SparseCodes

KS = (0, 1, 2, 3, 5)


def sample_codes(n_tokens=12, n_atoms=20, d_sae=64, seed=0) -> SparseCodes:
    """Atoms 0..n_atoms-1 each active on some tokens with |h| in [1, 3]; nothing else."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n_tokens, d_sae)
    for atom in range(n_atoms):
        tokens = torch.randperm(n_tokens, generator=g)[:3]
        dense[tokens, atom] = 1 + 2 * torch.rand(3, generator=g)
    return SparseCodes.from_dense(dense)


def two_atom_evaluate(codes: SparseCodes) -> float:
    """Mask IoU that depends only on whether atoms 3 and 7 are present anywhere."""
    present = set(codes.indices.tolist())
    return 0.2 + 0.4 * (3 in present) + 0.4 * (7 in present)


def test_drop_and_keep_match_zeroing_dense_columns():
    codes = sample_codes()
    atoms = [3, 7, 11, 50]  # 50 is not active: a no-op
    dense = codes.to_dense()
    zeroed = dense.clone()
    zeroed[:, atoms] = 0
    kept = torch.zeros_like(dense)
    kept[:, atoms] = dense[:, atoms]
    for got, want in ((drop_atoms(codes, atoms), zeroed), (keep_atoms(codes, atoms), kept)):
        assert torch.equal(got.to_dense(), want)
        ref = SparseCodes.from_dense(want)
        assert torch.equal(got.offsets, ref.offsets) and torch.equal(got.indices, ref.indices)
    assert drop_atoms(codes, []).indices.numel() == codes.indices.numel()
    assert active_atoms(codes).tolist() == list(range(20))
    assert active_atoms(codes, min_activation=10.0).tolist() == []


def test_synthetic_curves_have_the_expected_shape():
    codes = sample_codes()
    ranking = [3, 7, 1, 2, 4, 5, 6]
    result = deletion_curves(two_atom_evaluate, codes, ranking, KS, n_draws=40, seed=0)
    assert result.full_iou == pytest.approx(1.0)
    assert np.allclose(result.deletion, [1.0, 0.6, 0.2, 0.2, 0.2])
    assert np.allclose(result.insertion, [0.2, 0.6, 1.0, 1.0, 1.0])
    assert result.n_active == 20 and result.n_ranked == 7
    # Each random ranking is nested: deletion never recovers, insertion never loses.
    assert (np.diff(result.random_deletion, axis=1) <= 1e-12).all()
    assert (np.diff(result.random_insertion, axis=1) >= -1e-12).all()
    # Expected random drop at k: 0.8 * k / 20 (each of atoms 3 and 7 hit with probability k/20).
    drop = result.full_iou - result.random_deletion.mean(axis=0)
    assert np.allclose(drop, [0.8 * k / 20 for k in KS], atol=0.08)
    again = deletion_curves(two_atom_evaluate, codes, ranking, KS, n_draws=40, seed=0)
    assert np.array_equal(again.random_deletion, result.random_deletion)  # seeded


def test_drop_ratio_and_split_summary():
    codes = sample_codes()
    results = [deletion_curves(two_atom_evaluate, codes, [3, 7, 1, 2, 4], KS, n_draws=40, seed=s)
               for s in range(3)]
    results.append(deletion_curves(two_atom_evaluate, codes, [1, 2, 4, 5, 6], KS, n_draws=40, seed=9))
    strong = iou_drop(results[:3], k=5)
    assert strong.drop_top == pytest.approx(0.8)
    assert strong.ratio >= 3.0  # the acceptance bar: expected 0.8 / (0.8 * 5 / 20) = 4
    assert iou_drop(results[3:], k=5).drop_top == pytest.approx(0.0)  # a ranking of irrelevant atoms
    # deletion [1, .6, .2, .2, .2] over ks 0,1,2,3,5: area 0.8 + 0.4 + 0.2 + 0.4 = 1.8, over 5.
    assert normalised_auc(np.array(KS), results[0].deletion) == pytest.approx(0.36)
    table = summarize(results, ["val", "val", "val", "reason"])
    assert table.split.tolist() == ["val", "reason"] and table.n_items.tolist() == [3, 1]
    val = table.iloc[0]
    # insertion [.2, .6, 1, 1, 1]: area 0.4 + 0.8 + 1.0 + 2.0 = 4.2, over 5.
    assert val.auc_deletion == pytest.approx(0.36) and val.auc_insertion == pytest.approx(0.84)
    assert val.drop_top5 == pytest.approx(0.8) and val.drop_ratio == pytest.approx(strong.ratio)
    with pytest.raises(ValueError, match="k=4"):
        iou_drop(results, k=4)
    long = curves_table(results, ["val", "val", "val", "reason"])
    assert len(long) == 4 * (2 + 2 * 40) * len(KS)
    first = long[(long.item == 0) & (long.curve == "deletion")]
    assert first.draw.tolist() == [-1] * len(KS) and np.allclose(first.iou, results[0].deletion)
    draw = long[(long.item == 3) & (long.curve == "random_insertion") & (long.draw == 7)]
    assert draw.k.tolist() == list(KS) and np.allclose(draw.iou, results[3].random_insertion[7])


def test_plot(tmp_path):
    codes = sample_codes()
    results = [deletion_curves(two_atom_evaluate, codes, [3, 7, 1], KS, n_draws=5, seed=s) for s in range(2)]
    fig = plot_faithfulness(results)
    path = save_png(fig, tmp_path / "faithfulness.png")
    assert path.stat().st_size > 10_000
    assert [ax.get_xlabel() for ax in fig.axes] == ["k: atoms zeroed", "k: atoms kept"]
    assert all(ax.get_ylabel().startswith("mask IoU") for ax in fig.axes)
    assert legend_texts(fig)[:2] == ["top-k provenance atoms", "k random active atoms (5 draws)"]


def test_real_head_provenance_pathway():
    from segcompass.build import build_head, head_config
    from segcompass.sam import build_sam

    cfg = head_config("tiny-llava", d_sae=256)
    torch.manual_seed(0)
    head = build_head(cfg, build_sam(cfg.sam_preset, seed=0)).eval()
    g = torch.Generator().manual_seed(0)
    dense = torch.rand(24, cfg.d_sae, generator=g) * 4 * (torch.rand(24, cfg.d_sae, generator=g) < 0.03)
    codes = SparseCodes.from_dense(dense)
    e, image = torch.randn(1, cfg.num_slots, cfg.d_llm, generator=g), torch.randn(1, 64, 16, 16, generator=g)
    policy_image = torch.randn(1, 64, cfg.d_llm, generator=g)
    with torch.no_grad():
        out = head(codes, torch.zeros(24, dtype=torch.int64), e, image, policy_image)
    target = out.mask_logits[0, 0] > 0  # the head's own mask: full IoU is 1 by construction
    evaluate = slot_mask_evaluator(head, e, image, target, slot=0, policy_image=policy_image)
    surviving = active_atoms(codes, min_activation=cfg.threshold)
    ranking = out.provenance.top_atoms(0, 0, k=len(surviving)).atoms
    assert sorted(ranking.tolist()) == surviving.tolist()
    n = len(surviving)
    result = deletion_curves(evaluate, codes, ranking, (0, 2, n), n_draws=1, min_activation=cfg.threshold)
    assert result.full_iou == 1.0 and result.deletion[0] == 1.0
    assert result.insertion[-1] == 1.0  # keeping every surviving atom changes nothing
    assert result.deletion[-1] == pytest.approx(evaluate(keep_atoms(codes, [])))  # all of them gone
    assert result.n_active == n


def test_drop_ratio_ignores_a_float_noise_denominator():
    """Random deletion that changes IoU by rounding error only gives no ratio, not ~1e12."""
    from analyses.faithfulness import DeletionResult

    ks = np.array([0, 5])
    noise = DeletionResult(ks=ks, full_iou=0.5, deletion=np.array([0.5, 0.5 + 1e-12]),
                           insertion=np.array([0.5, 0.5]), random_deletion=np.array([[0.5, 0.5 - 1e-17]]),
                           random_insertion=np.array([[0.5, 0.5]]), n_active=10, n_ranked=10)
    assert np.isnan(iou_drop([noise], k=5).ratio)
