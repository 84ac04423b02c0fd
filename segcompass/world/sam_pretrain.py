"""Pretraining of the world's small SAM: the embedded default's stand-in for SAM ViT-H weights.

The paper uses SAM ViT-H frozen, a promptable segmenter trained on SA-1B: given a dense
mask prompt it returns the instance under it. A from-scratch `sam-tiny-*` trained only
through SegCompass's loss never learns that (measured: the decoder ignored the heatmap
prompt and gave every slot the same mask). So, like SA-1B pretraining, `sam-tiny-*` is
first trained on the world's instance masks, alone:

- prompt: each instance's mask made coarse like a slot-mapper heatmap (area-pooled to the
  embedding grid, bilinearly upsampled to the prompt size, mapped to logits at a random
  sharpness, plus noise), sometimes shifted by a cell, so the decoder learns to turn a
  rough blob into the exact instance;
- target: the visible instance mask (BCE + Dice), every object of the image a prompt;
- identity: a linear head per patch of the image embedding classifies the colour, shape
  and size of the object there, so the embedding keeps what the slot mapper's queries
  ("the red triangle") must match; training machinery, not saved.

The result is a `facebook/sam-vit-*`-layout folder that `segcompass train --sam-path`
loads like the real ones (frozen encoder, trainable decoder).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saekit.atomic import (atomic_directory, atomic_write_json, load_optimizer_state, optimizer_state_tensors,
                           resolve_directory)
from saekit.errors import UserError
from saekit.run import RunConfig, apply_threads, check_resume, config_record, free_on_resume

SAM_DIR, CHECKPOINT_DIR, REPORT_FILE = "sam", "checkpoint", "pretrain.json"


@dataclass(frozen=True, kw_only=True)
class SamPretrainConfig(RunConfig):
    """Promptable-segmentation pretraining of a world SAM preset on the embedded world."""

    out: Path = free_on_resume(Path("runs/sam"))
    """Output folder: sam/ (HF folder), checkpoint/, pretrain.json."""
    preset: str = "sam-tiny-16"
    """SAM preset to build and train (a world preset: sam-tiny-16 or sam-tiny-32)."""
    steps: int = 800
    """Optimizer steps."""
    batch_size: int = 16
    """Images per step; each contributes `prompts_per_image` prompts."""
    prompts_per_image: int = 2
    """Instances prompted per image (objects cycled when an image has fewer)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, one-cycle)."""
    identity_weight: float = 0.5
    """Weight of the per-patch colour/shape/size loss on the image embedding."""
    shift_probability: float = 0.3
    """Probability that a prompt is shifted by one embedding cell (heatmaps are imprecise)."""
    eval_samples: int = free_on_resume(200)
    """`val` images scored at the end (IoU of the mask from each instance's coarse prompt)."""
    checkpoint_every: int = free_on_resume(200)
    """Resumable checkpoint every this many steps (and at the end)."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "prompts_per_image", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"sam-pretrain: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.identity_weight < 0 or not 0 <= self.shift_probability <= 1:
            raise UserError("sam-pretrain: need --lr > 0, --identity-weight >= 0, 0 <= --shift-probability <= 1")


class PromptBatch(NamedTuple):
    """One step's inputs and targets."""

    pixel_values: Tensor
    """(B, 3, S, S) SAM input."""
    prompts: Tensor
    """(B, K, 4h, 4w) dense prompt logits."""
    targets: Tensor
    """(B, K, 4h, 4w) instance masks in [0, 1] at the decoder's output size."""
    identity: Tensor
    """(B, 3, h*w) int64 colour/shape/size class per embedding cell (0 = background)."""


def coarse_prompt(masks: Tensor, grid: int, generator: torch.Generator, shift_probability: float) -> Tensor:
    """(N, 4g, 4g) masks in [0, 1] -> (N, 4g, 4g) heatmap-like prompt logits.

    Area-pooled to the (g, g) embedding grid, maybe rolled by one cell, upsampled back,
    then logits = sharpness * (2p - 1) + noise, sharpness ~ U(2, 10), noise ~ N(0, 0.5).
    """
    side = masks.shape[-1]
    coarse = F.adaptive_avg_pool2d(masks[:, None], grid)  # (N, 1, g, g)
    shifted = torch.rand(len(masks), generator=generator) < shift_probability
    for i in shifted.nonzero().flatten().tolist():
        dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
        coarse[i] = coarse[i].roll((dy, dx), dims=(-2, -1))
    up = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)[:, 0]  # (N, 4g, 4g)
    sharpness = 2 + 8 * torch.rand(len(masks), 1, 1, generator=generator)
    return sharpness * (2 * up - 1) + 0.5 * torch.randn(up.shape, generator=generator)


