"""GRPO rewards: the paper's five canonical format cases, the K-token cases the authors' reward
gets wrong, and hand-computed mask scores (single, multi, empty rules) with a brute-force
reference for the Hungarian matching."""

import itertools

import pytest
import torch

from segcompass.training.rewards import (RewardConfig, consistency_reward, format_reward, mask_reward, mask_rewards,
                                multi_object_mask_score, single_object_mask_score, total_reward)
from segcompass.template import K_MULTI, MAX_THINK_CHARS, format_response

COT = "the red square is left of the star . target : red square ."
REF = "<REF_POS>"


def authors_format_reward(text: str) -> float:
    """The authors' rule: exactly ONE concentration token, whatever the prompt asked for."""
    return format_reward(text, 1)


@pytest.mark.parametrize("text, expected", [
    ("<think> </think> <REF_POS>", 0.0),  # invalid: empty reasoning
    (f"<think> {COT} </think> <REF_POS>", 1.0),  # valid and clean
    (f"<think> {'x' * (MAX_THINK_CHARS + 1)} </think> <REF_POS>", 0.9),  # valid, long <think>
    (f"sure ! <think> {COT} </think> <REF_POS>", 0.9),  # valid, text before <think>
    (f"<think> {COT} </think> <REF_POS> done", 0.9),  # valid, text after the token
])
def test_five_canonical_cases(text, expected):
    assert format_reward(text, 1) == expected


@pytest.mark.parametrize("text, expected", [
    (f"<think> {COT} </think> <REF_POS> <REF_POS>", 0.0),  # two tokens for a one-token prompt
    (f"<think> {COT} <REF_POS> </think>", 0.0),  # token inside the reasoning
    (f"<think> {COT} </think> <think> again </think> <REF_POS>", 0.0),  # two think blocks
    (f"{COT} <REF_POS>", 0.0),  # no think block
    (f"<think> {COT} </think>", 0.0),  # no token
])
def test_invalid_single_token_cases(text, expected):
    assert format_reward(text, 1) == expected


def test_k_token_cases_the_authors_reward_gets_wrong():
    k = K_MULTI
    asked_k_wrote_k = format_response(COT, k)  # what the multi-object prompt asks for
    asked_k_wrote_1 = format_response(COT, 1)
    assert format_reward(asked_k_wrote_k, k) == 1.0
    assert authors_format_reward(asked_k_wrote_k) == 0.0  # they punish the requested answer
    assert format_reward(asked_k_wrote_1, k) == 0.0
    assert authors_format_reward(asked_k_wrote_1) == 1.0  # and reward ignoring the prompt


@pytest.mark.parametrize("tail, expected", [
    (" ".join([REF] * K_MULTI), 1.0),
    (" ".join([REF] * (K_MULTI - 1)), 0.0),  # one slot short
    (" ".join([REF] * (K_MULTI + 1)), 0.0),  # one too many
    (" ".join([REF, "and"] + [REF] * (K_MULTI - 1)), 0.9),  # all K present, stray word among them
])
def test_k_token_counts(tail, expected):
    assert format_reward(f"<think> {COT} </think> {tail}", K_MULTI) == expected


def test_k_token_before_think_close_is_invalid():
    text = f"<think> {COT} {REF} </think> " + " ".join([REF] * (K_MULTI - 1))
    assert format_reward(text, K_MULTI) == 0.0


def test_single_object_soft_iou_by_hand():
    prob = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # I = 0.5 + 0.5 = 1; sum p = 2, sum t = 2 -> 1 / (2 + 2 - 1)
    assert single_object_mask_score(prob, target) == pytest.approx(1 / 3, abs=1e-5)
    assert single_object_mask_score(target[0], target) == pytest.approx(1.0, abs=1e-5)
    # two target instances: the referent is their union
    two = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]]])
    assert single_object_mask_score(target[0], two) == pytest.approx(1.0, abs=1e-5)


def test_single_object_empty_rules():
    empty_target = torch.zeros(0, 2, 2)
    assert single_object_mask_score(torch.full((2, 2), 0.1), empty_target) == 1.0  # both empty
    assert single_object_mask_score(torch.full((2, 2), 0.9), empty_target) == 0.0  # prediction only
    assert single_object_mask_score(torch.full((2, 2), 0.1), torch.ones(1, 2, 2)) == pytest.approx(0.1, abs=1e-5)


def _brute_force_multi(probs, conf, targets, threshold):
    kept = [p for p, c in zip(probs, conf) if c >= threshold]
    if not kept and len(targets) == 0:
        return 1.0
    if not kept or len(targets) == 0:
        return 0.0

    def iou(p, t):
        inter = float((p * t).sum())
        return inter / (float(p.sum()) + float(t.sum()) - inter + 1e-6)

    best = 0.0
    small, large = (kept, list(targets)) if len(kept) <= len(targets) else (list(targets), kept)
    for chosen in itertools.permutations(range(len(large)), len(small)):
        best = max(best, sum(iou(small[i], large[j]) for i, j in enumerate(chosen)))
    return best / max(len(kept), len(targets))


