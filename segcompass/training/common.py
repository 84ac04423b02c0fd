"""What `segcompass train`'s modules share, so that they import one way:
supervised -> grpo -> grpo_trainer -> common (and supervised -> common).

The AdamW parameter groups of both loops, the checks and reward settings of the GRPO fields of
`TrainConfig` and of its GRPO recipe flags (which `TrainConfig` runs on construction), the files
a GRPO checkpoint adds to
TRL's, and the pieces of a GRPO run the trainer calls (world prompts, format reward, side
weights, gradient averaging, policy weight loading). `cfg` is a
`segcompass.training.supervised.TrainConfig` throughout.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from saekit.errors import UserError
from segcompass.model import SegCompass
from segcompass.training.rewards import RewardConfig, format_reward

SIDE_WEIGHTS = "side.safetensors"
GRPO_STATE = "segcompass_grpo.json"
"""Written last into each GRPO checkpoint: its presence marks a complete one."""


def param_groups(model: SegCompass, cfg) -> list[dict]:
    """AdamW groups with the per-module multipliers; frozen parameters are left out."""
    head, sam = model.head, model.sam
    groups = {
        "policy": (model.policy.parameters(), cfg.policy_lr_mult),
        "codebook": ([*head.codebook.parameters(), *head.aggregator.parameters()], cfg.codebook_lr_mult),
        "slot_mapper": (head.slot_mapper.parameters(), cfg.slot_mapper_lr_mult),
        "decoder": ([*sam.prompt_encoder.parameters(), *sam.mask_decoder.parameters(),
                     *sam.shared_image_embedding.parameters()], cfg.decoder_lr_mult),
        "sam_encoder": (sam.vision_encoder.parameters(), cfg.sam_encoder_lr_mult),
    }
    out, seen = [], set()
    for name, (params, mult) in groups.items():
        # SAM's prompt encoder holds the shared positional embedding too: count it once.
        trainable = []
        for param in params:
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                trainable.append(param)
        if trainable:
            out.append({"name": name, "params": trainable, "lr": cfg.lr * mult})
    return out


def check_grpo_config(cfg) -> None:
    """`UserError` for GRPO settings of a `TrainConfig` that cannot run."""
    if cfg.group_size < 2:
        raise UserError(f"train: --group-size must be >= 2 (GRPO compares rollouts), got {cfg.group_size}")
    for name in ("rl_prompts", "max_new_tokens", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"train: --{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.temperature <= 0 or cfg.kl_coef < 0 or not 0 < cfg.clip_epsilon < 1:
        raise UserError(f"train: need --temperature > 0, --kl-coef >= 0, 0 < --clip-epsilon < 1 "
                        f"(got {cfg.temperature}, {cfg.kl_coef}, {cfg.clip_epsilon})")
    try:
        reward_config(cfg)
    except ValueError as err:
        raise UserError(f"train: {err}") from None
    per_device_rows(cfg, int(os.environ.get("WORLD_SIZE", "1")))


def check_recipe(cfg) -> None:
    """`UserError` for GRPO recipe flags (issue 21) that do not fit the mode or the data."""
    from segcompass.data.sources import has_chain_of_thought, parse_data_list

    world = has_chain_of_thought(parse_data_list(cfg.data))
    data = " ".join(cfg.data)
    if cfg.seg_on != "all" and cfg.mode != "rl+seg":
        raise UserError(f"train: --seg-on is for --mode rl+seg (where the seg loss meets the rollouts), "
                        f"got --mode {cfg.mode}")
    if cfg.seg_on in ("teacher", "correct") and not world:
        raise UserError(f"train: --seg-on {cfg.seg_on} needs ground-truth reasoning, which only the world has "
                        f"(--data {data})")
    if not 0 < cfg.top_p <= 1 or cfg.entropy_coef < 0 or cfg.dynamic_sampling < 0 or cfg.consistency_reward_weight < 0:
        raise UserError(f"train: need 0 < --top-p <= 1 and --entropy-coef, --dynamic-sampling, "
                        f"--consistency-reward-weight >= 0 (got {cfg.top_p}, {cfg.entropy_coef}, "
                        f"{cfg.dynamic_sampling}, {cfg.consistency_reward_weight})")
    for name in ("entropy_coef", "dynamic_sampling", "consistency_reward_weight"):
        if getattr(cfg, name) and cfg.mode == "seg":
            raise UserError(f"train: --{name.replace('_', '-')} is for GRPO (--mode rl | rl+seg), got --mode seg")
    if cfg.consistency_reward_weight and not world:
        raise UserError(f"train: --consistency-reward-weight needs ground-truth reasoning (the world's objects "
                        f"and targets); --data {data} has none")
    if cfg.curriculum != "off" and not world:
        raise UserError(f"train: --curriculum {cfg.curriculum} weights the world's instruction families; "
                        f"--data {data} is not the world")
    if cfg.dynamic_sampling and (cfg.rollout_engine != "generate" or int(os.environ.get("WORLD_SIZE", "1")) > 1):
        raise UserError("train: --dynamic-sampling runs on one process with --rollout-engine generate")


def per_device_rows(cfg, world_size: int) -> int:
    """Rollouts per micro-batch per process; a UserError when groups cannot stay whole."""
    rows = cfg.rl_prompts * cfg.group_size
    if rows % (world_size * cfg.grad_accum):
        raise UserError(f"train: {cfg.rl_prompts} prompts x group size {cfg.group_size} = {rows} rollouts do "
                        f"not split over {world_size} process(es) x {cfg.grad_accum} micro-batches")
    per_device = rows // (world_size * cfg.grad_accum)
    if cfg.grad_accum > 1 and per_device % cfg.group_size:
        raise UserError(f"train: with --grad-accum {cfg.grad_accum} each micro-batch must hold whole groups: "
                        f"{per_device} rollouts per process is not a multiple of --group-size {cfg.group_size}")
    return per_device


def reward_config(cfg) -> RewardConfig:
    return RewardConfig(cfg.format_reward_weight, cfg.mask_reward_weight, cfg.confidence_threshold,
                        cfg.consistency_reward_weight)


class WorldPrompts:
    """Training samples 0..n-1 as TRL prompt rows (image + conversational prompt): world samples
    of `split`, or the rows of a `segcompass.data.sources.TrainStream` (`--data`) when given.

    Row i is sample i, so GRPO step s reads samples s*P .. s*P+P-1 like the `seg` mode.
    `dataset()` is the `datasets.Dataset` TRL iterates: it stores only the indices and
    renders each row on access (a sample is a pure function of the sources, seed and index).
    """

    def __init__(self, split: str, n: int, seed: int, stream=None):
        self.split, self.n, self.seed, self.stream = split, n, seed, stream
        self._cache: dict[int, Any] = {}

    def sample(self, index: int):
        """Sample `index` (kept for the G rows and the loss that read it)."""
        from segcompass.world.scenes import make_sample

        index = int(index)
        if index not in self._cache:
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[index] = (self.stream[index] if self.stream is not None
                                  else make_sample(self.split, index, self.seed))
        return self._cache[index]

    def rows(self, batch: dict[str, list]) -> dict[str, list]:
        """`datasets` transform: {"sample_index": [...]} -> TRL's prompt / image columns."""
        from PIL import Image

        from segcompass.template import build_prompt

        samples = [self.sample(i) for i in batch["sample_index"]]
        return {"sample_index": list(batch["sample_index"]),
                "prompt": [[{"role": "user", "content": [
                    {"type": "image"}, {"type": "text", "text": build_prompt(s.instruction, multi=s.multi_prompt)}]}]
                    for s in samples],
                "image": [Image.fromarray(s.image) for s in samples],
                "multi_prompt": [s.multi_prompt for s in samples]}

    def dataset(self):
        from datasets import Dataset

        data = Dataset.from_dict({"sample_index": list(range(self.n))})
        data.set_transform(self.rows)
        return data


