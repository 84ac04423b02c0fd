"""The engine-independent pieces of the GRPO step, against slow references and hand-computed cases:
policy loss (clip, k3 KL), group advantages, keyed sampling, TRL-layout token types, and the
one recorded policy pass == SegCompass.forward."""

import math

import pytest
import torch
from PIL import Image

from saekit.inputs import build_batch
from segcompass.policy import recorded_states
from segcompass.training.grpo_step import (KeyedGumbelSampler, dapo_fill, group_advantages, grpo_policy_loss,
                                           head_pass, nucleus, per_sample_segmentation_loss, reserve_index,
                                           rollout_batch, rollout_seed, zero_spread)
from segcompass.training.losses import SegLossConfig, segmentation_loss
from segcompass.policy import PolicyForward
from segcompass_tiny import tiny_checkpoint  # noqa: F401  (session fixture)


def _slow_policy_loss(logps, old, ref, adv, mask, eps, beta):
    total = 0.0
    for b in range(len(logps)):
        terms = []
        for t in range(len(logps[0])):
            if mask[b][t]:
                ratio = math.exp(logps[b][t] - old[b][t])
                clipped = min(max(ratio, 1 - eps), 1 + eps)
                surrogate = -min(ratio * adv[b], clipped * adv[b])
                d = ref[b][t] - logps[b][t]
                terms.append(surrogate + beta * (math.exp(d) - d - 1))
        total += sum(terms) / max(len(terms), 1)
    return total / len(logps)


def test_policy_loss_matches_slow_reference_and_clips():
    gen = torch.Generator().manual_seed(0)
    logps = -torch.rand(3, 5, generator=gen) * 2
    old = logps + torch.randn(3, 5, generator=gen) * 0.4  # off-policy: some ratios leave [0.8, 1.2]
    ref = logps + torch.randn(3, 5, generator=gen) * 0.3
    adv = torch.tensor([1.0, -0.5, 0.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out = grpo_policy_loss(logps, old, ref, adv, mask, epsilon=0.2, beta=0.2)
    expected = _slow_policy_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(), 0.2, 0.2)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    ratio = torch.exp(logps - old)
    a = adv[:, None]
    clipped = (((ratio < 0.8) & (a < 0)) | ((ratio > 1.2) & (a > 0))) & mask.bool()
    assert out.clip_fraction.item() == pytest.approx(clipped.sum().item() / mask.sum().item())
    assert out.clip_fraction.item() > 0
    assert out.kl.item() >= 0


def test_on_policy_gradient_is_advantage_weighted_log_prob():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.ones(2, 2)
    out = grpo_policy_loss(logps, logps.detach(), None, adv, mask, epsilon=0.2, beta=0.0)
    out.loss.backward()
    # ratio == 1: d/dlogp of -A * ratio, token mean (1/2), batch mean (1/2) -> -A / 4
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.5, -0.5], [0.25, 0.25]]))
    assert out.clip_fraction.item() == 0.0


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logps = torch.tensor([[-1.0, -1.0]])
    zero = grpo_policy_loss(logps, logps, logps, torch.zeros(1), torch.ones(1, 2), beta=0.2)
    assert zero.loss.item() == 0.0 and zero.kl.item() == 0.0
    moved = grpo_policy_loss(logps, logps, logps - 0.5, torch.zeros(1), torch.ones(1, 2), beta=0.2)
    assert moved.kl.item() == pytest.approx(math.exp(-0.5) + 0.5 - 1, rel=1e-6)
    assert moved.loss.item() == pytest.approx(0.2 * moved.kl.item(), rel=1e-6)


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    ids = torch.tensor([7, 7, 7, 7, 3, 3, 3, 3])
    out = group_advantages(rewards, ids, 4)
    std = torch.tensor([1.0, 0.0, 0.5, 0.5]).std()
    expected = (torch.tensor([1.0, 0.0, 0.5, 0.5]) - 0.5) / (std + 1e-4)
    torch.testing.assert_close(out.advantages[:4], expected)
    assert out.advantages[4:].abs().max() == 0  # equal rewards: no signal
    assert out.group_std[1] == 0
    with pytest.raises(RuntimeError, match="whole groups"):
        group_advantages(rewards, torch.tensor([7, 7, 3, 3, 7, 7, 3, 3]), 4)


