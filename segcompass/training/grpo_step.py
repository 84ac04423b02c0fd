"""The pieces of one GRPO + segmentation step that do not depend on the engine (pure functions).

- `KeyedGumbelSampler`: sampling at temperature T as a pure function of each rollout's key
  (seed, step, sample, rollout): argmax(logits / T + Gumbel noise drawn from the row's own
  generator) is an exact draw from softmax(logits / T) (the Gumbel-max trick). A rollout is
  then the same whatever else shares its `generate` batch, on 1 process or 8, before or
  after a resume. With `top_p` < 1 the draw is from the nucleus (the smallest set of tokens
  whose probability reaches top_p, renormalised), as `transformers`' TopPLogitsWarper keeps.
- `rollout_batch`: TRL's [left-padded prompt | right-padded completion] tensors as a saekit
  `ModelBatch` with token types, so `policy.slot_inputs` reads them like any other batch.
- `head_pass`: SAE codes + head from an already-recorded policy forward (no LLM pass).
- `group_advantages`: (r - mean_group) / (std_group + eps).
- `zero_spread`, `reserve_index`, `dapo_fill`: DAPO's dynamic sampling (`--dynamic-sampling`):
  groups whose rewards are all equal are replaced by groups of fresh prompts from a keyed
  reserve of the stream, at most `cap` draws per step.
- `grpo_policy_loss`: clipped-ratio surrogate + beta * k3 KL (- an entropy bonus), per-sequence
  token mean.
- `per_sample_segmentation_loss`: the segmentation loss averaged per sample, so that the
  loss of a batch does not depend on how it is split over processes; optionally weighted
  per sample (`--seg-on correct | advantage`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from transformers import LogitsProcessor

from saekit.inputs import PAD_TYPE, ModelBatch, TokenType
from segcompass.training.losses import SegLossConfig, SegLossOutput, segmentation_loss
from segcompass.policy import PolicyForward

ADVANTAGE_EPS = 1e-4
"""Added to the group std (as TRL): a group whose rewards are all equal gets advantage 0."""


def rollout_seed(*key: int) -> int:
    """A 63-bit seed from integers (seed, step, sample, rollout): stable across runs and machines."""
    digest = hashlib.sha256(",".join(str(int(k)) for k in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class KeyedGumbelSampler(LogitsProcessor):
    """A `transformers` logits processor for greedy decoding that turns it into keyed sampling.

    Row b's noise at decoding step t is the t-th draw of a generator seeded by `seeds[b]`;
    `generate(..., do_sample=False, logits_processor=[this])` then samples token t of
    row b from softmax(logits / temperature) independently of the other rows.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, device: torch.device | str = "cpu",
                 top_p: float = 1.0):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """scores (B, V) -> (B, V) scores / T + Gumbel(0, 1) noise."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} rollout keys")
        uniform = torch.stack([torch.rand(scores.shape[1], generator=g, device=g.device)
                               for g in self.generators]).to(scores.device)  # (B, V)
        tiny = torch.finfo(uniform.dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
        logits = scores.float() / self.temperature
        if self.top_p < 1:
            logits = nucleus(logits, self.top_p)
        return logits + gumbel


def nucleus(logits: Tensor, top_p: float) -> Tensor:
    """logits (B, V) -> (B, V) with -inf outside each row's nucleus: a token stays when the
    probability of the tokens ranked above it is below `top_p` (the top token always stays)."""
    ranked, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = ranked.softmax(dim=-1)
    above = probs.cumsum(dim=-1) - probs  # (B, V): mass ranked strictly above each token
    drop = (above >= top_p).scatter(-1, order, above >= top_p)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def rollout_batch(prompt_ids: Tensor, prompt_mask: Tensor, prompt_types: Tensor, completion_ids: Tensor,
                  completion_mask: Tensor, eos_token_ids: Sequence[int], vision_inputs: dict[str, Tensor]
                  ) -> ModelBatch:
    """prompt (B, P) left-padded with its saekit token types, completion (B, C) right-padded
    -> ModelBatch over (B, P + C). Completion tokens are RESPONSE, end markers SPECIAL."""
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P + C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    is_end = torch.isin(completion_ids, torch.tensor(list(eos_token_ids), device=completion_ids.device))
    completion_types = torch.where(is_end, int(TokenType.SPECIAL), int(TokenType.RESPONSE))
    completion_types = torch.where(completion_mask.bool(), completion_types, PAD_TYPE)
    prompt_types = torch.where(prompt_mask.bool(), prompt_types.to(completion_types.device), PAD_TYPE)
    token_types = torch.cat([prompt_types.to(torch.int8), completion_types.to(torch.int8)], dim=1)
    image_grid = torch.full((*input_ids.shape, 2), PAD_TYPE, dtype=torch.int16, device=input_ids.device)
    model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **vision_inputs}
    return ModelBatch(model_inputs, token_types, image_grid, attention_mask)


def head_pass(model, forward: PolicyForward, batch: ModelBatch, image_embeddings: Tensor):
    """`SegCompass.forward` minus its policy pass (see `SegCompass.heads`)."""
    return model.heads(forward, batch, image_embeddings)


class Advantages(NamedTuple):
    advantages: Tensor
    """(N,) group-normalised advantages."""
    group_std: Tensor
    """(N / G,) reward std of each group (unbiased)."""


def group_advantages(rewards: Tensor, group_ids: Tensor, group_size: int) -> Advantages:
    """rewards (N,) of N / G consecutive groups -> (r - mean) / (std + eps) within each group.

    group_ids (N,) must be constant within each run of `group_size` rows (the prompt a
    rollout answers); anything else means the batch does not hold whole groups.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    ids = group_ids.view(-1, group_size)  # (N,) -> (N / G, G)
    if not bool((ids == ids[:, :1]).all()):
        raise RuntimeError("a GRPO micro-batch must hold whole groups (the G rollouts of each prompt "
                           "together); make the per-process micro-batch a multiple of --group-size")
    grouped = rewards.float().view(-1, group_size)  # (N / G, G)
    std = grouped.std(dim=1, keepdim=True)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)) / (std + ADVANTAGE_EPS)
    return Advantages(advantages.flatten(), std.flatten())


