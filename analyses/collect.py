"""Run a SegCompass checkpoint over world samples and keep everything the analyses read.

One no-grad SegCompass pass per batch (prompt + response; teacher-forced ground-truth
chains of thought by default, greedy generations on request) gives, for every SAE token
of every sample:
  - its SAE code twice: `codes` with every active atom (h > 0, for Figures 4 and 5 and
    concept naming, which sweep their own thresholds) and `head_codes` with only the atoms
    that pass the codebook's threshold (exactly what the head saw: faithfulness, naming
    coverage);
  - its token type, (row, col) on the policy's image-token grid, sample and text;
and per sample: the targets in the policy's image frame (the region its patch grid covers)
and in the head's mask frame, the head's heatmap / mask probabilities and confidences,
each slot's provenance ranking of atoms, and the slot and image embeddings that let the
head be re-run on edited codes (`analyses.faithfulness.slot_mask_evaluator`).

SAE tokens are ordered sample by sample (`segcompass.policy.slot_inputs` flattens in
(sample, position) order), so the tokens of sample b are rows
`token_range[b, 0]:token_range[b, 1]` of both code tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saekit.inputs import TokenType
from saekit.sae.encode import encode_sparse
from saekit.sparse import SparseCodes

DEFAULT_RANK_DEPTH = 20
"""Atoms kept per slot in the provenance ranking (the longest deletion sweep needs this many)."""


class SlotRanking(NamedTuple):
    """One slot's atoms by summed provenance weight, heaviest first."""

    atoms: np.ndarray
    """(k,) int64 atom indices."""
    weights: np.ndarray
    """(k,) float32 summed pair weights into the slot."""


class Collected(NamedTuple):
    """A checkpoint's outputs on B samples (N SAE tokens, K slots, m x m head mask frame)."""

    samples: list
    """The B `segcompass.world.scenes.WorldSample`s, in order."""
    responses: list[str]
    """The response each forward pass read (ground truth CoT + K tokens, or greedy)."""
    teacher_forced: bool
    """True when `responses` are the ground-truth ones."""
    codes: SparseCodes
    """All N SAE tokens, every atom with h > 0."""
    head_codes: SparseCodes
    """All N SAE tokens, atoms with h > `threshold` only (the codebook's input)."""
    threshold: float
    """The head's codebook threshold."""
    token_types: np.ndarray
    """(N,) int8 `saekit.inputs.TokenType` of each SAE token."""
    image_grid: np.ndarray
    """(N, 2) int64 (row, col) of image tokens on the policy's grid; -1 elsewhere."""
    token_sample_index: np.ndarray
    """(N,) int64 sample (index into `samples`) of each SAE token."""
    token_strings: list[str]
    """(N,) each token as the tokenizer spells it (`convert_ids_to_tokens`)."""
    token_range: np.ndarray
    """(B, 2) int64 [start, stop) rows of each sample's tokens."""
    grid_shapes: list[tuple[int, int]]
    """(rows, cols) of each sample's image-token grid."""
    grid_regions: list[tuple[int, int, int, int]]
    """(top, left, height, width) of the image region each grid covers (LLaVA centre-crops)."""
    image_masks: list[np.ndarray]
    """Per sample (n_b, height, width) bool targets cropped to its grid region (the policy's frame)."""
    scene_masks: list[list[np.ndarray]]
    """Per sample, every object's visible (height, width) bool mask in the same frame."""
    model_masks: list[np.ndarray]
    """Per sample (n_b, m, m) float32 targets in the head's mask frame (SAM's padded square)."""
    heatmap_probs: np.ndarray
    """(B, K, m, m) float32 sigmoid of the slot heatmaps, resampled to the mask frame if needed."""
    mask_probs: np.ndarray
    """(B, K, m, m) float32 sigmoid of the slot masks."""
    confidences: np.ndarray
    """(B, K) float32 sigmoid of the slot confidences."""
    slots_written: np.ndarray
    """(B,) int64 concentration tokens present in each response (capped at K)."""
    provenance: list[list[SlotRanking]]
    """[b][k] slot k's provenance ranking in sample b."""
    slot_embeddings: Tensor
    """(B, K, d_llm) float32 slot embeddings e_k (CPU)."""
    image_embeddings: Tensor
    """(B, C, h, w) float32 SAM image embeddings (CPU)."""
    policy_image: Tensor | None
    """(B, g*g, d_llm) float32 image-token states the slot mapper keys on (CPU), or None."""

    @property
    def num_slots(self) -> int:
        return self.mask_probs.shape[1]

    def sample_codes(self, sample: int, *, head: bool = True) -> SparseCodes:
        """The codes of one sample's tokens (`head_codes` by default)."""
        start, stop = self.token_range[sample]
        return slice_rows(self.head_codes if head else self.codes, int(start), int(stop))