def test_keyed_sampler_rows_do_not_depend_on_the_batch():
    scores = torch.randn(3, 11, generator=torch.Generator().manual_seed(1))
    seeds = [rollout_seed(0, 5, i, r) for i, r in ((10, 0), (10, 1), (11, 0))]
    together = KeyedGumbelSampler(seeds, 0.7)(None, scores)
    alone = KeyedGumbelSampler(seeds[1:2], 0.7)(None, scores[1:2])
    torch.testing.assert_close(together[1:2], alone)
    assert rollout_seed(0, 5, 10, 0) != rollout_seed(0, 5, 10, 1)
    # the second call draws fresh noise (the next decoding step)
    sampler = KeyedGumbelSampler(seeds, 0.7)
    assert not torch.equal(sampler(None, scores), sampler(None, scores))


def test_keyed_sampler_samples_softmax_at_temperature():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n, temperature = 4000, 0.8
    sampler = KeyedGumbelSampler([rollout_seed(1, i) for i in range(n)], temperature)
    picks = sampler(None, logits.expand(n, 4)).argmax(dim=1)
    freq = torch.bincount(picks, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.softmax(logits / temperature, 0), atol=0.03, rtol=0)


def test_per_sample_segmentation_loss_is_the_mean_of_single_sample_losses():
    gen = torch.Generator().manual_seed(0)
    heat, masks, conf = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4)
    targets = [(torch.rand(n, 16, 16, generator=gen) > 0.5).float() for n in (2, 0, 1)]
    cfg = SegLossConfig()
    out = per_sample_segmentation_loss(heat, masks, conf, targets, cfg)
    singles = [segmentation_loss(heat[b:b + 1], masks[b:b + 1], conf[b:b + 1], [targets[b]], cfg).total
               for b in range(3)]
    assert out.total.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-6)
    assert out.num_matched == 3 and out.num_targets == 3


def test_nucleus_keeps_what_transformers_top_p_keeps():
    from transformers import TopPLogitsWarper

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 50, generator=gen) * 3
    for top_p in (0.3, 0.7, 0.95):
        ours = torch.isfinite(nucleus(logits, top_p))
        theirs = torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone()))
        assert torch.equal(ours, theirs), top_p
    assert torch.equal(nucleus(logits, 1e-6).isfinite().sum(1), torch.ones(64, dtype=torch.long))  # the top token