SPREAD_EPS = 1e-6
"""A group whose reward std is below this has no spread (no GRPO signal)."""


def zero_spread(rewards: Tensor, group_size: int) -> Tensor:
    """rewards (N,) of N / G consecutive groups -> (N / G,) bool: the group's rewards are all equal."""
    return rewards.float().view(-1, group_size).std(dim=1) < SPREAD_EPS  # (N,) -> (N / G, G) -> (N / G,)


def reserve_index(base: int, step: int, draw: int, slot: int, *, per_draw: int, cap: int) -> int:
    """Stream position of extra prompt `slot` of dynamic-sampling draw `draw` at step `step`:
    positions from `base` (the plain stream's length) on are a reserve, `per_draw` per (step,
    draw), so the extra prompts are a pure function of (seed, step, draw, slot)."""
    return base + (step * cap + draw) * per_draw + slot


class DrawStats(NamedTuple):
    draws: int
    """Extra draws made (0 .. cap)."""
    groups: int
    """Groups scored, the first batch's included."""
    zero_spread: int
    """Of those, groups with no reward spread."""


def dapo_fill(first: list, first_flat: Sequence[bool], draw, cap: int) -> tuple[list, DrawStats]:
    """DAPO's dynamic sampling: the groups of `first` that have reward spread, topped up from
    `draw(d, need) -> (groups, flat flags)` (d = 0, 1, ... < cap) with groups that have spread,
    until there are len(first); if the draws run out, the first batch's flat groups fill the
    rest (in order). Returns the batch (kept first groups, then drawn ones) and its stats."""
    chosen = [g for g, flat in zip(first, first_flat) if not flat]
    groups, zero, d = len(first), sum(bool(f) for f in first_flat), 0
    while len(chosen) < len(first) and d < cap:
        new, flat = draw(d, len(first) - len(chosen))
        chosen += [g for g, f in zip(new, flat) if not f][:len(first) - len(chosen)]
        groups, zero, d = groups + len(new), zero + sum(bool(f) for f in flat), d + 1
    chosen += [g for g, flat in zip(first, first_flat) if flat][:len(first) - len(chosen)]
    return chosen, DrawStats(d, groups, zero)


