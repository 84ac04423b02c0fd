"""The pieces of one GRPO + segmentation step that do not depend on the engine (pure functions).

- `KeyedGumbelSampler`: sampling at temperature T as a pure function of each rollout's key
  (seed, step, sample, rollout): argmax(logits / T + Gumbel noise drawn from the row's own
  generator) is an exact draw from softmax(logits / T) (the Gumbel-max trick). A rollout is
  then the same whatever else shares its `generate` batch, on 1 process or 8, before or
  after a resume.
- `rollout_batch`: TRL's [left-padded prompt | right-padded completion] tensors as a saekit
  `ModelBatch` with token types, so `policy.slot_inputs` reads them like any other batch.
- `head_pass`: SAE codes + head from an already-recorded policy forward (no LLM pass).
- `group_advantages`: (r - mean_group) / (std_group + eps).
- `grpo_policy_loss`: clipped-ratio surrogate + beta * k3 KL, per-sequence token mean.
- `per_sample_segmentation_loss`: the segmentation loss averaged per sample, so that the
  loss of a batch does not depend on how it is split over processes.
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

    def __init__(self, seeds: Sequence[int], temperature: float, device: torch.device | str = "cpu"):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.temperature = temperature
        self.generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        """scores (B, V) -> (B, V) scores / T + Gumbel(0, 1) noise."""
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"{scores.shape[0]} rows but {len(self.generators)} rollout keys")
        uniform = torch.stack([torch.rand(scores.shape[1], generator=g, device=g.device)
                               for g in self.generators]).to(scores.device)  # (B, V)
        tiny = torch.finfo(uniform.dtype).tiny
        gumbel = -torch.log(-torch.log(uniform.clamp(tiny, 1.0 - 1e-7)))
        return scores.float() / self.temperature + gumbel


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
                     mask: Tensor, *, epsilon: float = 0.2, beta: float = 0.2) -> PolicyLoss:
    """logps, old_logps, ref_logps (B, C) log-probabilities of the sampled tokens under the
    current, rollout and reference policies; advantages (B,); mask (B, C) -> PolicyLoss.

        ratio = exp(logp - logp_old)
        per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * k3
        k3 = exp(logp_ref - logp) - (logp_ref - logp) - 1   (unbiased, always >= 0)
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
    lengths = mask.sum(dim=1).clamp(min=1.0)  # (B,)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + epsilon) & (adv > 0))
    tokens = mask.sum().clamp(min=1.0)
    return PolicyLoss(loss, ((surrogate * mask).sum(1) / lengths).mean().detach(),
                      ((kl * mask).sum() / tokens).detach(), ((clipped.to(mask.dtype) * mask).sum() / tokens).detach())


def per_sample_segmentation_loss(heatmap_logits: Tensor, mask_logits: Tensor, confidence_logits: Tensor,
                                 targets: Sequence[Tensor], config: SegLossConfig) -> SegLossOutput:
    """`losses.segmentation_loss` of each sample alone, averaged over samples (B >= 1).

    The pooled loss averages over the matched pairs of the whole batch, which depends on how
    a batch is split across processes; the per-sample mean does not (data-parallel
    averaging of per-process means then equals the single-process loss exactly).
    """
    parts = [segmentation_loss(heatmap_logits[b:b + 1], mask_logits[b:b + 1], confidence_logits[b:b + 1],
                               [targets[b]], config) for b in range(confidence_logits.shape[0])]

    def mean(name: str) -> Tensor:
        return torch.stack([getattr(p, name) for p in parts]).mean()

    return SegLossOutput(total=mean("total"), seg=mean("seg"), heatmap_bce=mean("heatmap_bce"),
                         mask_dice=mean("mask_dice"), conf=mean("conf"),
                         num_matched=sum(p.num_matched for p in parts),
                         num_targets=sum(p.num_targets for p in parts),
                         num_unmatched_targets=sum(p.num_unmatched_targets for p in parts),
                         matches=[m for p in parts for m in p.matches])
