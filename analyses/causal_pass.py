"""The expensive part of the causal suite, done once: greedy decoding and one policy pass per batch.

`run_split_pass` decodes each sample's response greedily (as `segcompass eval` does: the same
`greedy_responses`, batches of the same size) and runs the policy once over prompt + response.
A sample is a world sample or a dataset item (`segcompass.data.sources`, read by
`source_samples`): one image, one instruction, (N, H, W) target masks (N = 0: no target; N > 1:
gRefCOCO's several), optional ignore pixels; a dataset item has no chain of thought, and the
greedy response is all the pass reads either way.
What the head reads from that pass is kept as one `HeadInputs` over all n samples (on the
CPU), so every intervention re-runs only the head (`run_condition`), batch by batch.

`final_masks` turns a head output into each sample's final mask exactly as
`segcompass.predictor.Predictor` does (the single slot for the single-object prompt, the union
of slots with confidence >= conf_threshold for the multi-object one), so the unedited
condition scores what `segcompass eval` scores on the same samples (ignore pixels, `ignore_of`,
left out of every IoU, as there).

Also accumulated on the pass: the fraction of the layer's variance explained by the code the
head actually sees, 1 - sum ||x - x_hat_thr||^2 / sum ||x - mean||^2 over SAE tokens, with
x_hat_thr the SAE decoder applied to the thresholded codes (and, for reference, to the full
code, every h > 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from analyses.causal_edits import HeadEdit, run_edited
from analyses.causal_inputs import concat_inputs, inputs_to, take_samples
from saekit.sae.encode import encode_sparse
from saekit.sparse import SparseCodes
from segcompass.data.sources import ignore_of
from segcompass.metrics import MetricAccumulator, SplitScores, batch_counts, sample_iou
from segcompass.model import HeadInputs
from segcompass.modeling.segcompass_head import HeadOutput


class VarianceSums(NamedTuple):
    """Running sums over SAE tokens for the variance explained (float64)."""

    n: int
    sum_x: np.ndarray
    """(d,) sum of x."""
    sum_sq: float
    """sum ||x||^2."""
    sse_thresholded: float
    """sum ||x - decode(thresholded code)||^2."""
    sse_full: float
    """sum ||x - decode(full code)||^2."""

    def add(self, other: VarianceSums) -> VarianceSums:
        return VarianceSums(self.n + other.n, self.sum_x + other.sum_x, self.sum_sq + other.sum_sq,
                            self.sse_thresholded + other.sse_thresholded, self.sse_full + other.sse_full)

    def explained(self) -> dict[str, float]:
        """{"thresholded": FVE, "full": FVE, "n_tokens": n}."""
        total = self.sum_sq - float(self.sum_x @ self.sum_x) / max(self.n, 1)  # sum ||x - mean||^2
        return {"thresholded": 1 - self.sse_thresholded / total if total > 0 else float("nan"),
                "full": 1 - self.sse_full / total if total > 0 else float("nan"), "n_tokens": self.n}


def sparse_decode(sae, codes: SparseCodes) -> Tensor:
    """(N, d_in) the SAE decoder on CSR codes, never densified: sum_j h_j W_dec[j] + b_dec."""
    bags = F.embedding_bag(codes.indices, sae.W_dec, codes.offsets[:-1], mode="sum",
                           per_sample_weights=codes.values.to(sae.W_dec.dtype))
    return bags + sae.b_dec


@torch.no_grad()
def variance_sums(sae, x: Tensor, codes: SparseCodes) -> VarianceSums:
    """Sums of one batch's SAE tokens x (N, d) with their thresholded codes."""
    x = x.to(sae.W_dec.dtype)
    full = encode_sparse(sae, x, threshold=0.0)
    err_thr = (x - sparse_decode(sae, codes)).double().pow(2).sum().item()
    err_full = (x - sparse_decode(sae, full)).double().pow(2).sum().item()
    xd = x.double()
    return VarianceSums(len(x), xd.sum(0).cpu().numpy(), xd.pow(2).sum().item(), err_thr, err_full)


