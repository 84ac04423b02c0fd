"""`--mode seg` without ground-truth reasoning: the head trains on the policy's own responses.

Real datasets (RefCOCO/+/g, gRefCOCO, ReasonSeg) carry no chain of thought, so there is
nothing to teacher-force. Each step the current policy writes a response to every sample
that needs one (regenerated as the policy trains), greedy or sampled, and the step trains
on prompt + that response exactly as on a teacher-forced one. A response must carry the
template's `<REF_POS>` concentration tokens (at least one, in the response): the head
reads its slots there. One that carries none is left out of the step and counted
(`skipped_no_ref` in metrics.jsonl); a step whose responses all lack them makes no update.

Sampling is keyed (`grpo_step.KeyedGumbelSampler`): sample j of step s is drawn with a
generator seeded by (seed, s, j), so a resumed run writes the same responses as the
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from saekit.inputs import build_batch
from segcompass.template import build_prompt, format_response, k_for, parse_response

ResponseMode = Literal["auto", "teacher", "greedy", "sampled"]


def needs_own_response(mode: ResponseMode, sample) -> bool:
    """Whether `sample` trains on the policy's own response (else: its ground-truth chain of thought)."""
    if mode == "teacher":
        return False
    return mode != "auto" or getattr(sample, "cot", None) is None


def carries_ref_tokens(response: str, multi: bool) -> bool:
    """The response holds at least one `<REF_POS>` (the slots the head reads)."""
    return parse_response(response, k_for(multi)).n_ref_tokens >= 1


def teacher_response(sample) -> str:
    """The ground-truth chain of thought + the template's K concentration tokens."""
    return format_response(sample.cot, k_for(sample.multi_prompt))


@torch.no_grad()
def own_responses(model, samples: Sequence, *, seeds: Sequence[int] | None = None, temperature: float = 1.0,
                  max_new_tokens: int = 96, top_p: float = 1.0) -> list[str]:
    """The policy's responses (special tokens kept, end marker and padding removed) to
    `samples`: greedy, or sampled at `temperature` (nucleus `top_p`) with one keyed generator
    per sample when `seeds` is given. The policy is put in eval mode for decoding and restored after."""
    from segcompass.training.grpo_step import KeyedGumbelSampler

    loaded = model.loaded
    policy, tokenizer = loaded.model, loaded.tokenizer
    device = next(policy.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = [build_prompt(s.instruction, multi=s.multi_prompt) for s in samples]
    batch = build_batch(loaded, [Image.fromarray(np.asarray(s.image)) for s in samples], prompts,
                        padding_side="left")
    inputs = {k: v.to(device) for k, v in batch.model_inputs.items()}
    extra = {}
    if seeds is not None:
        extra["logits_processor"] = [KeyedGumbelSampler(seeds, temperature, device, top_p=top_p)]
    was_training = policy.training
    policy.eval()
    try:
        generated = policy.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                    pad_token_id=pad if pad is not None else eos, use_cache=True,
                                    suppress_tokens=[int(policy.config.image_token_id)], **extra)
    finally:
        policy.train(was_training)
    texts = []
    for row in generated[:, inputs["input_ids"].shape[1]:].tolist():  # (B, T_new)
        row = row[:row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode([t for t in row if t != pad], skip_special_tokens=False))
    return texts


def step_batch(model, cfg, step: int, samples: Sequence, keep_slot_embeddings: torch.Tensor | None,
               counts: dict[str, int]):
    """(SegBatch of the usable samples, their slot-embedding keep mask), or (None, None) when no
    sample of the step is usable. Samples with a chain of thought are teacher-forced unless
    `cfg.responses` says otherwise; the others get the policy's own response, kept only when
    it carries a `<REF_POS>`. `counts` gains self_generated and skipped_no_ref."""
    from segcompass.training.batching import batch_from_samples
    from segcompass.training.grpo_step import rollout_seed

    own = [i for i, s in enumerate(samples) if needs_own_response(cfg.responses, s)]
    responses: list[str | None] = [None if i in own else teacher_response(s) for i, s in enumerate(samples)]
    if own:
        seeds = [rollout_seed(cfg.seed, step, i) for i in own] if cfg.responses == "sampled" else None
        texts = own_responses(model, [samples[i] for i in own], seeds=seeds, temperature=cfg.temperature,
                              max_new_tokens=cfg.max_new_tokens, top_p=cfg.top_p)
        for i, text in zip(own, texts):
            responses[i] = text if carries_ref_tokens(text, samples[i].multi_prompt) else None
        counts["self_generated"] = counts.get("self_generated", 0) + len(own)
    kept = [i for i, r in enumerate(responses) if r is not None]
    counts["skipped_no_ref"] = counts.get("skipped_no_ref", 0) + len(samples) - len(kept)
    if not kept:
        return None, None
    batch = batch_from_samples(model, [samples[i] for i in kept], [responses[i] for i in kept])
    keep = None if keep_slot_embeddings is None else keep_slot_embeddings[kept]
    return batch, keep


def check_sources(cfg) -> None:
    """One-line UserErrors for `--data` / `--responses` / `--lora-rank` settings of a
    `TrainConfig` that cannot run (called on construction)."""
    from saekit.errors import UserError
    from segcompass.data.sources import has_chain_of_thought, parse_data_list

    specs = parse_data_list(cfg.data)
    if cfg.responses not in ("auto", "teacher", "greedy", "sampled"):
        raise UserError(f"train: --responses must be auto, teacher, greedy or sampled, got {cfg.responses!r}")
    if cfg.responses == "teacher" and not has_chain_of_thought(specs):
        raise UserError("train: --responses teacher needs ground-truth reasoning, which only the world has; "
                        "real datasets train on the policy's own responses (--responses auto|greedy|sampled)")
    if cfg.responses != "auto" and cfg.mode != "seg":
        raise UserError(f"train: --responses is for --mode seg (GRPO trains on its own rollouts), got --mode {cfg.mode}")
    if cfg.lora_rank < 0:
        raise UserError(f"train: --lora-rank must be >= 0 (0 = full fine-tuning), got {cfg.lora_rank}")
