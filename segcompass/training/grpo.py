"""`segcompass train --mode rl | rl+seg`: GRPO on the reasoning path, jointly with segmentation
supervision, on TRL's `GRPOTrainer` (subclassed in `segcompass.training.grpo_trainer`).

Why TRL: it is a maintained engine for exactly this loop (rollouts from the current weights
with a KV cache, a frozen reference model, group-normalised advantages, accelerate-based
DDP / FSDP / DeepSpeed, vLLM rollouts, resumable checkpoints with optimiser, scheduler and
RNG state). What SegCompass adds lives in a few overrides:

  _tokenize_prompts      prompts through saekit's `build_batch` (the same tokens and token
                         types as evaluation and supervised training)
  _generate_single_turn  one batched `generate` call (KV cache) with keyed Gumbel-max
                         sampling: rollout r of sample i at step s is a pure function of
                         (seed, s, i, r) and the weights, on any number of processes
  _calculate_rewards     the format reward is a plain TRL reward function; its local slice
                         is kept for the joint step
  _prepare_inputs        no shuffling: consecutive rows are the G rollouts of one prompt
  compute_loss           the joint step (below)
  create_optimizer/_scheduler, _clip_grad_norm   the paper's LR groups, OneCycle, one clip
                         over policy + head
  training_step          the head and SAM are outside TRL's model: their gradients are
                         averaged across processes here (TRL's model = the policy)
  _save_checkpoint/_load_from_checkpoint        + side.safetensors (head, SAM)

Passes per optimizer step (num_iterations = 1; each rollout is used by exactly one update):
  1. `generate` over the B·G rollouts, current weights, no gradient (TRL);
  2. the frozen reference policy over prompt + completion, no gradient (TRL; for the KL);
  3. the policy over prompt + completion with gradients: TRL's own log-prob forward, during
     which hooks record block L (the SAE's input) and the final norm (the slot embeddings).
     From this one pass come the GRPO log-probabilities, the SAE codes, the head's masks,
     the mask reward (hence the advantages, computed right here, before the loss) and the
     segmentation loss; one backward for GRPO + beta·KL + lambda_s·L_seg + lambda_c·L_conf.
With `--rollout-engine vllm-*`, pass 1 runs in vLLM and TRL adds one no-grad policy pass
for its importance-sampling correction (vLLM's and the trainer's numerics differ).
SAM's image encoder runs once per prompt, not per rollout. There is no pass only for the
SAE or only for scoring masks. Because advantages are formed inside the step, each
micro-batch (over all processes together) must hold whole groups: the per-process
micro-batch is a multiple of G, or one micro-batch per step.

Rollouts always come from the current weights (upstream sampled from a never-updated copy).
With one update per rollout batch the importance ratio is exactly 1 and the epsilon-clip never
binds (clip fraction 0 is logged); the clipped objective is still the one optimised.

Output folder (cfg.out):
    trl/checkpoint-N/   TRL/HF checkpoint: policy (safetensors), optimizer, scheduler, RNG,
                        trainer state (HF reads these back with torch.load(weights_only=True)),
                        + side.safetensors (head, SAM) + segcompass_grpo.json (written last)
    final/              SegCompass checkpoint folder (`segcompass eval` / `predict` read it)
    metrics.jsonl       one record per logging step (rewards, advantages, KL, clip, seg losses)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from saekit.errors import UserError
from segcompass.training.rewards import RewardConfig, format_reward

TRL_DIR = "trl"
SIDE_WEIGHTS = "side.safetensors"
GRPO_STATE = "segcompass_grpo.json"
"""Written last into each checkpoint: its presence marks a complete one."""


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
    return RewardConfig(cfg.format_reward_weight, cfg.mask_reward_weight, cfg.confidence_threshold)


class WorldPrompts:
    """World samples 0..n-1 of `split` as TRL prompt rows (image + conversational prompt).

    Row i is sample i, so GRPO step s reads samples s*P .. s*P+P-1 like the `seg` mode.
    `dataset()` is the `datasets.Dataset` TRL iterates: it stores only the indices and
    renders each row on access (a world sample is a pure function of seed, split, index).
    """

    def __init__(self, split: str, n: int, seed: int):
        self.split, self.n, self.seed = split, n, seed
        self._cache: dict[int, Any] = {}

    def sample(self, index: int):
        """World sample `index` (kept for the G rows and the loss that read it)."""
        from segcompass.world.scenes import make_sample

        index = int(index)
        if index not in self._cache:
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[index] = make_sample(self.split, index, self.seed)
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


def build_processor(loaded, policy_path: Path):
    """The processor TRL needs: LLaVA's is assembled from the loaded tokenizer and image
    processor; other families load theirs from the policy folder."""
    if loaded.preset.family == "llava":
        from transformers import LlavaProcessor

        config = loaded.model.config
        return LlavaProcessor(image_processor=loaded.image_processor, tokenizer=loaded.tokenizer,
                              patch_size=config.vision_config.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              image_token=loaded.preset.image_token, num_additional_image_tokens=1,
                              chat_template=loaded.tokenizer.chat_template)
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(policy_path, local_files_only=True)
    except (OSError, ValueError, ImportError) as err:
        raise UserError(f"train: no processor loads from {policy_path} ({str(err).splitlines()[0]})") from None


def side_state(model) -> dict[str, Tensor]:
    """Head (codebook, aggregator, slot mapper) and SAM weights: what TRL's model lacks."""
    from segcompass.model import _HEAD_OWN_PREFIXES

    state = {f"head.{k}": v for k, v in model.head.state_dict().items() if k.startswith(_HEAD_OWN_PREFIXES)}
    state.update({f"sam.{k}": v for k, v in model.sam.state_dict().items()})
    return {k: v.detach().cpu().clone() for k, v in state.items()}  # clone: SAM shares one tensor twice