def instance_masks(sample) -> Tensor:
    """(N, H, W) float visible mask of every object of a world sample."""
    labels = torch.from_numpy(sample.labels.astype(np.int64))
    return torch.stack([(labels == i).float() for i in range(len(sample.objects))])


def prompt_batch(samples, cfg: SamPretrainConfig, sam_cfg, generator: torch.Generator) -> PromptBatch:
    """Every image with `prompts_per_image` of its instances (cycled), prompts and targets."""
    from segcompass.postprocess import targets_to_frame
    from segcompass.sam import preprocess_images
    from segcompass.world.probes import patch_targets

    size = sam_cfg.vision_config.image_size
    grid = size // sam_cfg.vision_config.patch_size
    prompts, targets = [], []
    for sample in samples:
        masks = targets_to_frame(instance_masks(sample), input_size=size, out_size=4 * grid)  # (N, 4g, 4g)
        order = torch.randperm(len(masks), generator=generator)
        chosen = masks[order.repeat(cfg.prompts_per_image)[:cfg.prompts_per_image]]  # (K, 4g, 4g)
        targets.append(chosen)
        prompts.append(coarse_prompt(chosen, grid, generator, cfg.shift_probability))
    identity = np.stack([patch_targets(s, grid, object_position=False)[:3] for s in samples])  # (B, 3, g, g)
    return PromptBatch(preprocess_images([s.image for s in samples], size).pixel_values, torch.stack(prompts),
                       torch.stack(targets), torch.from_numpy(identity).flatten(2))


class PretrainModules(NamedTuple):
    sam: nn.Module
    decoder: nn.Module
    """`segcompass.modeling.mask_decoder.SlotMaskDecoder` sharing `sam`'s weights."""
    identity_heads: nn.ModuleList
    """Linear colour / shape / size classifiers on the image embedding (discarded after training)."""


def build_modules(cfg: SamPretrainConfig) -> PretrainModules:
    from segcompass.build import build_mask_decoder
    from segcompass.sam import build_sam
    from segcompass.world.vision_pretrain import build_patch_heads

    sam = build_sam(cfg.preset, seed=cfg.seed)
    return PretrainModules(sam, build_mask_decoder(sam), build_patch_heads(sam.config.vision_config.output_channels))


class PretrainLosses(NamedTuple):
    total: Tensor
    mask_bce: Tensor
    mask_dice: Tensor
    identity: Tensor


def pretrain_losses(modules: PretrainModules, batch: PromptBatch, identity_weight: float) -> PretrainLosses:
    """Mask BCE + Dice over every prompt, and the identity cross-entropy over every cell."""
    from segcompass.training.losses import dice_loss
    from segcompass.world.vision_pretrain import patch_loss

    embedding = modules.sam.vision_encoder(batch.pixel_values).last_hidden_state  # (B, C, g, g)
    logits = modules.decoder(batch.prompts, embedding).mask_logits  # (B, K, 4g, 4g)
    bce = F.binary_cross_entropy_with_logits(logits, batch.targets)
    dice = dice_loss(logits.flatten(0, 1), batch.targets.flatten(0, 1)).mean()
    cells = embedding.flatten(2).transpose(1, 2)  # (B, C, g, g) -> (B, g*g, C)
    identity = patch_loss(modules.identity_heads, cells, batch.identity)
    return PretrainLosses(bce + dice + identity_weight * identity, bce, dice, identity)


