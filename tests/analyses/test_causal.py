"""The causal suite on the tiny random checkpoint, with constructed heads whose answers are known:
a head blind to r_k shows no r-effect, one blind to e_k no e-effect, a concept-routed head is
exactly invariant to raw-state edits; batching, dose endpoints and attribution behave; the
unedited condition scores what `segcompass eval` scores; the CLI writes every file."""

import json

import numpy as np
import pytest
import torch

from analyses.causal import CAUSAL_FILE, index_html
from analyses.causal_dose import ChunkContext, attribution, chunk_curves, scored_slots
from analyses.causal_edits import HeadEdit, run_edited, zeroed
from analyses.causal_inputs import empty_codes, inputs_to, permute_samples, take_samples
from analyses.causal_pass import final_masks, mask_ious, run_split_pass, score_masks, target_union
from analyses.causal_pathway import pathway_ablation, record_split
from segcompass.cli import main
from segcompass.model import SegCompassConfig, build_segcompass, load_segcompass
from segcompass.template import format_response, k_for
from segcompass.world.scenes import make_sample
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)

INDICES = (0, 1, 2, 6)
"""val (seed 1) samples: single target, two targets, single target, no target."""
SAMPLES = [make_sample("val", i, seed=1) for i in INDICES]


def teacher_pass(model, samples=SAMPLES):
    """One policy pass over the ground-truth responses (no decoding: fast)."""
    responses = [format_response(s.cot, k_for(s.multi_prompt)) for s in samples]
    return run_split_pass(model, "val", samples, responses=responses, batch_size=len(samples))


@pytest.fixture(scope="module")
def paper_pass(tiny_model):
    return teacher_pass(tiny_model)


def fresh_model(tiny_checkpoint):
    """A private copy of the tiny checkpoint (tests edit its weights)."""
    return load_segcompass(tiny_checkpoint).eval()


def heads_equal(a, b):
    for field in ("heatmap_logits", "mask_logits", "confidence_logits"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def run(model, inputs, edit=None):
    with torch.no_grad():
        return run_edited(model, inputs, edit or HeadEdit(), torch.arange(inputs.image_embeddings.shape[0]))


def test_batched_head_matches_one_sample_at_a_time(tiny_model, paper_pass):
    inputs = paper_pass.inputs
    full = run(tiny_model, inputs)
    for b in range(len(SAMPLES)):
        one = run(tiny_model, take_samples(inputs, [b]))
        torch.testing.assert_close(one.mask_logits[0], full.mask_logits[b], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(one.confidence_logits[0], full.confidence_logits[b], atol=1e-4, rtol=1e-4)
    order = [3, 2, 0, 1]
    permuted = run(tiny_model, permute_samples(inputs, order))
    torch.testing.assert_close(permuted.mask_logits, full.mask_logits[order], atol=1e-4, rtol=1e-4)


def test_head_blind_to_r_shows_no_r_effect(tiny_checkpoint, paper_pass):
    model = fresh_model(tiny_checkpoint)
    inputs = paper_pass.inputs
    assert not torch.equal(run(model, inputs).heatmap_logits, run(model, inputs, HeadEdit(concepts=zeroed())).heatmap_logits)
    first = model.head.slot_mapper.query_mlp[0]  # Linear over [e_k ; r_k]
    with torch.no_grad():
        first.weight[:, model.head_cfg.d_llm:] = 0
    base = run(model, inputs)
    heads_equal(base, run(model, inputs, HeadEdit(concepts=zeroed())))
    result = pathway_ablation(model, paper_pass, seed=0, batch_size=4)
    for name in ("r_zero", "r_mean", "r_shuffled", "codes_removed", "codes_shuffled"):  # paper: codes reach only r
        assert result.scores[name] == result.scores["unedited"], name


def test_head_blind_to_e_shows_no_e_effect(tiny_checkpoint, paper_pass):
    model = fresh_model(tiny_checkpoint)
    inputs = paper_pass.inputs
    # the query edit is the slot mapper's e_k under the paper routing
    heads_equal(run(model, inputs, HeadEdit(queries=zeroed())),
                run(model, inputs._replace(slot_embeddings=torch.zeros_like(inputs.slot_embeddings))))
    with torch.no_grad():
        model.head.slot_mapper.query_mlp[0].weight[:, :model.head_cfg.d_llm] = 0
    result = pathway_ablation(model, paper_pass, seed=0, batch_size=4)
    for name in ("query_zero", "query_mean", "query_shuffled"):
        assert result.scores[name] == result.scores["unedited"], name
    assert result.skipped == {}


def test_concept_routed_head_ignores_raw_states(tiny_checkpoint):
    config = SegCompassConfig(policy_preset="tiny-llava", sae_layer=TINY_SAE_LAYER, head_preset="tiny-llava",
                              sam_preset="sam-tiny-16", head_routing="concepts")
    model = build_segcompass(config, policy_path=tiny_checkpoint / "policy", sae_path=tiny_checkpoint / "sae",
                             seed=0).eval()
    inputs = teacher_pass(model).inputs
    base = run(model, inputs)
    g = torch.Generator().manual_seed(0)
    noisy = inputs._replace(slot_embeddings=torch.randn(inputs.slot_embeddings.shape, generator=g) * 10,
                            policy_image=torch.randn(inputs.policy_image.shape, generator=g) * 10)
    heads_equal(base, run(model, noisy))
    heads_equal(run(model, inputs, HeadEdit(queries=zeroed())),
                run(model, inputs._replace(slot_rows=torch.full_like(inputs.slot_rows, -1))))
    # the codes are all it knows: removing them changes the heatmaps
    assert not torch.equal(base.heatmap_logits, run(model, inputs._replace(codes=empty_codes(inputs.codes))).heatmap_logits)


def single_target_context(model, sp):
    from segcompass.postprocess import targets_to_frame

    index = [i for i, s in enumerate(sp.samples) if len(s.targets) == 1]
    samples = [sp.samples[i] for i in index]
    inputs = inputs_to(take_samples(sp.inputs, index), "cpu")
    size = 4 * inputs.image_embeddings.shape[-1]
    targets = torch.stack([targets_to_frame(torch.from_numpy(target_union(s)[None]), input_size=model.sam_input_size,
                                            out_size=size)[0] for s in samples])
    with torch.no_grad():
        slot = scored_slots(model, model.run_head(inputs), samples, targets)
    return ChunkContext(inputs, samples, targets, slot)


def test_dose_endpoints_are_the_unedited_head_and_the_floor(tiny_model, paper_pass):
    ctx = single_target_context(tiny_model, paper_pass)
    curves = chunk_curves(tiny_model, ctx, seed=0, percents=(0, 10, 100))

    def scores(inputs):
        with torch.no_grad():
            out = tiny_model.run_head(inputs)
        ious = mask_ious(final_masks(tiny_model, out, ctx.samples), [target_union(s) for s in ctx.samples])
        from analyses.causal_dose import heatmap_soft_iou
        return ious, heatmap_soft_iou(out.heatmap_logits, ctx.slot, ctx.targets).numpy()

    full, floor = scores(ctx.inputs), scores(ctx.inputs._replace(codes=empty_codes(ctx.inputs.codes)))
    for ranking in ("provenance", "attribution", "random"):
        for got, want in ((curves[ranking, "deletion", 0], full), (curves[ranking, "insertion", 100], full),
                          (curves[ranking, "insertion", 0], floor), (curves[ranking, "deletion", 100], floor)):
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])