class SplitPass(NamedTuple):
    """One policy pass over n samples of a split (N SAE tokens in all)."""

    split: str
    samples: list
    """World `WorldSample`s or dataset `Item`s (`segcompass.data.sources.SampleLike`)."""
    responses: list[str]
    """Greedy responses (special tokens kept)."""
    inputs: HeadInputs
    """What the head read, all n samples, on the CPU."""
    token_types: np.ndarray
    """(N,) int8 `saekit.inputs.TokenType` of each SAE token."""
    image_grid: np.ndarray
    """(N, 2) int64 (row, col) of image tokens on the policy's grid; -1 elsewhere."""
    token_strings: list[str]
    """(N,) tokens as the tokenizer spells them."""
    grid_shapes: list[tuple[int, int]]
    """(rows, cols) of each sample's image-token grid."""
    variance: VarianceSums


class _Part(NamedTuple):
    inputs: HeadInputs
    token_types: Tensor
    image_grid: Tensor
    token_strings: list[str]
    grid_shapes: list[tuple[int, int]]
    variance: VarianceSums


def _grid_shape(image_grid: Tensor, token_types: Tensor) -> tuple[int, int]:
    """(rows, cols) of one sample's grid from its image tokens' (row, col) (LLaVA's CLS is (-1, -1))."""
    from saekit.inputs import TokenType

    cells = image_grid[token_types == int(TokenType.IMAGE)]  # (n_image, 2)
    return int(cells[:, 0].max()) + 1, int(cells[:, 1].max()) + 1


@torch.no_grad()
def _forward(model, samples: list, responses: list[str]) -> _Part:
    from segcompass.policy import policy_forward
    from segcompass.training.batching import batch_from_samples

    seg = batch_from_samples(model, samples, responses)
    embeddings = model.image_embeddings(seg.images)
    forward = policy_forward(model.policy, seg.model_batch, model.config.sae_layer)
    slots, inputs = model.head_inputs(forward, seg.model_batch, embeddings)
    sample, position = slots.token_sample_index.cpu(), slots.token_position.cpu()  # (N,)
    types, grid = seg.model_batch.token_types, seg.model_batch.image_grid  # (B, T), (B, T, 2)
    ids = seg.model_batch.model_inputs["input_ids"][sample, position].tolist()
    return _Part(inputs_to(inputs, "cpu"), types[sample, position].cpu(), grid[sample, position].cpu().long(),
                 model.loaded.tokenizer.convert_ids_to_tokens(ids),
                 [_grid_shape(grid[b], types[b]) for b in range(len(samples))],
                 variance_sums(model.sae, slots.sae_tokens, inputs.codes))


def source_samples(data: str, split: str, n: int | None, *, seed: int = 1, split_by: str | None = None) -> list:
    """The first `n` samples (all of a dataset split when None) of `split` of source `data` (`world`,
    `reasonseg:DIR`, ...), read as `segcompass eval` reads them (world samples drawn under `seed`)."""
    from segcompass.data.sources import eval_items, open_split, parse_data

    return list(eval_items(open_split(parse_data(data), split, split_by=split_by, seed=seed), n))


def run_split_pass(model, split: str, samples: Sequence, *, responses: Sequence[str] | None = None,
                   batch_size: int = 16, max_new_tokens: int = 96, progress: bool = False) -> SplitPass:
    """Greedy responses (unless given) and one policy pass per batch over `samples` (world samples or
    dataset items, `source_samples`)."""
    from segcompass.predictor import greedy_responses
    from segcompass.template import build_prompt

    samples, texts, parts = list(samples), [], []
    model.eval()
    for start in tqdm(range(0, len(samples), batch_size), desc=f"causal pass {split}", disable=not progress):
        chunk = samples[start:start + batch_size]
        if responses is None:
            chunk_texts = greedy_responses(model.loaded, [s.image for s in chunk],
                                           [build_prompt(s.instruction, multi=s.multi_prompt) for s in chunk],
                                           max_new_tokens=max_new_tokens)
        else:
            chunk_texts = list(responses[start:start + batch_size])
        texts += chunk_texts
        parts.append(_forward(model, chunk, chunk_texts))
    variance = parts[0].variance
    for part in parts[1:]:
        variance = variance.add(part.variance)
    return SplitPass(split, samples, texts, concat_inputs([p.inputs for p in parts]),
                     torch.cat([p.token_types for p in parts]).numpy().astype(np.int8),
                     torch.cat([p.image_grid for p in parts]).numpy().astype(np.int64),
                     [t for p in parts for t in p.token_strings], [g for p in parts for g in p.grid_shapes],
                     variance)


