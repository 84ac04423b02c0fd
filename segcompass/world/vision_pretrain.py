"""Stage 0 of the warm start: the tiny vision tower learns to see the world before the LLM reads it.

LLaVA-1.5 starts from a CLIP vision tower pretrained on 400M image-text pairs; the tiny
twin starts from random weights. Trained only through the language loss, its image tokens
stay blurry and the chain of thought names the wrong object (docs/results.md, "Stage 0").
So, as the CLIP analogue, the vision tower is first trained alone to classify, for every
patch, the colour, shape and size of the object covering it (or background), and the
patch's own row and column, with one linear head per field on the features LLaVA reads
(penultimate layer, CLS dropped).

Why row and column: the LLM sees image tokens as a 1-D sequence, so where a patch lies
must be in its features. Trained on content alone, the tower's learned position embeddings
wash out, and the policy cannot say where an object is nor resolve spatial references.

This is fast: a few dozen tokens through a small ViT and no LLM. The heads are training
machinery and are discarded; the tower is then frozen (or slowed) while the LLM learns to
read it.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from segcompass.world.prefetch import step_batches

FIELDS: tuple[str, ...] = ("colour", "shape", "size")
"""What each patch is classified into (each with a background class 0); `word_probe.PROBE_FIELDS[:3]`."""
POSITION_FIELDS: tuple[str, ...] = ("row", "column")
"""Where each patch lies on the grid (0..grid-1), foreground and background alike."""
CENTRE_FIELDS: tuple[str, ...] = ("centre_row", "centre_column")
"""Where the centre of the object covering a patch lies on the grid (foreground patches only):
every patch of an object then carries the object's own position, which relations and the
chain of thought's 'is at top left' are judged on (`word_probe.centre_cells`)."""


class VisionPretrainResult(NamedTuple):
    """Held-out accuracy of the patch heads after stage 0."""

    accuracy: dict[str, float]
    """Field -> accuracy over foreground patches of the held-out batch."""
    steps: int
    """Optimizer steps run."""


def vision_features(vision_tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, P, D): what LLaVA's projector reads (layer -2, CLS dropped)."""
    hidden = vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2]  # (B, 1 + P, D)
    return hidden[:, 1:]


def build_patch_heads(width: int) -> nn.ModuleList:
    """One linear classifier per field in FIELDS, background included."""
    from segcompass.world.render import COLOURS, SHAPES, SIZES

    return nn.ModuleList([nn.Linear(width, 1 + len(names)) for names in (COLOURS, SHAPES, SIZES)])


def build_position_heads(width: int, grid: int) -> nn.ModuleList:
    """One linear classifier per field in POSITION_FIELDS, `grid` classes each."""
    return nn.ModuleList([nn.Linear(width, grid) for _ in POSITION_FIELDS])