def slice_rows(codes: SparseCodes, start: int, stop: int) -> SparseCodes:
    """Rows start..stop-1 of CSR codes as codes of their own."""
    lo, hi = int(codes.offsets[start]), int(codes.offsets[stop])
    return SparseCodes(codes.indices[lo:hi], codes.values[lo:hi], codes.offsets[start:stop + 1] - lo, codes.d_sae)


def concat_codes(parts: Sequence[SparseCodes], d_sae: int) -> SparseCodes:
    """The rows of several CSR code tables, one after the other."""
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for part in parts:
        offsets.append(part.offsets[1:].cpu() + base)
        base += int(part.offsets[-1])
    indices = [p.indices.cpu() for p in parts] or [torch.zeros(0, dtype=torch.int64)]
    values = [p.values.detach().float().cpu() for p in parts] or [torch.zeros(0)]
    return SparseCodes(torch.cat(indices), torch.cat(values), torch.cat(offsets), d_sae)


def policy_frame(mask: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """(..., H, W) mask -> (..., height, width): the part of the image the policy's grid covers."""
    top, left, height, width = region
    return mask[..., top:top + height, left:left + width]


def _grid_shape(image_grid: Tensor, token_types: Tensor) -> tuple[int, int]:
    """(rows, cols) of one sample's grid from its image tokens' (row, col) (LLaVA's CLS is (-1, -1))."""
    cells = image_grid[token_types == int(TokenType.IMAGE)]  # (n_image, 2)
    return int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1


class _BatchPart(NamedTuple):
    codes: SparseCodes
    head_codes: SparseCodes
    token_types: Tensor
    image_grid: Tensor
    token_sample_index: Tensor
    token_strings: list[str]
    grid_shapes: list[tuple[int, int]]
    heatmap_probs: Tensor
    mask_probs: Tensor
    confidences: Tensor
    slots_written: Tensor
    provenance: list[list[SlotRanking]]
    slot_embeddings: Tensor
    image_embeddings: Tensor
    policy_image: Tensor | None
    model_masks: list[np.ndarray]


@torch.no_grad()
def _run_batch(model, samples: list, responses: list[str], rank_depth: int) -> _BatchPart:
    """One SegCompass pass over a batch; everything moved to the CPU."""
    from segcompass.training.batching import batch_from_samples
    from segcompass.postprocess import targets_to_frame

    seg = batch_from_samples(model, samples, responses)
    embeddings = model.image_embeddings(seg.images)
    out = model(seg.model_batch, embeddings)
    slots, head = out.slots, out.head
    full = encode_sparse(model.sae, slots.sae_tokens.to(model.sae.W_enc.dtype), threshold=0.0)
    sample, position = slots.token_sample_index.cpu(), slots.token_position.cpu()  # (N_batch,)
    types, grid = seg.model_batch.token_types, seg.model_batch.image_grid  # (B, T), (B, T, 2)
    ids = seg.model_batch.model_inputs["input_ids"][sample, position].tolist()
    mask_size = tuple(head.mask_logits.shape[-2:])
    heat = head.heatmap_logits.float()
    if tuple(heat.shape[-2:]) != mask_size:  # (B, K, h', w') -> (B, K, m, m)
        heat = F.interpolate(heat, size=mask_size, mode="bilinear", align_corners=False)
    provenance = [[SlotRanking(top.atoms.cpu().numpy().astype(np.int64), top.weights.float().cpu().numpy())
                   for top in (head.provenance.top_atoms(b, k, rank_depth) for k in range(head.mask_logits.shape[1]))]
                  for b in range(len(samples))]
    model_masks = [targets_to_frame(torch.from_numpy(s.target_masks), input_size=model.sam_input_size,
                                    out_size=mask_size[0]).numpy().astype(np.float32) for s in samples]
    return _BatchPart(
        codes=full, head_codes=out.codes, token_types=types[sample, position].cpu(),
        image_grid=grid[sample, position].cpu().long(), token_sample_index=sample,
        token_strings=model.loaded.tokenizer.convert_ids_to_tokens(ids),
        grid_shapes=[_grid_shape(grid[b], types[b]) for b in range(len(samples))],
        heatmap_probs=heat.sigmoid().cpu(), mask_probs=head.mask_logits.float().sigmoid().cpu(),
        confidences=head.confidence_logits.float().sigmoid().cpu(), slots_written=slots.slots_written.cpu(),
        provenance=provenance, slot_embeddings=slots.slot_embeddings.float().cpu(),
        image_embeddings=embeddings.float().cpu(),
        policy_image=None if out.policy_image is None else out.policy_image.float().cpu(), model_masks=model_masks)


def greedy_world_responses(model, samples: Sequence, *, batch_size: int = 8, max_new_tokens: int = 96) -> list[str]:
    """The policy's own greedy responses to each sample's prompt (what `segcompass eval` decodes)."""
    from segcompass.predictor import greedy_responses
    from segcompass.template import build_prompt

    texts = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        texts += greedy_responses(model.loaded, [s.image for s in chunk],
                                  [build_prompt(s.instruction, multi=s.multi_prompt) for s in chunk],
                                  max_new_tokens=max_new_tokens)
    return texts


def collect(model, samples: Sequence, *, responses: Sequence[str] | None = None, greedy: bool = False,
            batch_size: int = 8, rank_depth: int = DEFAULT_RANK_DEPTH, progress: bool = False) -> Collected:
    """Run `model` (a loaded SegCompass) over world `samples` and gather the analyses' inputs.

    Responses: `responses` when given, else greedy generations when `greedy`, else the
    ground-truth chain of thought + K concentration tokens (teacher forcing, as in training).
    """
    from segcompass.predictor import grid_region
    from segcompass.template import format_response, k_for

    samples = list(samples)
    if not samples:
        raise ValueError("collect: no samples")
    if batch_size < 1 or rank_depth < 1:
        raise ValueError(f"collect: batch_size and rank_depth must be >= 1, got {batch_size}, {rank_depth}")
    model.eval()
    teacher_forced = responses is None and not greedy
    if responses is None:
        responses = (greedy_world_responses(model, samples, batch_size=batch_size) if greedy else
                     [format_response(s.cot, k_for(s.multi_prompt)) for s in samples])
    responses = list(responses)
    if len(responses) != len(samples):
        raise ValueError(f"collect: {len(responses)} responses for {len(samples)} samples")
    parts = []
    for start in tqdm(range(0, len(samples), batch_size), desc="collect", disable=not progress):
        parts.append(_run_batch(model, samples[start:start + batch_size], responses[start:start + batch_size],
                                rank_depth))
    return _assemble(model, samples, responses, teacher_forced, parts, grid_region)


def _assemble(model, samples: list, responses: list[str], teacher_forced: bool, parts: list[_BatchPart],
              grid_region) -> Collected:
    """Concatenate batch parts; token sample indices become global."""
    d_sae = parts[0].codes.d_sae
    offsets = np.cumsum([0] + [len(p.slots_written) for p in parts])[:-1]  # first sample of each batch
    sample_index = np.concatenate([p.token_sample_index.numpy() + o for p, o in zip(parts, offsets)])
    counts = np.bincount(sample_index, minlength=len(samples))
    stops = np.cumsum(counts)
    regions = [grid_region(s.image.shape[:2], model.loaded.image_processor) for s in samples]
    return Collected(
        samples=samples, responses=responses, teacher_forced=teacher_forced,
        codes=concat_codes([p.codes for p in parts], d_sae),
        head_codes=concat_codes([p.head_codes for p in parts], d_sae),
        threshold=float(model.head_cfg.threshold),
        token_types=torch.cat([p.token_types for p in parts]).numpy().astype(np.int8),
        image_grid=torch.cat([p.image_grid for p in parts]).numpy().astype(np.int64),
        token_sample_index=sample_index.astype(np.int64),
        token_strings=[t for p in parts for t in p.token_strings],
        token_range=np.stack([stops - counts, stops], axis=1).astype(np.int64),
        grid_shapes=[g for p in parts for g in p.grid_shapes], grid_regions=regions,
        image_masks=[policy_frame(s.target_masks, r) for s, r in zip(samples, regions)],
        scene_masks=[[policy_frame(o.mask, r) for o in s.objects] for s, r in zip(samples, regions)],
        model_masks=[m for p in parts for m in p.model_masks],
        heatmap_probs=torch.cat([p.heatmap_probs for p in parts]).numpy(),
        mask_probs=torch.cat([p.mask_probs for p in parts]).numpy(),
        confidences=torch.cat([p.confidences for p in parts]).numpy(),
        slots_written=torch.cat([p.slots_written for p in parts]).numpy().astype(np.int64),
        provenance=[r for p in parts for r in p.provenance],
        slot_embeddings=torch.cat([p.slot_embeddings for p in parts]),
        image_embeddings=torch.cat([p.image_embeddings for p in parts]),
        policy_image=None if parts[0].policy_image is None else torch.cat([p.policy_image for p in parts]))


def collect_checkpoint(checkpoint: str | Path, *, split: str = "val", n: int = 48, seed: int = 1,
                       greedy: bool = False, batch_size: int = 8, rank_depth: int = DEFAULT_RANK_DEPTH,
                       device: str = "cpu", progress: bool = False):
    """(loaded model, Collected) for the first `n` samples of world `split` under `seed`."""
    from segcompass.world.scenes import generate
    from segcompass.model import load_segcompass

    model = load_segcompass(checkpoint, device=device).eval()
    samples = generate(split, n, seed)
    return model, collect(model, samples, greedy=greedy, batch_size=batch_size, rank_depth=rank_depth,
                          progress=progress)
