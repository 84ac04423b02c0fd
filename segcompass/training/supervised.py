"""`segcompass train`: supervised segmentation training of SegCompass (mode `seg`).

SAE frozen; policy frozen up to the SAE layer (the layer-L states it feeds the SAE never
change); blocks above it, the head and SAM's decoder train. AdamW (wd 0.01) with per-module
learning-rate multipliers (paper: x25 codebook, x80 slot mapper, x10 mask decoder over the
MLLM's base rate), OneCycle schedule, gradient clip 1.0. Each step reads the next
`batch_size` samples of the training stream (`--data`: the world's `train` split by default,
or RefCOCO/+/g, gRefCOCO, ReasonSeg and weighted mixtures, `segcompass.data.sources`),
deterministic by seed, so a resumed run sees exactly the data the uninterrupted one would
have. World samples are teacher-forced on their chain of thought; dataset samples, which
have none, train on the policy's own responses (`segcompass.training.self_generated`).
Any mode may start from a trained checkpoint (`--init-from`, `training.init_from`) and draw
world prompts by the policy's first errors (`--curriculum`, `training.curriculum`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from saekit.atomic import (atomic_directory, atomic_write_json, load_optimizer_state,
                           optimizer_state_tensors, resolve_directory)
from saekit.errors import UserError
from saekit.integrity import load_safetensors, read_json_object
from saekit.models import resolve_device
from saekit.run import MetricsLog, RunConfig, apply_threads, check_resume, config_record, free_on_resume
from segcompass.data.sources import TrainStream, parse_data_list
from segcompass.training.batching import SegBatch, batch_from_samples  # noqa: F401 (batch_from_samples re-exported)
from segcompass.training.scale import autocast_context, prepare_model
from segcompass.training.self_generated import check_sources, step_batch
from segcompass.training.common import (check_grpo_config, check_recipe,  # noqa: F401 (param_groups re-exported)
                                        param_groups)
from segcompass.world.scenes import WorldSample, hallucinated_sample
from segcompass.training.losses import SegLossConfig, SegLossOutput, segmentation_loss
from segcompass.model import (SegCompass, SegCompassConfig, build_segcompass, checkpoint_record,
                              load_segcompass, save_segcompass, write_checkpoint)

TRAINER_STATE = "trainer.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    """Supervised SegCompass training on the embedded world."""

    policy: Path
    """Warm-started policy folder (warmstart's `model/`)."""
    sae: Path
    """SAE folder for the policy's layer `sae_layer`."""
    out: Path = free_on_resume(Path("runs/segcompass"))
    """Output folder."""
    mode: Literal["seg", "rl", "rl+seg"] = "seg"
    """seg, rl (GRPO) or rl+seg (Table 4)."""
    data: tuple[str, ...] = ("world",)
    """Sources (docs/real-data.md)."""
    split_by: str | None = None
    """RefCOCO refs file: unc, umd or google."""
    responses: str = "auto"
    """seg on: teacher, greedy, sampled."""
    sae_layer: int = 2
    """Policy layer the SAE reads."""
    policy_preset: str = "tiny-llava"
    """saekit preset of the policy."""
    head_preset: str = "tiny-llava"
    """Head dimensions preset."""
    sam_preset: str = "sam-tiny-16"
    """SAM preset (--sam-path)."""
    sam_path: Path | None = None
    """Folder of a pretrained SAM (facebook/sam-vit-*)."""
    sam_cache: Path | None = free_on_resume(None)
    """SAM embedding cache; default OUT/sam_cache."""
    lora_rank: int = 0
    """LoRA rank of the policy (0: none)."""
    bf16: bool = True
    """bf16 autocast (GPU only)."""
    act_checkpointing: bool = free_on_resume(True)
    """Checkpoint activations (GPU only)."""
    key_kernel: int = 0
    """Key kernel (odd); 0 = the preset's."""
    policy_image_keys: Literal["preset", "on", "off"] = "preset"
    """Keys add policy image tokens."""
    head_routing: Literal["preset", "paper", "concepts"] = "preset"
    """Raw states or SAE atoms only."""
    steps: int = 900
    """Optimizer steps."""
    batch_size: int = 16
    """Samples per step."""
    lr: float = 2e-5
    """Base learning rate (paper: 2e-6)."""
    policy_lr_mult: float = 1.0
    """LR multiplier: policy (paper: 1)."""
    codebook_lr_mult: float = 25.0
    """LR mult.: codebook, aggregator."""
    slot_mapper_lr_mult: float = 80.0
    """LR multiplier: slot mapper."""
    decoder_lr_mult: float = 10.0
    """LR multiplier: SAM decoder."""
    sam_encoder_lr_mult: float = 25.0
    """LR multiplier: SAM encoder."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    pct_start: float = 0.1
    """OneCycle warm-up share."""
    seg_weight: float = 1.0
    """lambda_s."""
    conf_weight: float = 0.2
    """lambda_c."""
    dice_weight: float = 0.6
    """lambda_D."""
    heatmap_dice_weight: float = 0.0
    """Dice on the heatmaps (paper: 0)."""
    slot_embedding_dropout: float = 0.0
    """Chance e_k is zeroed."""
    hallucination_share: float = 0.0
    """Share of hallucinated twins (seg)."""
    log_every: int = free_on_resume(10)
    """Steps between metrics.jsonl records."""
    checkpoint_every: int = free_on_resume(100)
    """Steps between checkpoints."""
    allow_mismatch: bool = free_on_resume(False)
    """SAE of another model or layer."""
    # ---- GRPO (modes rl, rl+seg; segcompass.training.grpo); seg's own responses read temperature, top_p,
    # max_new_tokens ----
    group_size: int = 8
    """G: rollouts per prompt (paper: 8)."""
    rl_prompts: int = 2
    """Prompts per GRPO step."""
    kl_coef: float = 0.2
    """beta: KL weight."""
    clip_epsilon: float = 0.2
    """PPO ratio clip epsilon."""
    temperature: float = 1.0
    """Sampling temperature."""
    max_new_tokens: int = 96
    """Longest rollout, in tokens."""
    format_reward_weight: float = 0.3
    """w_format of the reward (Table 6)."""
    mask_reward_weight: float = 0.7
    """w_mask of the reward (Table 6)."""
    confidence_threshold: float = 0.5
    """Reward's slot confidence threshold."""
    grad_accum: int = 1
    """Micro-batches per step and process."""
    rollout_engine: Literal["generate", "vllm-colocate", "vllm-server"] = "generate"
    """vLLM: see docs/multi_gpu.md."""
    # ---- GRPO recipe (issue 21; training.grpo; docs/results.md section 4): the defaults change nothing ----
    init_from: Path | None = None
    """Start from this SegCompass checkpoint."""
    curriculum: Literal["off", "first-errors"] = "off"
    """Favour families the policy errs in."""
    seg_on: Literal["all", "teacher", "correct", "advantage"] = "all"
    """rl+seg: where the seg loss applies."""
    top_p: float = 1.0
    """Rollout nucleus sampling."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    dynamic_sampling: int = 0
    """DAPO: refill flat groups, <= N draws."""
    consistency_reward_weight: float = 0.0
    """w of the CoT check (world)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"train: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.policy_lr_mult <= 0:
            raise UserError(f"train: --policy-lr-mult must be > 0, got {self.policy_lr_mult}")
        if self.key_kernel < 0 or (self.key_kernel and self.key_kernel % 2 == 0):
            raise UserError(f"train: --key-kernel must be 0 (the preset's) or odd, got {self.key_kernel}")
        if not 0 <= self.hallucination_share <= 1:
            raise UserError(f"train: --hallucination-share must lie in [0, 1], got {self.hallucination_share}")
        if self.hallucination_share and self.mode != "seg":
            raise UserError(f"train: --hallucination-share is for --mode seg (GRPO trains on the policy's own "
                            f"rollouts), got --mode {self.mode}")
        if not 0 <= self.slot_embedding_dropout < 1:
            raise UserError(f"train: --slot-embedding-dropout must lie in [0, 1), got {self.slot_embedding_dropout}")
        if self.lr <= 0 or not 0 < self.pct_start < 1:
            raise UserError(f"train: need --lr > 0 and 0 < --pct-start < 1 (got {self.lr}, {self.pct_start})")
        if self.mode != "seg":
            check_grpo_config(self)
        check_sources(self)
        check_recipe(self)

    def model_config(self) -> SegCompassConfig:
        return SegCompassConfig(policy_preset=self.policy_preset, sae_layer=self.sae_layer,
                                head_preset=self.head_preset, sam_preset=self.sam_preset,
                                train_sam_encoder=self.sam_path is None, key_kernel=self.key_kernel,
                                policy_image_keys=self.policy_image_keys,
                                head_routing=self.head_routing, lora_rank=self.lora_rank)

    def loss_config(self) -> SegLossConfig:
        return SegLossConfig(seg_weight=self.seg_weight, conf_weight=self.conf_weight,
                             dice_weight=self.dice_weight, heatmap_dice_weight=self.heatmap_dice_weight)


class StepResult(NamedTuple):
    loss: SegLossOutput
    """Loss components of the step."""
    match_iou: float
    """Mean soft IoU of the matched (slot, target) pairs."""
    sae_mse: float
    """The frozen SAE's reconstruction MSE on the batch's SAE tokens (Figure 8's x axis)."""


def slot_embedding_keep(cfg: TrainConfig, step: int, batch_size: int) -> torch.Tensor | None:
    """(B,) bool: which samples of step `step` keep their e_k; None when the dropout is off.
    Keyed by (seed, step) with its own generator, so it neither reads nor moves torch's RNG."""
    if cfg.slot_embedding_dropout == 0:
        return None
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.rand(batch_size, generator=generator) >= cfg.slot_embedding_dropout


def train_stream(cfg: TrainConfig, total: int, family_weights: dict[str, float] | None = None):
    """The run's training samples (`--data`), `total` positions long; with `family_weights`
    (`--curriculum`), the world's train samples drawn by those weights."""
    if family_weights is not None:
        from segcompass.training.curriculum import CurriculumStream

        return CurriculumStream(family_weights, seed=cfg.seed)
    return TrainStream(parse_data_list(cfg.data), seed=cfg.seed, total=total, split_by=cfg.split_by)


def run_family_weights(cfg: TrainConfig, model: SegCompass, out: Path, resuming: bool) -> dict[str, float] | None:
    """`--curriculum first-errors`: the run's family weights (`training.curriculum`); None when off."""
    if cfg.curriculum == "off":
        return None
    from segcompass.training.curriculum import curriculum_weights

    return curriculum_weights(cfg, model.loaded, out, resuming=resuming)


def step_samples(cfg: TrainConfig, step: int, stream: TrainStream | None = None) -> list:
    """Training samples step*B .. step*B + B-1 of `stream` (default: the config's), each world
    sample replaced by its hallucinated twin with probability `hallucination_share` (own
    generator keyed by seed and step: resumable, and torch's RNG untouched)."""
    stream = stream or train_stream(cfg, cfg.steps * cfg.batch_size)
    samples = [stream[step * cfg.batch_size + j] for j in range(cfg.batch_size)]
    if cfg.hallucination_share == 0:
        return samples
    rng = np.random.default_rng([cfg.seed, step, 0x4A11])
    swap = rng.random(len(samples)) < cfg.hallucination_share  # (B,)
    return [(hallucinated_sample(s, rng) or s) if flip and isinstance(s, WorldSample) else s
            for s, flip in zip(samples, swap)]


def seg_step(model: SegCompass, batch: SegBatch, loss_cfg: SegLossConfig,
             keep_slot_embeddings: torch.Tensor | None = None) -> StepResult:
    """Forward one batch and compute the segmentation loss (no backward)."""
    embeddings = model.image_embeddings(batch.images)
    keep = None if keep_slot_embeddings is None else keep_slot_embeddings.to(embeddings.device)
    out = model(batch.model_batch, embeddings, keep)
    loss = segmentation_loss(out.head.heatmap_logits, out.head.mask_logits, out.head.confidence_logits,
                             batch.frame_targets, loss_cfg, active_slots=batch.active_slots)
    scores = [float(s) for m in loss.matches for s in m.score]
    with torch.no_grad():
        tokens = out.slots.sae_tokens.to(model.sae.W_enc.dtype)
        sae_mse = float((model.sae(tokens) - tokens).pow(2).sum(-1).mean())
    return StepResult(loss, sum(scores) / len(scores) if scores else 0.0, sae_mse)


def train(cfg: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Run (or resume) training; returns the final checkpoint folder `out/final`."""
    if cfg.mode != "seg":  # GRPO modes run on TRL (segcompass.training.grpo); everything below is mode seg
        from segcompass.training.grpo import train_grpo

        return train_grpo(cfg, progress=progress, stop_after=stop_after)
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    checkpoint = resolve_directory(out / "checkpoint", TRAINER_STATE) if cfg.resume else None
    if checkpoint is not None:
        model = load_segcompass(checkpoint, device=device)
    else:
        model = build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae,
                                 sam_path=cfg.sam_path, seed=cfg.seed, device=device,
                                 allow_mismatch=cfg.allow_mismatch)
        if cfg.init_from is not None:
            from segcompass.training.init_from import init_from_checkpoint

            init_from_checkpoint(model, cfg.init_from, cfg.sae)
    out.mkdir(parents=True, exist_ok=True)  # after the pieces are checked: a refusal writes nothing
    optimizer = torch.optim.AdamW(param_groups(model, cfg), weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=cfg.steps,
        pct_start=cfg.pct_start)
    start = _restore(checkpoint, cfg, optimizer, scheduler, device) if checkpoint else 0
    if start == 0:
        torch.manual_seed(cfg.seed)
    metrics = MetricsLog(out / "metrics.jsonl", start)  # lines after the checkpoint are redone
    stream = train_stream(cfg, cfg.steps * cfg.batch_size, run_family_weights(cfg, model, out, checkpoint is not None))
    counts = dict(checkpoint_record(checkpoint).get("counts", {})) if checkpoint else {}
    empty_before = counts.get("skipped_empty_target", 0)
    prepare_model(model, cfg, device, out)
    model.train()
    loss_cfg = cfg.loss_config()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="seg train",
               disable=not progress)
    for step in bar:
        t0 = time.perf_counter()
        batch, keep = step_batch(model, cfg, step, step_samples(cfg, step, stream),
                                 slot_embedding_keep(cfg, step, cfg.batch_size), counts)
        counts["skipped_empty_target"] = empty_before + stream.skipped_empty
        optimizer.zero_grad(set_to_none=True)
        result = None  # stays None when no response carried <REF_POS>: no update, the schedule moves on
        if batch is not None:
            with autocast_context(cfg, device):
                result = seg_step(model, batch, loss_cfg, keep)
            result.loss.total.backward()
            bar.set_postfix(loss=f"{result.loss.total.item():.3f}", iou=f"{result.match_iou:.2f}")
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            metrics.append(_metrics(done, result, grad_norm, optimizer, time.perf_counter() - t0, counts))
        if done % cfg.checkpoint_every == 0 or done == cfg.steps:
            _save(out / "checkpoint", model, cfg, optimizer, scheduler, done, counts)
        if stop_after is not None and done >= stop_after:
            return out / "checkpoint"
    final = out / "final"
    save_segcompass(model, final, sae_path=cfg.sae, record={"steps": cfg.steps, "config": config_record(cfg),
                                                            "counts": counts})
    return final


def _metrics(step: int, result: StepResult | None, grad_norm, optimizer, seconds: float,
             counts: dict[str, int] | None = None) -> dict:
    counted = {k: int(v) for k, v in sorted((counts or {}).items())}  # run totals: skips, own responses
    if result is None:
        return {"step": step, "skipped_step": True, **counted, "step_seconds": seconds,
                "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}}
    loss = result.loss
    return {"step": step, **counted, "loss": loss.total.item(), "seg": loss.seg.item(),
              "heatmap_bce": loss.heatmap_bce.item(), "mask_dice": loss.mask_dice.item(),
              "conf": loss.conf.item(), "match_iou": result.match_iou, "sae_mse": result.sae_mse, "matched": loss.num_matched,
              "targets": loss.num_targets, "unmatched_targets": loss.num_unmatched_targets,
              "grad_norm": float(grad_norm), "step_seconds": seconds,
              "lr": {g["name"]: g["lr"] for g in optimizer.param_groups}}


def _save(directory: Path, model: SegCompass, cfg: TrainConfig, optimizer, scheduler, step: int,
          counts: dict[str, int] | None = None) -> None:
    """Model, optimizer, scheduler, RNG, step and run counts in one folder, swapped in atomically."""
    with atomic_directory(directory) as tmp:
        write_checkpoint(model, tmp, sae_path=cfg.sae, record={"steps_done": step, "counts": dict(counts or {})})
        tensors, groups = optimizer_state_tensors(optimizer)
        save_file(tensors, str(tmp / OPTIMIZER_FILE))
        save_file({"torch": torch.get_rng_state()}, str(tmp / RNG_FILE))
        atomic_write_json(tmp / TRAINER_STATE, {"step": step, "param_groups": groups,
                                                "scheduler": scheduler.state_dict(), "config": config_record(cfg)})


def _restore(directory: Path, cfg: TrainConfig, optimizer, scheduler, device) -> int:
    fix = f"delete {directory} to start again, or use --no-resume"
    state = read_json_object(directory / TRAINER_STATE, fields={
        "step": int, "config": dict, "param_groups": list, "scheduler": dict}, fix=fix)
    check_resume(state["config"], cfg, f"train: {directory}")
    load_optimizer_state(optimizer, load_safetensors(directory / OPTIMIZER_FILE, fix=fix),
                         state["param_groups"], device)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_safetensors(directory / RNG_FILE, fix=fix)["torch"])
    return int(state["step"])