class PolicyLoss(NamedTuple):
    loss: Tensor
    """Scalar: mean over sequences of the token mean of surrogate + beta * KL."""
    surrogate: Tensor
    """Scalar (detached): the clipped-surrogate part."""
    kl: Tensor
    """Scalar (detached): token mean of the k3 KL estimate to the reference."""
    clip_fraction: Tensor
    """Scalar (detached): fraction of tokens whose ratio was clipped in the direction of A."""


def grpo_policy_loss(logps: Tensor, old_logps: Tensor, ref_logps: Tensor | None, advantages: Tensor,
                     mask: Tensor, *, epsilon: float = 0.2, beta: float = 0.2, entropies: Tensor | None = None,
                     entropy_coef: float = 0.0) -> PolicyLoss:
    """logps, old_logps, ref_logps (B, C) log-probabilities of the sampled tokens under the
    current, rollout and reference policies; advantages (B,); mask (B, C) -> PolicyLoss.

        ratio = exp(logp - logp_old)
        per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3 - entropy_coef * H
        k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1   (unbiased, always >= 0)
    H: `entropies` (B, C), the policy's entropy at each completion position (with gradient);
    the bonus is only added when `entropy_coef` is not 0.
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None].to(logps.dtype)  # (B,) -> (B, 1)
    surrogate = -torch.min(ratio * adv, ratio.clamp(1 - epsilon, 1 + epsilon) * adv)
    per_token = surrogate
    kl = torch.zeros_like(logps)
    if ref_logps is not None and beta != 0:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = surrogate + beta * kl
    if entropy_coef != 0:
        if entropies is None:
            raise ValueError("entropy_coef needs the per-token entropies")
        per_token = per_token - entropy_coef * entropies.to(per_token.dtype)
    lengths = mask.sum(dim=1).clamp(min=1.0)  # (B,)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    tokens = mask.sum().clamp(min=1.0)
    return PolicyLoss(loss, ((surrogate * mask).sum(1) / lengths).mean().detach(),
                      ((kl * mask).sum() / tokens).detach(), ((clipped.to(mask.dtype) * mask).sum() / tokens).detach())


def per_sample_segmentation_loss(heatmap_logits: Tensor, mask_logits: Tensor, confidence_logits: Tensor,
                                 targets: Sequence[Tensor], config: SegLossConfig,
                                 weights: Tensor | None = None,
                                 active_slots: Sequence[int] | None = None) -> SegLossOutput:
    """`losses.segmentation_loss` of each sample alone, averaged over samples (B >= 1).

    The pooled loss averages over the matched pairs of the whole batch, which depends on how
    a batch is split across processes; the per-sample mean does not (data-parallel
    averaging of per-process means then equals the single-process loss exactly).
    `weights` (B,) >= 0 (no gradient): each term is sum_b w_b * L_b / B instead, over the
    samples with w_b > 0 only (all zero: a zero loss, no head pass in the graph).
    `active_slots` as in `losses.segmentation_loss` (default: every slot may match).
    """
    batch = confidence_logits.shape[0]
    rows = list(range(batch)) if weights is None else [b for b in range(batch) if float(weights[b]) > 0]
    parts = [segmentation_loss(heatmap_logits[b:b + 1], mask_logits[b:b + 1], confidence_logits[b:b + 1],
                               [targets[b]], config, None if active_slots is None else [active_slots[b]])
             for b in rows]

    def mean(name: str) -> Tensor:
        if weights is None:
            return torch.stack([getattr(p, name) for p in parts]).mean()
        if not parts:
            return torch.zeros((), device=confidence_logits.device)
        w = weights.detach().to(confidence_logits.device, torch.float32)[rows]  # (B_kept,)
        return (torch.stack([getattr(p, name) for p in parts]).float() * w).sum() / batch

    return SegLossOutput(total=mean("total"), seg=mean("seg"), heatmap_bce=mean("heatmap_bce"),
                         mask_dice=mean("mask_dice"), conf=mean("conf"),
                         num_matched=sum(p.num_matched for p in parts),
                         num_targets=sum(p.num_targets for p in parts),
                         num_unmatched_targets=sum(p.num_unmatched_targets for p in parts),
                         matches=[m for p in parts for m in p.matches])
