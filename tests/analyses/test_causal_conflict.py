"""Conflict pairs built from the world's own templates (same image, another single target, the
masks differ), the landing rule, and the trial wiring on the tiny checkpoint: a head that
ignores the codes lands wherever A's own pass put it."""

import numpy as np
import torch

from analyses.causal_conflict import SINGLE_TARGET_FAMILIES, conflict_pairs, conflict_summary, conflict_trials, landing
from analyses.causal_pass import run_split_pass
from segcompass.model import load_segcompass
from segcompass.template import format_response, k_for
from segcompass.world.scenes import generate
from segcompass_tiny import tiny_checkpoint  # noqa: F401 (pytest fixture)


def test_pairs_share_the_image_and_name_another_object():
    samples = generate("testA", 12, seed=1) + generate("val", 12, seed=1)
    pairs = conflict_pairs(samples, seed=0)
    single = [s for s in samples if len(s.targets) == 1 and s.family in SINGLE_TARGET_FAMILIES]
    assert len(pairs) >= len(single) // 2  # most scenes admit a second referent
    for pair in pairs:
        a, b = pair.a, pair.b
        assert samples[pair.index] is a
        assert b.image is a.image and b.objects is a.objects and b.multi_prompt == a.multi_prompt
        assert len(b.targets) == 1 and b.targets != a.targets and b.instruction != a.instruction
        assert b.target_masks.shape == a.target_masks.shape and not np.array_equal(b.target_masks, a.target_masks)
        assert np.array_equal(b.target_masks[0], b.objects[b.targets[0]].mask)
        assert b.cot.endswith(f"target : {b.objects[b.targets[0]].name} .")
        assert b.family in SINGLE_TARGET_FAMILIES
    again = conflict_pairs(samples, seed=0)
    assert [p.b.instruction for p in again] == [p.b.instruction for p in pairs]  # seeded
    assert len(conflict_pairs(samples, seed=0, max_pairs=2)) == 2


def test_landing_rule():
    codes = np.array([0.8, 0.1, 0.5, 0.4, 0.5, 0.0])
    state = np.array([0.1, 0.7, 0.2, 0.4, 0.5, 0.0])
    assert landing(codes, state).tolist() == ["codes", "state", "codes", "elsewhere", "elsewhere", "elsewhere"]


def test_head_that_ignores_codes_follows_the_state(tiny_checkpoint):
    model = load_segcompass(tiny_checkpoint).eval()
    with torch.no_grad():  # paper routing: the codes reach the slot mapper only through r_k
        model.head.slot_mapper.query_mlp[0].weight[:, model.head_cfg.d_llm:] = 0
    samples = generate("testA", 3, seed=1)
    sp = run_split_pass(model, "testA", samples, responses=[format_response(s.cot, k_for(s.multi_prompt))
                                                            for s in samples], batch_size=3)
    pairs = conflict_pairs(samples, seed=0)
    trials = conflict_trials(model, sp, pairs, batch_size=3, max_new_tokens=8)
    assert len(trials) == 2 * len(pairs) and set(trials.direction) == {"A_state_B_codes", "B_state_A_codes"}
    forward = trials[trials.direction == "A_state_B_codes"]
    np.testing.assert_array_equal(forward.iou_state.to_numpy(), forward.unedited_iou_a.to_numpy())
    backward = trials[trials.direction == "B_state_A_codes"]
    np.testing.assert_array_equal(backward.iou_state.to_numpy(), backward.unedited_iou_b.to_numpy())
    summary = conflict_summary(trials, n_candidates=3)
    assert summary["n_pairs"] == len(pairs) and summary["all"]["n_trials"] == len(trials)
    shares = summary["all"]
    assert abs(shares["follows_codes"] + shares["follows_state"] + shares["elsewhere"] - 1) < 1e-9
