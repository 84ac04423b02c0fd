"""Dose-response: delete (or keep only) a growing share of each sample's (token, atom) pairs.

Items: the split's single-target samples. Scored slot: slot 0 under the single-object prompt;
under the multi-object prompt the prompt slot whose unedited mask has the highest IoU with
the target. Pool: the sample's (token, atom) pairs that reach the codebook (|h| >= threshold).

Rankings of the pool, heaviest first:
    provenance    `HeadOutput.provenance.pair_slot_weight` into the scored slot (unedited pass)
    attribution   gradient x activation, d(score)/d(h) * h, with score = the scored slot's heatmap
                  soft IoU with the target; a pair with zero gradient gets zero attribution.
                  Signed: the pairs that support the target most come first
    random        a seeded permutation of the pool
Deletion at p% removes the top ceil(p/100 * pool) pairs; insertion at p% keeps only them
(p = 0: no code at all, the floor of the pathway; deletion at 0% and insertion at 100% are the
unedited head). Removing a pair removes its CSR entry.

Per (setting, ranking, direction, p): gIoU of the final masks over the items (= their mean
IoU, every item having one target) and the scored slot's heatmap soft IoU (a dataset's ignore
pixels left out of both: `segcompass.data.sources.ignore_of`); areas under both
curves (trapezoid over p/100 in [0, 1]: the curve's mean). Settings: e_k present, and (paper
routing only, the concept-routed head does not read e_k) e_k zeroed, rankings recomputed.
Deletion cost at 10%: unedited gIoU - gIoU after deleting the top 10%; its ratio, top ranking
over random, says whether the ranking finds the pairs the masks depend on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from analyses.causal_inputs import inputs_to, select_entries, take_samples
from analyses.causal_pass import SplitPass, final_masks, mask_ious, n_targets, target_union
from segcompass.data.sources import ignore_of
from segcompass.model import HeadInputs

PERCENTS: tuple[float, ...] = (0, 1, 5, 10, 25, 50, 100)
RANKINGS = ("provenance", "attribution", "random")
DIRECTIONS = ("deletion", "insertion")
TINY_COST = 1e-9
"""A random deletion cost below this is no denominator (the masks did not change)."""


def within_sample_rank(scores: np.ndarray, entry_sample: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """(nnz,) rank of each pool entry among its sample's pool entries by descending score (ties: entry
    order); -1 outside the pool."""
    idx = np.flatnonzero(pool)
    order = idx[np.lexsort((-scores[idx], entry_sample[idx]))]  # by sample, then score descending
    sorted_sample = entry_sample[order]
    first = np.searchsorted(sorted_sample, sorted_sample, side="left")  # first sorted position of each sample
    rank = np.full(len(scores), -1, dtype=np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


def dose_keep(rank: np.ndarray, entry_sample: np.ndarray, pool_size: np.ndarray, percent: float,
              direction: str) -> np.ndarray:
    """(nnz,) bool entries kept when `direction` ('deletion' / 'insertion') takes `percent`% of each
    sample's pool (pool_size (B,)) by rank; entries outside the pool (rank -1) are always kept."""
    n_take = np.ceil(percent / 100 * pool_size - 1e-9).astype(np.int64)[entry_sample]  # (nnz,)
    in_pool = rank >= 0
    chosen = in_pool & (rank < n_take)
    if direction == "deletion":
        return ~chosen
    if direction == "insertion":
        return ~in_pool | chosen
    raise ValueError(f"direction must be deletion or insertion, got {direction!r}")