def test_keyed_sampler_with_top_p_samples_the_renormalised_nucleus():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n, temperature, top_p = 4000, 0.8, 0.8
    probs = torch.softmax(logits / temperature, 0)  # 0.71, 0.20, 0.06, 0.02: the nucleus is the first two
    picks = KeyedGumbelSampler([rollout_seed(2, i) for i in range(n)], temperature, top_p=top_p)(
        None, logits.expand(n, 4)).argmax(dim=1)
    freq = torch.bincount(picks, minlength=4).float() / n
    expected = torch.cat([probs[:2] / probs[:2].sum(), torch.zeros(2)])
    torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)
    assert freq[2:].sum() == 0
    # top_p = 1 is the plain sampler, draw for draw
    seeds = [rollout_seed(0, i) for i in range(5)]
    scores = torch.randn(5, 9, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(KeyedGumbelSampler(seeds, 0.7, top_p=1.0)(None, scores),
                               KeyedGumbelSampler(seeds, 0.7)(None, scores), rtol=0, atol=0)


def test_entropy_bonus_subtracts_coef_times_the_token_mean_entropy():
    gen = torch.Generator().manual_seed(0)
    logps = (-torch.rand(2, 4, generator=gen)).requires_grad_()
    entropy = torch.rand(2, 4, generator=gen).requires_grad_()
    adv, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    plain = grpo_policy_loss(logps, logps.detach(), None, adv, mask, beta=0.0)
    bonus = grpo_policy_loss(logps, logps.detach(), None, adv, mask, beta=0.0, entropies=entropy, entropy_coef=0.1)
    token_mean = ((entropy * mask).sum(1) / mask.sum(1)).mean()
    assert bonus.loss.item() == pytest.approx(plain.loss.item() - 0.1 * token_mean.item(), abs=1e-6)
    bonus.loss.backward()
    torch.testing.assert_close(entropy.grad, -0.1 * mask / mask.sum(1, keepdim=True) / 2)
    zero = grpo_policy_loss(logps, logps.detach(), None, adv, mask, beta=0.0, entropies=entropy, entropy_coef=0.0)
    assert zero.loss.item() == plain.loss.item()


def test_weighted_segmentation_loss_is_sum_of_weighted_sample_losses_over_b():
    gen = torch.Generator().manual_seed(0)
    heat, masks, conf = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4)
    targets = [(torch.rand(n, 16, 16, generator=gen) > 0.5).float() for n in (2, 0, 1)]
    cfg = SegLossConfig()
    singles = torch.stack([segmentation_loss(heat[b:b + 1], masks[b:b + 1], conf[b:b + 1], [targets[b]], cfg).total
                           for b in range(3)])
    plain = per_sample_segmentation_loss(heat, masks, conf, targets, cfg)
    ones = per_sample_segmentation_loss(heat, masks, conf, targets, cfg, weights=torch.ones(3))
    assert ones.total.item() == pytest.approx(plain.total.item(), rel=1e-6)
    w = torch.tensor([0.5, 0.0, 2.0])
    out = per_sample_segmentation_loss(heat, masks, conf, targets, cfg, weights=w)
    assert out.total.item() == pytest.approx(((singles * w).sum() / 3).item(), rel=1e-6)
    assert out.num_targets == 3 and len(out.matches) == 2  # sample 1 (weight 0) is left out
    none = per_sample_segmentation_loss(heat, masks, conf, targets, cfg, weights=torch.zeros(3))
    assert none.total.item() == 0.0 and none.matches == []
    one_slot = per_sample_segmentation_loss(heat, masks, conf, targets, cfg, active_slots=[1, 1, 1])
    assert all(int(s) == 0 for m in one_slot.matches for s in m.slot)


def test_zero_spread_and_the_reserve_are_keyed():
    flat = zero_spread(torch.tensor([0.3, 0.3, 0.3, 0.1, 0.9, 0.3]), 3)
    assert flat.tolist() == [True, False]
    positions = {reserve_index(100, step, d, j, per_draw=2, cap=3)
                 for step in range(4) for d in range(3) for j in range(2)}
    assert len(positions) == 4 * 3 * 2 and min(positions) == 100  # distinct, none in the plain stream


def test_dapo_fill_keeps_spread_groups_and_tops_up_from_draws():
    calls = []

    def draw(d, need):
        calls.append((d, need))
        new = [f"d{d}g{j}" for j in range(need)]
        return new, [d == 0 and j == 0 for j in range(need)]  # draw 0's first group is flat

    first, flat = ["a", "b", "c", "e"], [False, True, True, False]
    chosen, stats = dapo_fill(first, flat, draw, cap=3)
    assert chosen == ["a", "e", "d0g1", "d1g0"] and calls == [(0, 2), (1, 1)]
    assert stats == (2, 4 + 2 + 1, 2 + 1)
    # the cap runs out: the first batch's flat groups fill the rest, in order
    chosen, stats = dapo_fill(first, flat, lambda d, need: ([f"x{d}"] * need, [True] * need), cap=1)
    assert chosen == ["a", "e", "b", "c"] and stats.draws == 1 and stats.zero_spread == 4
    assert dapo_fill(first, flat, draw, cap=0)[0] == ["a", "e", "b", "c"]