def test_multi_object_by_hand():
    t0 = torch.zeros(4, 4)
    t0[:2, :2] = 1
    t1 = torch.zeros(4, 4)
    t1[2:, 2:] = 1
    targets = torch.stack([t0, t1])
    half = t1.clone()
    half[3, :] = 0  # 2 of t1's 4 pixels -> IoU 0.5
    junk = torch.zeros(4, 4)
    junk[0, 3] = 1
    probs = torch.stack([half, t0, junk, t0])
    conf = torch.tensor([0.9, 0.8, 0.7, 0.2])  # the last slot is not confident
    # kept: half, t0, junk -> pairs (t0, t0) = 1, (half, t1) = 0.5; junk unmatched; / max(3, 2)
    assert multi_object_mask_score(probs, conf, targets, 0.5) == pytest.approx(1.5 / 3, abs=1e-5)
    assert multi_object_mask_score(probs, conf, targets, 0.75) == pytest.approx(1.5 / 2, abs=1e-5)
    assert multi_object_mask_score(probs, conf, targets, 0.95) == 0.0  # nothing kept, targets exist
    assert multi_object_mask_score(probs, conf, targets[:0], 0.95) == 1.0  # both empty
    assert multi_object_mask_score(probs, conf, targets[:0], 0.5) == 0.0  # slots kept, no target


def test_multi_object_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        k, n = 1 + trial % 4, trial % 5
        probs = torch.rand(k, 6, 6, generator=gen)
        conf = torch.rand(k, generator=gen)
        targets = (torch.rand(n, 6, 6, generator=gen) > 0.6).float()
        expected = _brute_force_multi(probs, conf, targets, 0.4)
        assert multi_object_mask_score(probs, conf, targets, 0.4) == pytest.approx(expected, abs=1e-5)


def test_unwritten_slots_never_count():
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1
    probs = torch.stack([torch.zeros(4, 4), target[0], target[0], target[0]])
    conf = torch.ones(4)
    # multi: slot 0 (written, empty mask) kept and matched with IoU 0; slots 1-3 are fillers
    assert mask_reward(probs, conf, target, multi=True, slots_written=1) == pytest.approx(0.0, abs=1e-6)
    assert mask_reward(probs, conf, target, multi=True, slots_written=2) == pytest.approx(0.5, abs=1e-5)
    # single: slot 0 is the prediction; no concentration token at all = empty prediction
    assert mask_reward(probs[1:], conf[1:], target, multi=False, slots_written=1) == pytest.approx(1.0, abs=1e-5)
    assert mask_reward(probs[1:], conf[1:], target, multi=False, slots_written=0) == 0.0


def test_batched_mask_rewards_and_total():
    target = torch.zeros(1, 8, 8)
    target[0, :4, :4] = 1
    logits = torch.full((2, 4, 4, 4), -20.0)  # masks at a quarter of the target resolution
    logits[0, 0, :2, :2] = 20.0  # sample 0: slot 0 covers the target exactly
    conf = torch.full((2, 4), 5.0)
    rewards = mask_rewards(logits, conf, [target, target], [False, True], torch.tensor([1, 4]))
    assert rewards.tolist() == pytest.approx([1.0, 0.0], abs=1e-5)
    total = total_reward(torch.tensor([1.0, 0.9]), rewards, RewardConfig(format_weight=0.3, mask_weight=0.7))
    assert total.tolist() == pytest.approx([1.0, 0.27], abs=1e-5)
    with pytest.raises(ValueError):
        RewardConfig(format_weight=-1)


def test_consistency_reward_reads_the_answer_line_against_the_scene():
    from segcompass.world.render import COLOURS, SHAPES
    from segcompass.world.scenes import generate

    sample = next(s for s in generate("train", 40, seed=0) if len(s.targets) == 1 and len(s.objects) >= 3)
    truth = format_response(sample.cot, 1)
    assert consistency_reward(sample, truth) == 1.0
    target = sample.objects[sample.targets[0]]
    other = next(o for i, o in enumerate(sample.objects)
                 if i not in sample.targets and (o.colour, o.shape) != (target.colour, target.shape))
    present = {(o.colour, o.shape) for o in sample.objects}
    absent = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
    assert consistency_reward(sample, format_response(f"look . target : {other.colour} {other.shape} .", 1)) == 0.5
    assert consistency_reward(sample, format_response(f"look . target : {absent[0]} {absent[1]} .", 1)) == 0.0
    assert consistency_reward(sample, format_response("look . target : none .", 1)) == 0.0
    assert consistency_reward(sample, "no answer at all") == 0.0


def test_total_reward_adds_consistency_only_when_weighted():
    fmt, mask, cons = torch.tensor([1.0, 0.9]), torch.tensor([0.5, 0.2]), torch.tensor([1.0, 0.5])
    plain = total_reward(fmt, mask, RewardConfig())
    assert torch.equal(total_reward(fmt, mask, RewardConfig(), cons), plain)
    torch.testing.assert_close(total_reward(fmt, mask, RewardConfig(consistency_weight=0.2), cons), plain + 0.2 * cons)
    with pytest.raises(ValueError, match="consistency scores"):
        total_reward(fmt, mask, RewardConfig(consistency_weight=0.2))