# ---------------------------------------------------------------- masks and scores

def final_masks(model, out: HeadOutput, samples: Sequence, conf_threshold: float = 0.5) -> list[np.ndarray]:
    """Each sample's (H, W) bool final mask, as `Predictor` makes it (module docstring)."""
    from segcompass.postprocess import masks_to_image, resized_size
    from segcompass.template import k_for

    side, masks = model.sam_input_size, []
    for b, sample in enumerate(samples):
        k = min(k_for(sample.multi_prompt), model.head.num_slots)
        height, width = sample.image.shape[:2]
        logits = masks_to_image(out.mask_logits[b, :k], input_size=side, resized=resized_size(height, width, side),
                                original=(height, width))  # (k, m, m) -> (k, H, W)
        slot_masks = (logits > 0).cpu().numpy()
        if sample.multi_prompt:
            selected = out.confidence_logits[b, :k].sigmoid().float().cpu().numpy() >= conf_threshold
        else:
            selected = np.ones(k, bool)
        masks.append(slot_masks[selected].any(axis=0) if selected.any() else np.zeros((height, width), bool))
    return masks


@torch.no_grad()
def run_condition(model, inputs: HeadInputs, samples: Sequence, edit: HeadEdit | None = None, *,
                  index: np.ndarray | None = None, codes_from: np.ndarray | None = None, batch_size: int = 16,
                  conf_threshold: float = 0.5) -> list[np.ndarray]:
    """Final masks with the head re-run under `edit`, batch by batch. Result i reads the dense fields of
    `inputs`' sample index[i] (default i) and the code fields of sample codes_from[i] (default index[i]);
    `samples[i]` is the world sample its mask is made for (prompt kind, image size)."""
    device = next(model.head.parameters()).device
    index = np.arange(len(samples)) if index is None else np.asarray(index)
    donors = index if codes_from is None else np.asarray(codes_from)
    masks = []
    for start in range(0, len(samples), batch_size):
        chunk = torch.as_tensor(index[start:start + batch_size], dtype=torch.int64)
        batch = inputs_to(take_samples(inputs, chunk, codes_from=donors[start:start + batch_size]), device)
        out = run_edited(model, batch, edit or HeadEdit(), chunk)
        masks += final_masks(model, out, samples[start:start + len(chunk)], conf_threshold)
    return masks


def score_masks(masks: Sequence[np.ndarray], samples: Sequence) -> SplitScores:
    """gIoU / cIoU / N-acc / T-acc of final masks against the samples' targets, ignore pixels left out
    (`segcompass.metrics`, as `segcompass eval`)."""
    accumulator = MetricAccumulator()
    for mask, sample in zip(masks, samples, strict=True):
        accumulator.add(mask, sample.target_masks, ignore_of(sample))
    return accumulator.result()


def mask_ious(masks: Sequence[np.ndarray], references: Sequence[np.ndarray],
              ignores: Sequence[np.ndarray | None] | None = None) -> np.ndarray:
    """(n,) IoU of each (H, W) mask with its (H, W) reference (1 when both are empty), each pair on its
    own image size, pixels of ignores[i] (H, W) left out."""
    ignores = [None] * len(masks) if ignores is None else ignores
    ious = np.empty(len(masks), dtype=np.float64)
    for i, (mask, reference, ignore) in enumerate(zip(masks, references, ignores, strict=True)):
        counts = batch_counts(mask[None], reference[None], None if ignore is None else ignore[None])
        ious[i] = sample_iou(counts.intersection, counts.union)[0]
    return ious


def n_targets(sample) -> int:
    """Target instances of a sample (0: no target; world: len(targets))."""
    return len(sample.target_masks)


def target_union(sample) -> np.ndarray:
    """(H, W) bool union of a sample's targets."""
    return sample.target_masks.any(axis=0) if len(sample.target_masks) else np.zeros(sample.image.shape[:2], bool)