def test_attribution_is_zero_where_the_gradient_is_zero(tiny_checkpoint, paper_pass):
    model = fresh_model(tiny_checkpoint)
    ctx = single_target_context(model, paper_pass)
    atom = int(torch.mode(ctx.inputs.codes.indices).values)  # a frequent atom
    with torch.no_grad():
        model.head.codebook.weight[atom] = 0  # h_atom * C[atom] = 0: no gradient reaches h_atom
    scores = attribution(model, ctx.inputs, ctx.slot, ctx.targets)
    hit = ctx.inputs.codes.indices == atom
    assert hit.any() and (scores[hit] == 0).all()
    assert (scores[~hit] != 0).any()


def test_unedited_scores_match_segcompass_eval(tiny_model):
    from segcompass.evaluate import evaluate
    from segcompass.predictor import PredictorConfig
    from segcompass.world.scenes import generate

    samples = generate("testA", 3, seed=1)
    want = evaluate(tiny_model, ["testA"], n=3, seed=1, config=PredictorConfig(batch_size=3, max_new_tokens=12))
    sp = run_split_pass(tiny_model, "testA", samples, batch_size=3, max_new_tokens=12)
    got = score_masks(record_split(tiny_model, sp, batch_size=3).masks, samples)
    assert got == want["testA"]


def test_analyze_causal_only_writes_the_suite(tiny_checkpoint, tmp_path):
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--causal-only",
            "--causal-splits", "testA", "--causal-samples", "3", "--no-progress"]
    assert main(argv) == 0
    folder = tmp_path / "causal"
    record = json.loads((folder / CAUSAL_FILE).read_text())
    assert set(record["acceptance"]) >= {"zero_codes_giou_drop", "shuffled_codes_off_target_share",
                                         "conflict_follow_codes_share", "deletion_cost_ratio_top10_vs_random10"}
    split = record["splits"]["testA"]
    assert next(iter(split["dose"]["settings"]["e_present"])) == "floor_insertion_0"
    assert split["pathway"]["conditions"]["unedited"]["n_samples"] == 3
    for name in ("causal_pathway.csv", "causal_dose.csv", "causal_pathway.png", "causal_dose_testA.png"):
        assert (folder / name).is_file(), name
    assert not (tmp_path / "summary.json").exists()  # --causal-only skips the other analyses
    assert "causal_pathway.png" in index_html(folder, "analyses/causal/")
