"""The analyses runner on a tiny random checkpoint: what `collect` gathers agrees with the
model run one sample at a time, planted codes give the known answers through the whole
wiring (tokens -> samples -> masks), and `run_all` writes every file and summary.json."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from analyses import run_all as ra
from analyses.collect import collect, slice_rows
from analyses.concept_naming import load_atom_labels
from analyses.evaluators import slot_heatmap_evaluator, slot_logits, slot_mask_evaluator
from analyses.faithfulness import drop_atoms, keep_atoms
from analyses.faithfulness import slot_mask_evaluator as reference_mask_evaluator
from saekit.errors import UserError
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes
from segcompass.cli import main
from segcompass.world.scenes import make_sample
from segcompass_tiny import tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)

N = 4
INDICES = (0, 1, 2, 6)
"""val (seed 1) samples: single target, two targets, single target, no target."""


@pytest.fixture(scope="module")
def collected(tiny_model):
    return collect(tiny_model, [make_sample("val", i, seed=1) for i in INDICES], batch_size=N)


def assert_codes_equal(a: SparseCodes, b: SparseCodes):
    assert torch.equal(a.offsets, b.offsets) and torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_batched_collect_equals_one_sample_at_a_time(tiny_model, collected):
    singles = collect(tiny_model, collected.samples, batch_size=1)
    assert_codes_equal(collected.codes, singles.codes)
    assert_codes_equal(collected.head_codes, singles.head_codes)
    np.testing.assert_array_equal(collected.token_sample_index, singles.token_sample_index)
    np.testing.assert_array_equal(collected.token_types, singles.token_types)
    np.testing.assert_allclose(collected.mask_probs, singles.mask_probs, atol=1e-4)
    assert collected.token_strings == singles.token_strings
    for b in range(N):
        np.testing.assert_array_equal(collected.provenance[b][0].atoms[:3], singles.provenance[b][0].atoms[:3])


def test_collected_fields_are_consistent(tiny_model, collected):
    c = collected
    # head codes are the full codes above the codebook threshold
    keep = c.codes.values > c.threshold
    counts = torch.bincount(c.codes.row_ids()[keep], minlength=c.codes.n_tokens)
    assert torch.equal(c.head_codes.indices, c.codes.indices[keep])
    assert torch.equal(c.head_codes.offsets[1:], counts.cumsum(0))
    # token ranges partition the tokens sample by sample
    for b, (start, stop) in enumerate(c.token_range):
        assert (c.token_sample_index[start:stop] == b).all()
        image = c.token_types[start:stop] == TokenType.IMAGE
        cells = {tuple(x) for x in c.image_grid[start:stop][image]}
        rows, cols = c.grid_shapes[b]
        assert cells == {(r, q) for r in range(rows) for q in range(cols)}  # each cell exactly once
        assert image.sum() == rows * cols
        # square world images: the grid covers the whole image
        np.testing.assert_array_equal(c.image_masks[b], c.samples[b].target_masks)
        assert c.model_masks[b].shape == (len(c.samples[b].targets), *c.mask_probs.shape[-2:])
    assert c.token_range[-1, 1] == c.codes.n_tokens
    assert c.teacher_forced and all(r.startswith("<think>") for r in c.responses)


def test_rerunning_the_head_on_one_sample_reproduces_its_masks(tiny_model, collected):
    """The faithfulness path (head on one sample's codes) sees what the batched forward saw."""
    c = collected
    for b in (0, 1):
        codes = c.sample_codes(b)
        index = torch.zeros(codes.n_tokens, dtype=torch.int64)
        with torch.no_grad():
            out = tiny_model.head(codes, index, c.slot_embeddings[b:b + 1], c.image_embeddings[b:b + 1],
                                  c.policy_image[b:b + 1])
        np.testing.assert_allclose(out.mask_logits[0].sigmoid().numpy(), c.mask_probs[b], atol=1e-4)
        target = torch.from_numpy(c.model_masks[b][0] > 0.5)
        pred = torch.from_numpy(c.mask_probs[b][1] > 0.5)
        iou = (pred & target).sum().item() / max((pred | target).sum().item(), 1)
        assert reference_mask_evaluator(tiny_model.head, c.slot_embeddings[b:b + 1], c.image_embeddings[b:b + 1],
                                        target, 1, policy_image=c.policy_image[b:b + 1])(codes) == pytest.approx(iou, abs=0.02)


def test_one_slot_evaluators_match_the_full_head(tiny_model, collected):
    """Decoding one slot (fast path) gives the full head's logits for that slot, on edited codes too."""
    c = collected
    codes = c.sample_codes(1)
    edits = [codes, drop_atoms(codes, c.provenance[1][2].atoms[:5]), keep_atoms(codes, c.provenance[1][2].atoms[:3])]
    index = torch.zeros(codes.n_tokens, dtype=torch.int64)
    target = torch.from_numpy(c.model_masks[1][0] > 0.5)
    for edited in edits:
        with torch.no_grad():
            full = tiny_model.head(edited, index, c.slot_embeddings[1:2], c.image_embeddings[1:2], c.policy_image[1:2])
        for slot in range(c.num_slots):
            heat, mask = slot_logits(tiny_model.head, edited, c.slot_embeddings[1:2], c.image_embeddings[1:2], slot,
                                     policy_image=c.policy_image[1:2])
            torch.testing.assert_close(heat, full.heatmap_logits[0, slot], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mask, full.mask_logits[0, slot], atol=1e-4, rtol=1e-4)
        args = (tiny_model.head, c.slot_embeddings[1:2], c.image_embeddings[1:2], target, 2)
        keys = {"policy_image": c.policy_image[1:2]}
        assert slot_mask_evaluator(*args, **keys)(edited) == pytest.approx(
            reference_mask_evaluator(*args, **keys)(edited), abs=1e-3)
        heat_pred = full.heatmap_logits[0, 2] > 0
        want = (heat_pred & target).sum().item() / max((heat_pred | target).sum().item(), 1)
        assert slot_heatmap_evaluator(*args, soft=False, **keys)(edited) == pytest.approx(want)
        probs, t = full.heatmap_logits[0, 2].sigmoid(), target.float()  # soft IoU by hand
        soft = float((probs * t).sum() / (probs.sum() + t.sum() - (probs * t).sum()))
        assert slot_heatmap_evaluator(*args, **keys)(edited) == pytest.approx(soft, rel=1e-4)


def test_top_slot_is_the_best_matched_pair(collected):
    c = collected
    probs = np.zeros_like(c.mask_probs)
    probs[0, 2] = c.model_masks[0][0] > 0.5  # slot 2 of sample 0 is exactly its target
    probs[2, 1] = np.roll(c.model_masks[2][0] > 0.5, 3, axis=1)  # slot 1 of sample 2 nearly
    items = ra.top_slot_items(c._replace(mask_probs=probs), min_iou=0.3)
    assert [(i.sample, i.slot, i.target) for i in items] == [(0, 2, 0), (2, 1, 0)]
    assert items[0].iou == 1.0 and 0.3 < items[1].iou < 1.0


def planted(c):
    """Codes where instance tokens carry 40 strong atoms, CoT tokens 20 and background none;
    an instance token's magnitude grows with the share of its patch in the target."""
    groups = ra.fig4.token_groups(c.token_types, c.image_grid, c.token_sample_index, c.image_masks, c.grid_shapes)
    dense = torch.zeros(c.codes.n_tokens, c.codes.d_sae)
    for t in np.flatnonzero(groups == ra.fig4.GROUPS.index("instance_image")):
        b, (row, col) = c.token_sample_index[t], c.image_grid[t]
        share = ra.fig4.patch_fractions(c.image_masks[b].any(0), c.grid_shapes[b])[row, col]
        dense[t, :40] = 10 * (1 + share)
    dense[groups == ra.fig4.GROUPS.index("cot"), 40:60] = 10.0
    dense[groups == ra.fig4.GROUPS.index("question"), 60:65] = 10.0
    return c._replace(codes=SparseCodes.from_dense(dense))


def test_planted_codes_give_the_known_answers(collected):
    c = planted(collected)
    fig4 = ra.activation_patterns(c)
    table = fig4.table.set_index(["group", "tau"])["mean"]
    assert table["instance_image"].eq(40).all() and table["cot"].eq(20).all()
    assert table["background_image"].eq(0).all()
    assert fig4.summary["instance_above_background_every_tau"] and fig4.summary["cot_above_background_every_tau"]
    assert fig4.summary["min_margin_vs_background"]["instance_image"] == 40
    fig5 = ra.instance_coverage(c)
    curve = fig5.table
    assert (curve.coverage >= curve.random - 1e-9).all()
    assert fig5.summary["ratio_top10"] > 1.5
    # one strong atom on background tokens only: the opposite answer
    groups = ra.fig4.token_groups(c.token_types, c.image_grid, c.token_sample_index, c.image_masks, c.grid_shapes)
    dense = torch.zeros(c.codes.n_tokens, c.codes.d_sae)
    dense[torch.from_numpy(groups == ra.fig4.GROUPS.index("background_image")), 0] = 10.0
    flipped = ra.activation_patterns(c._replace(codes=SparseCodes.from_dense(dense))).summary
    assert flipped["min_margin_vs_background"]["instance_image"] == -1
    assert not flipped["instance_above_background_every_tau"]


def test_codes_of_the_image_alone_pass_the_background_test_but_not_the_control(collected):
    """Every object's patches alike (what image tokens before the instruction can carry): the
    referred instance beats the background, not the other instances of its image."""
    c = collected
    groups = ra.fig4.token_groups(c.token_types, c.image_grid, c.token_sample_index, c.image_masks, c.grid_shapes,
                                  other_masks=ra.other_object_masks(c))
    objects = np.isin(groups, [ra.fig4.GROUPS.index("instance_image"), ra.fig4.GROUPS.index("other_instance_image")])
    dense = torch.zeros(c.codes.n_tokens, c.codes.d_sae)
    dense[torch.from_numpy(objects), :30] = 10.0
    result = ra.activation_patterns(c._replace(codes=SparseCodes.from_dense(dense)))
    summary = result.summary
    assert summary["instance_above_background_every_tau"]
    control = summary["referred_vs_other_instances"]
    assert control["n_images"] == 3 and control["min_over_tau"] == control["max_over_tau"] == 0  # sample 6: no target
    assert not control["above_zero_beyond_2sem_every_tau"]
    assert summary["referred_vs_background"]["min_over_tau"] == 30
    assert "causal attention" in summary["caveat"] and "causal attention" in result.figure.get_suptitle()
    assert set(result.extra_tables["figure4_activation_patterns_paired.csv"].comparison) == set(ra.PAIRED_COMPARISONS)
    coverage = ra.instance_coverage(c).summary
    assert coverage["n_paired_images"] == 3 and coverage["n_other_instances"] > 0
    assert abs(coverage["paired_difference_top10"]) < 0.5 and "causal attention" in coverage["caveat"]


def test_heatmaps_scored_on_the_referred_and_the_other_objects(collected):
    c = collected
    side = c.heatmap_probs.shape[-1]
    confidences = np.zeros_like(c.confidences)
    confidences[:, 1] = 1.0  # slot 1 is every sample's most confident slot
    on_target, on_other = np.zeros_like(c.heatmap_probs), np.zeros_like(c.heatmap_probs)
    for b, s in enumerate(c.samples):
        objects = ra.object_masks_in_heatmap_frame(c, b)
        assert objects.shape == (len(s.objects), side, side)
        if s.targets:
            np.testing.assert_array_equal(objects[list(s.targets)], c.model_masks[b] > 0.5)  # the same frame
            on_target[b, 1] = objects[s.targets[0]]
        on_other[b, 1] = objects[[i for i in range(len(s.objects)) if i not in s.targets][0]]
    hits = ra.referred_comparison(c._replace(heatmap_probs=on_target, confidences=confidences)).summary()
    assert (hits["n"], hits["n_skipped"], hits["hit_rate"]) == (3, 1, 1.0) and hits["hit_p_value"] < 0.5
    misses = ra.referred_comparison(c._replace(heatmap_probs=on_other, confidences=confidences)).summary()
    assert misses["hit_rate"] == 0.0 and misses["mean_other"] == 1.0


def test_slice_rows_matches_dense_rows(collected):
    dense = collected.codes.to_dense()
    part = slice_rows(collected.codes, 5, 17)
    torch.testing.assert_close(part.to_dense(), dense[5:17])


def number(value) -> float:
    """JSON null (how summary.json writes NaN and inf) back to NaN; other non-finite values too."""
    return float("nan") if value is None or not np.isfinite(value) else value


def test_run_all_writes_every_output(tiny_checkpoint, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(tiny_checkpoint, target_is_directory=True)
    rng = np.random.default_rng(0)
    x = rng.uniform(1, 2, 30)
    with open(run / "metrics.jsonl", "w") as log:  # planted: Dice = 0.1 + 0.3 MSE (+ tiny noise)
        for step, xi in enumerate(x):
            dice = 0.1 + 0.3 * xi + rng.normal(0, 1e-3)
            log.write(json.dumps({"step": step, "sae_mse": xi, "mask_dice": dice}) + "\n")
        log.write(json.dumps({"eval": True, "giou": 0.1}) + "\n")  # another kind of record: skipped
    out = tmp_path / "analyses"
    argv = ["analyze", "--checkpoint", str(run / "final"), "--out", str(out), "--n", "7", "--faith-items", "2",
            "--faith-min-iou", "0", "--faith-ks", "0", "1", "5", "--faith-draws", "1", "--naming-min-count", "2",
            "--readout-n", "24", "--no-progress"]
    assert main(argv) == 0  # `segcompass analyze` = run_all with these options
    summary = json.loads((out / ra.SUMMARY_FILE).read_text())
    assert summary["config"]["faith_ks"] == [0, 1, 5] and summary["n_samples"] == 7  # sample 6: no target
    for stem, files in summary["files"].items():
        for name in files.values():
            assert (out / name).is_file(), f"{stem}: {name} missing"
        if "png" in files:
            assert (out / files["png"]).read_bytes().startswith(b"\x89PNG")
    figure8 = summary["analyses"]["figure8_correlation"]
    training = figure8["training"]  # x has no step trend: holding the step fixed keeps the relation
    assert training["n"] == 30 and training["slope"] == pytest.approx(0.3, abs=0.01) and training["pearson_r"] > 0.99
    assert training["raw"]["pearson_r"] > 0.99 and training["n_step_terms"] == 4
    assert figure8["referred_vs_other"]["n"] + figure8["referred_vs_other"]["n_skipped"] == 7
    assert "by construction" in figure8["dropped_panel"]
    table8 = pd.read_csv(out / "figure8_correlation.csv")
    assert set(table8.panel) == {"training", "training_step_held_fixed", "referred_vs_other"}
    accept = summary["acceptance"]
    curve = pd.read_csv(out / "figure5_instance_coverage.csv")
    assert accept["coverage_ratio_top10"] == pytest.approx(float(curve[curve.k_percent == 10].ratio.iloc[0]))
    faith = pd.read_csv(out / "faithfulness.csv")
    assert number(accept["deletion_drop_ratio"]) == pytest.approx(number(faith.drop_ratio.iloc[0]), nan_ok=True)
    assert summary["analyses"]["faithfulness"]["n_items"] == 2
    assert summary["analyses"]["faithfulness_heatmap"]["metric"] == "heatmap"
    heat = pd.read_csv(out / summary["files"]["faithfulness_heatmap"]["curves_csv"])
    assert number(accept["heatmap_deletion_drop_ratio"]) == pytest.approx(
        number(pd.read_csv(out / "faithfulness_heatmap.csv").drop_ratio.iloc[0]), nan_ok=True)
    assert set(heat.curve) == {"deletion", "insertion", "random_deletion", "random_insertion"}
    table = pd.read_csv(out / ra.NAMES_FILE)
    labels = json.loads((out / ra.ATOM_NAMES_FILE).read_text())
    assert {int(a) for a in labels} == set(table.atom[table.confident]) == set(load_atom_labels(out / ra.NAMES_FILE))
    assert accept["codebook_atoms_named_fraction"] == pytest.approx(summary["analyses"]["concept_naming"]["fraction"])
    groups = pd.read_csv(out / summary["files"]["concept_naming"]["groups_csv"])
    assert {"concept", "atoms", "is_group", "f1"} <= set(groups.columns)
    assert any(c.startswith("image:token_row=") for c in groups.concept)  # position concepts are judged
    naming_summary = summary["analyses"]["concept_naming"]
    assert naming_summary["n_concepts_named_by_a_group"] == len(naming_summary["named_groups"])
    assert "referred_minus_other_instances_min_over_tau" in accept and "causal" in accept["image_tokens_caveat"]
    assert "paired_csv" in summary["files"]["figure4_activation_patterns"]
    readout = pd.read_csv(out / "slot_readout.csv")
    assert len(readout) == 3 and "png" in summary["files"]["slot_readout"]  # tiny policy: embeddings + 2 blocks
    assert summary["analyses"]["slot_readout"]["last_layer_colour_accuracy"] == pytest.approx(readout.colour_accuracy.iloc[-1])


def test_config_rejects_sweeps_without_the_acceptance_points():
    with pytest.raises(UserError, match="include 10"):
        ra.AnalysesConfig(k_percents=(5, 20))
    with pytest.raises(UserError, match="include 5"):
        ra.AnalysesConfig(faith_ks=(0, 1, 2))


def test_deletion_bar_needs_a_meaningful_drop_not_just_a_ratio():
    from analyses.faithfulness import DropSummary
    from analyses.run_all import passes_deletion_bar

    assert not passes_deletion_bar(DropSummary(1.8e-4, -1.1e-5, float("inf"), 5))  # measured on a demo model
    assert not passes_deletion_bar(DropSummary(0.05, 0.02, 2.5, 5))
    assert passes_deletion_bar(DropSummary(0.30, 0.05, 6.0, 5))
    assert passes_deletion_bar(DropSummary(0.30, -0.01, float("inf"), 5))