def pretrain_sam(cfg: SamPretrainConfig, *, progress: bool = True, stop_after: int | None = None) -> Path:
    """Train (or resume) and save `out/sam`; returns that folder. `stop_after`: stop early
    after that many total steps, checkpoint only (for testing resume)."""
    from tqdm.auto import tqdm

    from saekit.models import resolve_device
    from segcompass.world.scenes import make_sample

    apply_threads(cfg.threads)
    device, out = resolve_device(cfg.device), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    modules = build_modules(cfg)
    trainable = nn.ModuleList([modules.sam, modules.identity_heads]).to(device).train()
    optimizer = torch.optim.AdamW(trainable.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(cfg.seed)
    step = _restore(out / CHECKPOINT_DIR, cfg, trainable, optimizer, schedule, generator) if cfg.resume else 0
    end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
    start = time.perf_counter()
    bar = tqdm(range(step, end), initial=step, total=cfg.steps, desc="sam pretrain", disable=not progress)
    for step in bar:
        samples = [make_sample("train", step * cfg.batch_size + i, cfg.seed) for i in range(cfg.batch_size)]
        batch = prompt_batch(samples, cfg, modules.sam.config, generator)
        losses = pretrain_losses(modules, PromptBatch(*(t.to(device) for t in batch)), cfg.identity_weight)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(bce=f"{losses.mask_bce.item():.3f}", dice=f"{losses.mask_dice.item():.3f}",
                        ident=f"{losses.identity.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            _save(out / CHECKPOINT_DIR, cfg, trainable, optimizer, schedule, generator, step + 1)
    if end < cfg.steps:
        return out / SAM_DIR
    modules.sam.eval()
    with atomic_directory(out / SAM_DIR) as tmp:
        modules.sam.save_pretrained(tmp, safe_serialization=True)
    report = {"train_wall_s": round(time.perf_counter() - start, 1), "steps": cfg.steps,
              "val": prompted_iou(modules, cfg, device) if cfg.eval_samples else {}}
    atomic_write_json(out / REPORT_FILE, report)
    return out / SAM_DIR


@torch.no_grad()
def prompted_iou(modules: PretrainModules, cfg: SamPretrainConfig, device) -> dict[str, float]:
    """Mean IoU of the decoder's mask (threshold 0) against each `val` instance under its
    coarse prompt (unshifted), and the identity heads' foreground accuracy."""
    from segcompass.world.scenes import make_sample
    from segcompass.world.vision_pretrain import FIELDS

    generator = torch.Generator().manual_seed(cfg.seed + 1)
    eval_cfg = dataclasses.replace(cfg, shift_probability=0.0)
    ious, hits = [], {f: [] for f in FIELDS}
    for first in range(0, cfg.eval_samples, cfg.batch_size):
        samples = [make_sample("val", i, cfg.seed) for i in range(first, min(first + cfg.batch_size, cfg.eval_samples))]
        batch = PromptBatch(*(t.to(device) for t in prompt_batch(samples, eval_cfg, modules.sam.config, generator)))
        embedding = modules.sam.vision_encoder(batch.pixel_values).last_hidden_state
        predicted = modules.decoder(batch.prompts, embedding).mask_logits > 0
        truth = batch.targets > 0.5
        ious += ((predicted & truth).sum((-2, -1)) / (predicted | truth).sum((-2, -1)).clamp(min=1)).flatten().tolist()
        cells = embedding.flatten(2).transpose(1, 2)
        foreground = batch.identity[:, 0] > 0
        for i, (field, head) in enumerate(zip(FIELDS, modules.identity_heads)):
            hits[field] += (head(cells).argmax(-1) == batch.identity[:, i])[foreground].tolist()
    return {"mask_iou": round(float(np.mean(ious)), 4),
            **{f"identity_{f}_accuracy": round(float(np.mean(v)), 4) for f, v in hits.items()}}


# ----------------------------------------------------------------------------- checkpoints

def _save(directory: Path, cfg, modules: nn.Module, optimizer, schedule, generator, step: int) -> None:
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().clone() for k, v in modules.state_dict().items()}, tmp / "model.safetensors")
        tensors, groups = optimizer_state_tensors(optimizer)
        save_file(tensors, tmp / "optimizer.safetensors")
        save_file({"torch": torch.get_rng_state(), "prompts": generator.get_state()}, tmp / "rng.safetensors")
        atomic_write_json(tmp / "state.json", {"step": step, "param_groups": groups, "config": config_record(cfg),
                                               "scheduler": schedule.state_dict()})


def _restore(directory: Path, cfg, modules: nn.Module, optimizer, schedule, generator) -> int:
    from saekit.integrity import load_safetensors, read_json_object

    found = resolve_directory(directory, "state.json")
    if found is None:
        return 0
    fix = f"delete {found} to start again, or use --no-resume"
    state = read_json_object(found / "state.json", fields={
        "step": int, "config": dict, "param_groups": list, "scheduler": dict}, fix=fix)
    check_resume(state["config"], cfg, f"sam-pretrain: {found}")
    device = next(modules.parameters()).device
    weights = load_safetensors(found / "model.safetensors", fix=fix)
    modules.load_state_dict({k: v.to(device) for k, v in weights.items()})
    load_optimizer_state(optimizer, load_safetensors(found / "optimizer.safetensors", fix=fix),
                         state["param_groups"], device)
    schedule.load_state_dict(state["scheduler"])
    rng = load_safetensors(found / "rng.safetensors", fix=fix)
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["prompts"])
    return int(state["step"])