@pytest.fixture(scope="module")
def model_and_samples(tiny_checkpoint):  # noqa: F811
    from segcompass.world.scenes import generate
    from segcompass.model import load_segcompass

    model = load_segcompass(tiny_checkpoint).eval()
    return model, generate("multi", 2, seed=3)


def _trl_layout(model, samples):
    """The teacher-forced samples as TRL lays rollouts out: left-padded prompt | completion."""
    from segcompass.template import build_prompt, format_response, k_for

    images = [Image.fromarray(s.image) for s in samples]
    prompts = [build_prompt(s.instruction, multi=s.multi_prompt) for s in samples]
    full = build_batch(model.loaded, images, prompts, [format_response(s.cot, k_for(True)) for s in samples],
                       padding_side="right")
    prompt = build_batch(model.loaded, images, prompts, padding_side="left")
    p_len = prompt.attention_mask.sum(1)
    f_len = full.attention_mask.sum(1)
    width = int((f_len - p_len).max())
    completion = torch.full((len(samples), width), model.loaded.tokenizer.pad_token_id)
    completion_mask = torch.zeros(len(samples), width, dtype=torch.long)
    for b in range(len(samples)):
        ids = full.model_inputs["input_ids"][b, :f_len[b]]
        assert ids[:p_len[b]].tolist() == prompt.model_inputs["input_ids"][b, -p_len[b]:].tolist()
        completion[b, :f_len[b] - p_len[b]] = ids[p_len[b]:]
        completion_mask[b, :f_len[b] - p_len[b]] = 1
    batch = rollout_batch(prompt.model_inputs["input_ids"], prompt.attention_mask, prompt.token_types,
                          completion, completion_mask, [model.loaded.tokenizer.eos_token_id],
                          {"pixel_values": prompt.model_inputs["pixel_values"]})
    return full, batch


def test_rollout_batch_tags_tokens_like_saekit(model_and_samples):
    model, samples = model_and_samples
    full, batch = _trl_layout(model, samples)
    for b in range(len(samples)):
        expected = full.token_types[b][full.attention_mask[b].bool()]
        got = batch.token_types[b][batch.attention_mask[b].bool()]
        assert got.tolist() == expected.tolist()


def test_recorded_trl_forward_equals_segcompass_forward(model_and_samples):
    """The joint step's one pass (TRL's fused log-prob forward + hooks + head_pass) gives the
    same log-probabilities and head outputs as the reference `SegCompass.forward`."""
    from trl.trainer.utils import add_fused_lm_head

    model, samples = model_and_samples
    full, batch = _trl_layout(model, samples)
    embeddings = model.image_embeddings([s.image for s in samples])
    with torch.no_grad():
        reference = model(full, embeddings)
        add_fused_lm_head(model.policy)  # what GRPOTrainer does to its model
        ids, mask = batch.model_inputs["input_ids"], batch.attention_mask
        labels = ids.masked_fill(mask == 0, -100)
        with recorded_states(model.policy, model.config.sae_layer) as states:
            fused = model.policy(**batch.model_inputs, labels=labels, fused_lm_head=True)
        ours = head_pass(model, PolicyForward(None, states["sae"], states["last"]), batch, embeddings)
    for name in ("heatmap_logits", "mask_logits", "confidence_logits"):
        torch.testing.assert_close(getattr(ours.head, name), getattr(reference.head, name), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.slots.slots_written, reference.slots.slots_written)
    log_softmax = reference.policy.logits.log_softmax(-1)  # (B, T, V), right-padded layout
    for b in range(len(samples)):
        full_ids = full.model_inputs["input_ids"][b, :int(full.attention_mask[b].sum())]
        expected = log_softmax[b, torch.arange(len(full_ids) - 1), full_ids[1:]]
        valid = mask[b, 1:].bool()  # log_probs[t] scores token t + 1
        got = fused.log_probs[b][valid][-len(expected):]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