def load_side_state(model, path: Path) -> None:
    tensors = load_file(str(path))
    head = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    sam = {k[4:]: v for k, v in tensors.items() if k.startswith("sam.")}
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


def _record(cfg) -> dict:
    from segcompass.training.supervised import _record as record

    return record(cfg)


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete `checkpoint-N` (one that holds GRPO_STATE), or None."""
    complete = [c for c in directory.glob("checkpoint-*") if (c / GRPO_STATE).is_file()]
    return max(complete, key=lambda c: int(c.name.rsplit("-", 1)[1]), default=None)


def _check_resumable(checkpoint: Path, cfg) -> None:
    from segcompass.training.supervised import _RESUME_IRRELEVANT

    saved = json.loads((checkpoint / GRPO_STATE).read_text())["config"]
    mine = _record(cfg)
    changed = [k for k, v in saved.items() if k not in _RESUME_IRRELEVANT and mine.get(k) != v]
    if changed:
        raise UserError(f"train: {checkpoint} was written with different settings ({', '.join(changed)}); "
                        "use another --out or --no-resume")


def grpo_args(cfg, output_dir: Path, device: torch.device):
    """TRL/HF arguments of a GRPO run (everything not listed keeps TRL's default)."""
    from trl import GRPOConfig

    world = int(os.environ.get("WORLD_SIZE", "1"))
    return GRPOConfig(
        output_dir=str(output_dir), max_steps=cfg.steps, per_device_train_batch_size=per_device_rows(cfg, world),
        gradient_accumulation_steps=cfg.grad_accum, num_generations=cfg.group_size,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, beta=cfg.kl_coef,
        epsilon=cfg.clip_epsilon, num_iterations=1, loss_type="grpo", scale_rewards="group",
        learning_rate=cfg.lr, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip,
        logging_steps=cfg.log_every, save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, report_to="none", disable_tqdm=True, shuffle_dataset=False,
        remove_unused_columns=False, dataloader_num_workers=0, log_completions=False,
        use_cpu=device.type == "cpu", bf16=device.type == "cuda", activation_checkpointing=device.type == "cuda",
        mask_truncated_completions=False, **_vllm_args(cfg))


def _vllm_args(cfg) -> dict[str, Any]:
    """TRL's vLLM rollouts: weights are pushed to vLLM after every optimizer step (rollouts from
    the current policy) and TRL adds one no-grad policy pass for its importance-sampling correction."""
    if cfg.rollout_engine == "generate":
        return {}
    return {"use_vllm": True, "vllm_mode": cfg.rollout_engine.removeprefix("vllm-")}


def train_grpo(cfg, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) GRPO training (modes rl, rl+seg); returns `out/final` (or the
    checkpoint folder when `stop_after` ended the run early)."""
    from transformers import PrinterCallback

    from saekit.models import resolve_device
    from segcompass.training.grpo_trainer import JsonlLog, Progress, SegCompassGRPOTrainer, StopAfter
    from segcompass.model import build_segcompass, save_segcompass

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    trl_dir = out / TRL_DIR
    if not cfg.resume:
        shutil.rmtree(trl_dir, ignore_errors=True)  # a fresh run must not resume a stale checkpoint later
    trl_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = latest_checkpoint(trl_dir)
    if checkpoint is not None:
        _check_resumable(checkpoint, cfg)
    model = build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae, sam_path=cfg.sam_path,
                             seed=cfg.seed, device=device)
    callbacks = [JsonlLog(out / "metrics.jsonl"),
                 Progress(progress, f"grpo {cfg.mode}", cfg.rl_prompts * cfg.group_size)]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = SegCompassGRPOTrainer(segcompass=model, cfg=cfg, args=grpo_args(cfg, trl_dir, device),
                                    train_dataset=WorldPrompts("train", cfg.steps * cfg.rl_prompts, cfg.seed),
                                    processing_class=build_processor(model.loaded, cfg.policy), callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # metrics.jsonl and the bar replace the printed dicts
    _broadcast_side(trainer)
    if trainer.accelerator.is_main_process:
        _trim_metrics(out / "metrics.jsonl", 0 if checkpoint is None else int(checkpoint.name.rsplit("-", 1)[1]))
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.state.global_step < cfg.steps:
        return latest_checkpoint(trl_dir)
    final = out / "final"
    if trainer.accelerator.is_main_process:
        save_segcompass(model, final, sae_path=cfg.sae,
                        record={"steps": cfg.steps, "mode": cfg.mode, "config": _record(cfg)})
    trainer.accelerator.wait_for_everyone()
    return final


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the records of steps <= `step` (the run restarts there; later ones will be redone)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _broadcast_side(trainer) -> None:
    """Start every process from rank 0's head and SAM (DDP does the same for the policy)."""
    if trainer.accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for tensor in [*trainer.segcompass.head.parameters(), *trainer.segcompass.sam.parameters()]:
            dist.broadcast(tensor.data, src=0)