def position_targets(grid: int) -> torch.Tensor:
    """(2, grid*grid) int64 row and column of each patch in raster (row-major) order."""
    index = torch.arange(grid * grid)
    return torch.stack([index // grid, index % grid])


def position_loss(heads: nn.ModuleList, features: torch.Tensor, grid: int) -> torch.Tensor:
    """Mean cross-entropy over POSITION_FIELDS: features (B, P, D) with P = grid²."""
    targets = position_targets(grid).to(features.device)  # (2, P)
    batch = features.shape[0]
    losses = [nn.functional.cross_entropy(head(features).flatten(0, 1), targets[i].repeat(batch))
              for i, head in enumerate(heads)]
    return torch.stack(losses).mean()


class PatchBatch(NamedTuple):
    """Stage-0 inputs and per-patch labels of world samples."""

    pixels: torch.Tensor
    """(B, 3, H, W) pixel_values."""
    labels: torch.Tensor
    """(B, 3, P) int64 FIELDS labels, P = grid², 0 = background."""
    centres: torch.Tensor
    """(B, 2, P) int64 CENTRE_FIELDS labels, -1 on background (ignored)."""


def patch_batch(image_processor, samples, grid: int) -> PatchBatch:
    """Pixels and per-patch labels of world samples."""
    from segcompass.world.render import patch_objects
    from segcompass.world.probes import centre_cells, patch_targets

    pixels = image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    owners = [patch_objects(s.labels, grid) for s in samples]  # the costly part, once per sample
    labels = np.stack([patch_targets(s, grid, object_position=False, owner=o)[:len(FIELDS)]
                       for s, o in zip(samples, owners)])  # (B, 3, G, G)
    centres = np.stack([centre_cells(s, grid, owner=o) for s, o in zip(samples, owners)])  # (B, 2, G, G)
    return PatchBatch(pixels, torch.from_numpy(labels).flatten(2), torch.from_numpy(centres).flatten(2))


def patch_loss(heads: nn.ModuleList, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over fields: features (B, P, D), labels (B, F, P); label -1 is ignored."""
    losses = [nn.functional.cross_entropy(head(features).flatten(0, 1), labels[:, i].flatten(), ignore_index=-1)
              for i, head in enumerate(heads)]
    return torch.stack(losses).mean()


@torch.no_grad()
def patch_accuracy(vision_tower, heads, pixels: torch.Tensor, labels: torch.Tensor,
                   position_heads: nn.ModuleList | None = None, grid: int = 0,
                   centre_heads: nn.ModuleList | None = None, centres: torch.Tensor | None = None) -> dict[str, float]:
    """Field -> accuracy: FIELDS (and CENTRE_FIELDS, when `centre_heads` and `centres` are
    given) over patches whose object label is not background, POSITION_FIELDS (when
    `position_heads` are given) over every patch."""
    features = vision_features(vision_tower, pixels)
    foreground = labels[:, 0] > 0  # (B, P)
    accuracy = {field: round(float((head(features).argmax(-1) == labels[:, i])[foreground].float().mean()), 4)
                for i, (field, head) in enumerate(zip(FIELDS, heads))}
    if centre_heads is not None:
        accuracy.update({field: round(float((head(features).argmax(-1) == centres[:, i])[foreground].float().mean()), 4)
                         for i, (field, head) in enumerate(zip(CENTRE_FIELDS, centre_heads))})
    if position_heads is not None:
        targets = position_targets(grid).to(features.device)  # (2, P)
        accuracy.update({field: round(float((head(features).argmax(-1) == targets[i]).float().mean()), 4)
                         for i, (field, head) in enumerate(zip(POSITION_FIELDS, position_heads))})
    return accuracy


def _step_batch(image_processor, batch_size: int, grid: int, seed: int, step: int) -> PatchBatch:
    """Batch `step`: world `train` samples step*batch .. (step+1)*batch - 1."""
    from segcompass.world.scenes import make_sample

    return patch_batch(image_processor, [make_sample("train", step * batch_size + i, seed)
                                         for i in range(batch_size)], grid)


def pretrain_vision_tower(loaded, *, steps: int, batch_size: int, lr: float, grid: int, seed: int,
                          device: torch.device, progress: bool = True, position_weight: float = 1.0,
                          centre_weight: float = 0.0, data_workers: int = 0) -> VisionPretrainResult:
    """Train `loaded.model`'s vision tower in place on per-patch colour/shape/size labels
    plus `position_weight` x the patch row/column loss (0 = content only) plus `centre_weight`
    x the loss of CENTRE_FIELDS (0 = off).

    Batch s holds world `train` samples s*batch .. (s+1)*batch - 1; accuracy is measured on
    256 `val` samples. Seeded: the heads from `seed`, the data from the world seed `seed`.
    `data_workers` > 0 builds batches ahead in that many processes (same batches).
    """
    from tqdm.auto import tqdm

    from segcompass.world.scenes import make_sample

    tower = loaded.model.model.vision_tower
    width = tower.config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = build_patch_heads(width).to(device)
        position_heads = build_position_heads(width, grid).to(device) if position_weight else None
        centre_heads = build_position_heads(width, grid).to(device) if centre_weight else None
    params = [*tower.parameters(), *heads.parameters(), *(position_heads.parameters() if position_heads else ()),
              *(centre_heads.parameters() if centre_heads else ())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    tower.train()
    bar = tqdm(range(steps), desc="vision tower", disable=not progress)
    build = functools.partial(_step_batch, loaded.image_processor, batch_size, grid, seed)
    for step, batch in zip(bar, step_batches(build, 0, steps, data_workers)):
        features = vision_features(tower, batch.pixels.to(device))  # (B, P, D)
        loss = patch_loss(heads, features, batch.labels.to(device))
        if position_heads is not None:
            loss = loss + position_weight * position_loss(position_heads, features, grid)
        if centre_heads is not None:
            loss = loss + centre_weight * patch_loss(centre_heads, features, batch.centres.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    optimizer.zero_grad(set_to_none=True)  # no stale gradients left on the tower for a later stage
    tower.eval()
    held_out = patch_batch(loaded.image_processor, [make_sample("val", i, seed) for i in range(256)], grid)
    accuracy = patch_accuracy(tower, heads, held_out.pixels.to(device), held_out.labels.to(device), position_heads,
                              grid, centre_heads, held_out.centres.to(device))
    return VisionPretrainResult(accuracy, steps)