def response_text(tokenizer, ids: list[int], eos_ids: list[int]) -> str:
    """Decoded response, special tokens kept, cut at the first end marker, padding removed."""
    pad = tokenizer.pad_token_id
    end = next((i for i, t in enumerate(ids) if t in eos_ids), len(ids))
    return tokenizer.decode([t for t in ids[:end] if t != pad], skip_special_tokens=False)


def make_format_reward(tokenizer, eos_ids: list[int]):
    """The format reward as a plain TRL reward function (reads the rows' `multi_prompt`)."""
    from segcompass.template import k_for

    def format_reward_fn(prompts, completions, completion_ids, multi_prompt, **kwargs) -> list[float]:
        return [format_reward(response_text(tokenizer, ids, eos_ids), k_for(bool(m)))
                for ids, m in zip(completion_ids, multi_prompt)]

    format_reward_fn.__name__ = "format"
    return format_reward_fn


def side_state(model) -> dict[str, Tensor]:
    """Head (codebook, aggregator, slot mapper) and SAM weights: what TRL's model lacks; with
    LoRA also the policy's adapters (TRL's own policy save does not load back into them)."""
    from segcompass.lora import adapter_state, has_lora
    from segcompass.model import _HEAD_OWN_PREFIXES

    state = {f"head.{k}": v for k, v in model.head.state_dict().items() if k.startswith(_HEAD_OWN_PREFIXES)}
    state.update({f"sam.{k}": v for k, v in model.sam.state_dict().items()})
    if has_lora(model.policy):
        state.update({f"lora.{k}": v for k, v in adapter_state(model.policy).items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}  # clone: SAM shares one tensor twice


def load_side_state(model, path: Path) -> None:
    tensors = load_file(str(path))
    head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    sam = {k[4:]: v for k, v in tensors.items() if k.startswith("sam.")}
    lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}
    if lora:
        from segcompass.lora import load_adapter_state

        load_adapter_state(model.policy, lora, str(path))
    model.sam.load_state_dict(sam, strict=True)
    missing, unexpected = model.head.load_state_dict(head, strict=False)
    if unexpected or [k for k in missing if not k.startswith("mask_decoder.")]:
        raise UserError(f"{path}: head weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Mean of each parameter's gradient over processes, in one all-reduce (None stays None
    only where no process has a gradient)."""
    import torch.distributed as dist

    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([g.flatten().float() for g in grads] + [has])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = (flat[offset:offset + n] / world_size).view_as(p).to(p.dtype)
        offset += n
    for p, count in zip(params, flat[offset:].tolist()):
        if count == 0:
            p.grad = None


def load_policy_weights(policy: torch.nn.Module, folder: Path) -> None:
    """Put the checkpoint's policy weights into `policy`, whatever key layout they were saved in.

    HF's resume path calls `load_state_dict(..., strict=False)` on the file `save_pretrained`
    wrote; for LLaVA, transformers 5 saves the legacy key names ("language_model.model.*"),
    none of which match the module ("model.language_model.*"), so that call silently loads
    nothing. `from_pretrained` maps the keys; its weights are copied in strictly.
    """
    fresh = type(policy).from_pretrained(folder, dtype=next(policy.parameters()).dtype, use_safetensors=True,
                                         local_files_only=True)
    with torch.no_grad():
        policy.load_state_dict(fresh.state_dict(), strict=True)