def heatmap_soft_iou(heatmap_logits: Tensor, slot: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """(B,) soft IoU of slot[b]'s heatmap (B, K, m, m) with targets[b] (B, m, m) in [0, 1], each pixel
    weighted by valid[b] (B, m, m) in [0, 1] (1 - ignore) when given."""
    rows = torch.arange(len(slot), device=heatmap_logits.device)
    probs = heatmap_logits[rows, slot.to(heatmap_logits.device)].float().sigmoid().flatten(1)  # (B, m*m)
    t = targets.float().flatten(1)
    if valid is not None:
        weight = valid.float().flatten(1).to(probs.device)  # (B, m, m) -> (B, m*m)
        probs, t = probs * weight, t * weight
    inter = (probs * t).sum(1)
    return inter / (probs.sum(1) + t.sum(1) - inter + 1e-6)


def attribution(model, inputs: HeadInputs, slot: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """(nnz,) gradient x activation of every stored code entry for the scored slot's heatmap soft IoU."""
    values = inputs.codes.values.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model.run_head(inputs._replace(codes=inputs.codes._replace(values=values)))
        score = heatmap_soft_iou(out.heatmap_logits, slot, targets, valid).sum()  # samples are independent
        (grad,) = torch.autograd.grad(score, values, allow_unused=True)
    grad = torch.zeros_like(values) if grad is None else grad
    return (grad * values).detach()


def provenance_scores(out, inputs: HeadInputs, slot: Tensor, threshold: float) -> Tensor:
    """(nnz,) each entry's provenance weight into its sample's scored slot (0 outside the codebook's pairs)."""
    prov = out.provenance
    kept = (inputs.codes.values.abs() >= threshold).nonzero().squeeze(1)  # (P,) CSR position of each pair
    scores = torch.zeros(len(inputs.codes.values), device=kept.device)
    weights = prov.pair_slot_weight  # (P, K)
    pair_slot = slot.to(weights.device)[prov.pair_sample.to(weights.device)]  # (P,)
    scores[kept] = weights[torch.arange(len(kept), device=weights.device), pair_slot].float().to(scores.device)
    return scores


def scored_slots(model, out, samples: list, targets: Tensor) -> Tensor:
    """(B,) slot 0 (single prompt) or the prompt slot whose mask best matches the target (multi prompt)."""
    from segcompass.template import k_for

    slots = []
    for b, sample in enumerate(samples):
        k = min(k_for(sample.multi_prompt), model.head.num_slots)
        pred = out.mask_logits[b, :k] > 0  # (k, m, m)
        target = targets[b] > 0.5
        ious = (pred & target).flatten(1).sum(1) / (pred | target).flatten(1).sum(1).clamp(min=1)
        slots.append(int(ious.argmax()))
    return torch.tensor(slots, device=out.mask_logits.device)


class ChunkContext(NamedTuple):
    inputs: HeadInputs
    samples: list
    targets: Tensor
    """(B, m, m) float target in the head's mask frame."""
    slot: Tensor
    """(B,) scored slot."""
    valid: Tensor | None = None
    """(B, m, m) float weight of each pixel of the frame, 1 - ignore (None: nothing ignored)."""


def _rankings(model, ctx: ChunkContext, seed: int) -> dict[str, np.ndarray]:
    """(nnz,) score per entry for each ranking, on this setting's inputs."""
    with torch.no_grad():
        out = model.run_head(ctx.inputs)
    nnz = len(ctx.inputs.codes.values)
    rng = np.random.default_rng(seed)
    return {"provenance": provenance_scores(out, ctx.inputs, ctx.slot, model.head.codebook.threshold).cpu().numpy(),
            "attribution": attribution(model, ctx.inputs, ctx.slot, ctx.targets, ctx.valid).cpu().numpy(),
            "random": rng.random(nnz)}


@torch.no_grad()
def _score(model, ctx: ChunkContext, keep: np.ndarray, conf_threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(B,) final-mask IoU and scored-slot heatmap soft IoU with the codes reduced to `keep`."""
    codes = select_entries(ctx.inputs.codes, torch.as_tensor(keep, device=ctx.inputs.codes.indices.device))
    out = model.run_head(ctx.inputs._replace(codes=codes))
    masks = final_masks(model, out, ctx.samples, conf_threshold)
    ious = mask_ious(masks, [target_union(s) for s in ctx.samples], [ignore_of(s) for s in ctx.samples])
    return ious, heatmap_soft_iou(out.heatmap_logits, ctx.slot, ctx.targets, ctx.valid).cpu().numpy()


def chunk_curves(model, ctx: ChunkContext, *, seed: int, percents=PERCENTS, conf_threshold: float = 0.5
                 ) -> dict[tuple[str, str, float], tuple[np.ndarray, np.ndarray]]:
    """(ranking, direction, percent) -> ((B,) IoU, (B,) soft IoU) for one batch of items."""
    codes = ctx.inputs.codes
    entry_sample = ctx.inputs.token_sample_index[codes.row_ids()].cpu().numpy()  # (nnz,)
    pool = (codes.values.abs() >= model.head.codebook.threshold).cpu().numpy()
    pool_size = np.bincount(entry_sample[pool], minlength=len(ctx.samples))  # (B,)
    out = {}
    for ranking, scores in _rankings(model, ctx, seed).items():
        rank = within_sample_rank(scores, entry_sample, pool)
        for direction in DIRECTIONS:
            for percent in percents:
                keep = dose_keep(rank, entry_sample, pool_size, percent, direction)
                out[ranking, direction, percent] = _score(model, ctx, keep, conf_threshold)
    return out


def settings_for(model) -> tuple[str, ...]:
    """'e_present' always; 'e_zeroed' for the paper routing (the concept-routed head does not read e_k)."""
    return ("e_present",) if model.head.concept_routed else ("e_present", "e_zeroed")


def ignore_weights(samples: list, *, input_size: int, size: int, device) -> Tensor | None:
    """(B, m, m) 1 - each sample's ignore mask in the head's frame (area-resized, so soft at borders), or
    None when no sample has ignore pixels (world samples never do)."""
    from segcompass.postprocess import targets_to_frame

    if all(ignore_of(s) is None for s in samples):
        return None
    ignores = [ignore_of(s) if ignore_of(s) is not None else np.zeros(s.image.shape[:2], bool) for s in samples]
    frames = [targets_to_frame(torch.from_numpy(i[None]), input_size=input_size, out_size=size)[0] for i in ignores]
    return (1 - torch.stack(frames)).to(device)  # (B, m, m)


def dose_response(model, sp: SplitPass, *, percents=PERCENTS, seed: int = 0, batch_size: int = 16,
                  conf_threshold: float = 0.5, progress: bool = False) -> pd.DataFrame:
    """Long table: setting, ranking, direction, percent, giou, soft_iou, n_items (module docstring)."""
    from tqdm.auto import tqdm

    from segcompass.postprocess import targets_to_frame

    items = [i for i, s in enumerate(sp.samples) if n_targets(s) == 1]
    device = next(model.head.parameters()).device
    sums: dict = defaultdict(lambda: [[], []])
    for start in tqdm(range(0, len(items), batch_size), desc=f"dose {sp.split}", disable=not progress):
        index = items[start:start + batch_size]
        samples = [sp.samples[i] for i in index]
        inputs = inputs_to(take_samples(sp.inputs, index), device)
        size = int(model.head.slot_mapper.upsample * inputs.image_embeddings.shape[-1])  # m = 4w
        targets = torch.stack([targets_to_frame(torch.from_numpy(target_union(s)[None]), input_size=model.sam_input_size,
                                                out_size=size)[0] for s in samples]).to(device)  # (B, m, m)
        valid = ignore_weights(samples, input_size=model.sam_input_size, size=size, device=device)
        with torch.no_grad():
            slot = scored_slots(model, model.run_head(inputs), samples, targets)
        for setting in settings_for(model):
            edited = inputs if setting == "e_present" else inputs._replace(
                slot_embeddings=torch.zeros_like(inputs.slot_embeddings))
            curves = chunk_curves(model, ChunkContext(edited, samples, targets, slot, valid), seed=seed + start,
                                  percents=percents, conf_threshold=conf_threshold)
            for (ranking, direction, percent), (iou, soft) in curves.items():
                sums[setting, ranking, direction, percent][0].append(iou)
                sums[setting, ranking, direction, percent][1].append(soft)
    rows = [{"setting": s, "ranking": r, "direction": d, "percent": p, "giou": float(np.concatenate(v[0]).mean()),
             "soft_iou": float(np.concatenate(v[1]).mean()), "n_items": len(items)}
            for (s, r, d, p), v in sums.items()]
    return pd.DataFrame.from_records(rows, columns=["setting", "ranking", "direction", "percent", "giou", "soft_iou",
                                                    "n_items"])


def curve_area(percents, values) -> float:
    """Trapezoid area under value(p/100) over [first, last] p, divided by the range (the curve's mean)."""
    x = np.asarray(percents, dtype=np.float64) / 100
    return float(np.trapezoid(np.asarray(values, dtype=np.float64), x) / (x[-1] - x[0]))


def _ratio(top: float, random: float) -> float:
    if random > TINY_COST:
        return top / random
    return math.inf if top > TINY_COST else math.nan


def _curve(part: pd.DataFrame, ranking: str, direction: str) -> pd.DataFrame:
    """One curve's rows of a setting's table, by increasing percent."""
    return part[(part.ranking == ranking) & (part.direction == direction)].sort_values("percent")


def _setting_summary(part: pd.DataFrame, at: float) -> dict:
    """One setting: floor, unedited, curves with areas, deletion costs at `at`% and ratios to random."""
    floor = _curve(part, "random", "insertion").iloc[0]  # 0%: no code at all
    full = _curve(part, "random", "deletion").iloc[0]  # 0%: unedited
    entry = {"floor_insertion_0": {"giou": floor.giou, "soft_iou": floor.soft_iou},
             "unedited": {"giou": full.giou, "soft_iou": full.soft_iou}, "curves": {}}
    costs = {}
    for ranking in RANKINGS:
        entry["curves"][ranking] = {}
        for direction in DIRECTIONS:
            c = _curve(part, ranking, direction)
            entry["curves"][ranking][direction] = {
                "giou": c.giou.tolist(), "soft_iou": c.soft_iou.tolist(),
                "area_giou": curve_area(c.percent, c.giou), "area_soft_iou": curve_area(c.percent, c.soft_iou)}
        deletion = _curve(part, ranking, "deletion")
        at_p = deletion[deletion.percent == at]
        costs[ranking] = float(full.giou - at_p.giou.iloc[0]) if len(at_p) else math.nan
    entry[f"deletion_cost_{at:g}"] = costs
    entry[f"ratio_top{at:g}_vs_random{at:g}"] = {r: _ratio(costs[r], costs["random"]) for r in ("provenance", "attribution")}
    return entry


def dose_summary(table: pd.DataFrame, at: float = 10) -> dict:
    """Per setting: the floor (insertion at 0%) first, then curves with areas, deletion costs at `at`%
    and their ratios to random's (`ratio_top10_vs_random10` for the default `at`)."""
    if table.empty:
        return {"n_items": 0, "skipped": "no single-target sample"}
    return {"n_items": int(table.n_items.iloc[0]), "percents": sorted(table.percent.unique().tolist()),
            "settings": {setting: _setting_summary(part, at) for setting, part in table.groupby("setting", sort=False)}}
