"""Beyond the paper: is the concept pathway causal? Deletion and insertion curves.

For one (sample, slot) with its provenance ranking of atoms (heaviest first, from
`Provenance.top_atoms`):
  deletion(k)   zero every activation of the top-k atoms in the sample's tokens, score the mask;
  insertion(k)  keep only the top-k atoms (all others zeroed), score the mask;
  baseline      the same with a random ranking of the sample's ACTIVE atoms (atoms with
                some |h| >= `min_activation`; pass the head's threshold so that every
                baseline atom actually reaches the codebook), `n_draws` seeded rankings;
                the random k-sets are nested like the provenance ones.
The caller's `evaluate(codes) -> IoU` closes over the head, image and slot embeddings and
the ground truth (`slot_mask_evaluator` builds one for a SegCompassHead). Zeroing an
activation is done by removing it from the CSR codes (a stored zero and a missing entry
are the same to the codebook).

Summaries: normalised area under each curve (trapezoid over k, divided by the k range:
mean IoU along the curve) per split, and the IoU drop at k=5 of the provenance atoms
vs random ones, as a ratio of means over (sample, slot) items.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch import Tensor

from analyses.plotting import label_axes, new_figure
from saekit.sparse import SparseCodes

DEFAULT_KS: tuple[int, ...] = (0, 1, 2, 3, 5, 8, 12, 20)
Evaluate = Callable[[SparseCodes], float]


def _select(codes: SparseCodes, keep: Tensor) -> SparseCodes:
    """Codes with only the stored entries where `keep` (nnz,) is True; rows stay in place."""
    counts = torch.bincount(codes.row_ids()[keep], minlength=codes.n_tokens)
    offsets = torch.zeros_like(codes.offsets)
    offsets[1:] = counts.cumsum(0)
    return SparseCodes(codes.indices[keep], codes.values[keep], offsets, codes.d_sae)


def drop_atoms(codes: SparseCodes, atoms) -> SparseCodes:
    """Codes with every activation of `atoms` zeroed (removed), in all tokens."""
    atoms = torch.as_tensor(atoms, dtype=torch.int64, device=codes.indices.device).reshape(-1)
    return _select(codes, ~torch.isin(codes.indices, atoms))


def keep_atoms(codes: SparseCodes, atoms) -> SparseCodes:
    """Codes with only the activations of `atoms` kept."""
    atoms = torch.as_tensor(atoms, dtype=torch.int64, device=codes.indices.device).reshape(-1)
    return _select(codes, torch.isin(codes.indices, atoms))


def active_atoms(codes: SparseCodes, min_activation: float = 0.0) -> np.ndarray:
    """Sorted int64 atoms with at least one stored activation of |h| >= min_activation."""
    strong = codes.values.detach().abs() >= min_activation
    return torch.unique(codes.indices[strong & (codes.values != 0)]).cpu().numpy()


class DeletionResult(NamedTuple):
    """Deletion and insertion curves of one (sample, slot), with the random baseline."""

    ks: np.ndarray
    """(n_k,) int number of atoms removed (deletion) or kept (insertion)."""
    full_iou: float
    """IoU with the codes untouched."""
    deletion: np.ndarray
    """(n_k,) IoU after zeroing the top-k provenance atoms."""
    insertion: np.ndarray
    """(n_k,) IoU keeping only the top-k provenance atoms."""
    random_deletion: np.ndarray
    """(n_draws, n_k) IoU after zeroing k random active atoms."""
    random_insertion: np.ndarray
    """(n_draws, n_k) IoU keeping only k random active atoms."""
    n_active: int
    """Active atoms in the sample (the random pool); k beyond it takes the whole pool."""
    n_ranked: int
    """Length of the provenance ranking; k beyond it takes the whole ranking."""


def _curves(evaluate: Evaluate, codes: SparseCodes, ranking: np.ndarray, ks: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray]:
    deletion = [evaluate(drop_atoms(codes, ranking[:k])) for k in ks]
    insertion = [evaluate(keep_atoms(codes, ranking[:k])) for k in ks]
    return np.asarray(deletion, dtype=np.float64), np.asarray(insertion, dtype=np.float64)


def deletion_curves(evaluate: Evaluate, codes: SparseCodes, ranking, ks: Sequence[int] = DEFAULT_KS, *,
                    n_draws: int = 5, seed: int = 0, min_activation: float = 0.0) -> DeletionResult:
    """Deletion/insertion curves of a provenance `ranking` (atom ids, heaviest first) and of
    `n_draws` seeded random rankings of the sample's active atoms.

    `codes` are the sample's tokens only; `evaluate(codes)` returns the mask IoU.
    Costs 1 + 2 * len(ks) * (1 + n_draws) calls of `evaluate`.
    """
    ks = np.asarray(ks, dtype=np.int64)
    if (ks < 0).any() or (np.diff(ks) <= 0).any():
        raise ValueError(f"ks must be non-negative and increasing, got {ks.tolist()}")
    ranking = np.asarray(torch.as_tensor(ranking).cpu(), dtype=np.int64).reshape(-1)
    pool = active_atoms(codes, min_activation)
    rng = np.random.default_rng(seed)
    deletion, insertion = _curves(evaluate, codes, ranking, ks)
    random_del, random_ins = [], []
    for _ in range(n_draws):
        d, i = _curves(evaluate, codes, rng.permutation(pool), ks)
        random_del.append(d)
        random_ins.append(i)
    shape = (n_draws, len(ks))
    return DeletionResult(ks, float(evaluate(codes)), deletion, insertion,
                          np.asarray(random_del).reshape(shape), np.asarray(random_ins).reshape(shape),
                          len(pool), len(ranking))


def normalised_auc(ks: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Trapezoid area under value(k) divided by the k range (the curve's mean IoU); over the last axis."""
    ks = np.asarray(ks, dtype=np.float64)
    return np.trapezoid(values, ks, axis=-1) / (ks[-1] - ks[0])


class DropSummary(NamedTuple):
    drop_top: float
    """Mean IoU drop (full - deletion) when the top-k provenance atoms are zeroed."""
    drop_random: float
    """Mean IoU drop when k random active atoms are zeroed (mean over draws and items)."""
    ratio: float
    """drop_top / drop_random (inf when random deletion changes nothing on average)."""
    k: int


def iou_drop(results: Sequence[DeletionResult], k: int = 5) -> DropSummary:
    """IoU drop of deleting the top-k provenance atoms vs k random ones (ratio of means)."""
    if not results:
        raise ValueError("no deletion results to summarise")
    column = [int(np.flatnonzero(r.ks == k)[0]) if k in r.ks else -1 for r in results]
    if min(column) < 0:
        raise ValueError(f"k={k} is not among the swept ks {results[0].ks.tolist()}")
    top = np.mean([r.full_iou - r.deletion[c] for r, c in zip(results, column)])
    rand = np.mean([r.full_iou - r.random_deletion[:, c].mean() for r, c in zip(results, column)])
    # a random drop at float-rounding level (the masks did not change) is no denominator:
    # measured once as 1e-17, which made a "ratio" of -9e11
    tiny = 1e-9
    ratio = top / rand if rand > tiny else (float("inf") if top > tiny else float("nan"))
    return DropSummary(float(top), float(rand), float(ratio), k)


def summarize(results: Sequence[DeletionResult], splits: Sequence[str], *, k: int = 5) -> pd.DataFrame:
    """One row per split: n_items, full_iou, AUCs of the four curves, IoU drops at k and their ratio."""
    splits = np.asarray(splits)
    if len(splits) != len(results):
        raise ValueError(f"{len(splits)} split names for {len(results)} results")
    rows = []
    for split in dict.fromkeys(splits.tolist()):
        part = [r for r, s in zip(results, splits) if s == split]
        auc = {name: float(np.mean([normalised_auc(r.ks, getattr(r, name)).mean() for r in part]))
               for name in ("deletion", "insertion", "random_deletion", "random_insertion")}
        drop = iou_drop(part, k)
        rows.append({"split": split, "n_items": len(part), "full_iou": float(np.mean([r.full_iou for r in part])),
                     **{f"auc_{name}": value for name, value in auc.items()},
                     f"drop_top{k}": drop.drop_top, f"drop_random{k}": drop.drop_random, "drop_ratio": drop.ratio})
    return pd.DataFrame.from_records(rows)


def curves_table(results: Sequence[DeletionResult], splits: Sequence[str]) -> pd.DataFrame:
    """Every point of every curve in long form: item, split, curve ('deletion', 'insertion',
    'random_deletion', 'random_insertion'), draw (-1 for the provenance curves), k, iou."""
    frames = []
    for item, (r, split) in enumerate(zip(results, splits, strict=True)):
        for curve in ("deletion", "insertion", "random_deletion", "random_insertion"):
            values = np.atleast_2d(getattr(r, curve))  # (n_draws or 1, n_k)
            draws = np.arange(len(values)) if curve.startswith("random") else np.array([-1])
            frames.append(pd.DataFrame({"item": item, "split": split, "curve": curve,
                                        "draw": np.repeat(draws, len(r.ks)), "k": np.tile(r.ks, len(values)),
                                        "iou": values.reshape(-1)}))
    return pd.concat(frames, ignore_index=True)


def plot_faithfulness(results: Sequence[DeletionResult], *, title: str = "Concept-pathway faithfulness") -> Figure:
    """Mean deletion and insertion curves over items: provenance ranking vs random (range over draws)."""
    ks = results[0].ks
    if any(not np.array_equal(r.ks, ks) for r in results):
        raise ValueError("all results must share the same ks to be averaged")
    fig, axes = new_figure(2, width=5.2, height=4.8)
    for ax, name, verb in ((axes[0], "deletion", "zeroed"), (axes[1], "insertion", "kept")):
        top = np.mean([getattr(r, name) for r in results], axis=0)  # (n_k,)
        random = np.mean([getattr(r, f"random_{name}") for r in results], axis=0)  # (n_draws, n_k)
        ax.plot(ks, top, marker="o", color="#d62728", label="top-k provenance atoms")
        ax.plot(ks, random.mean(axis=0), marker="s", linestyle="--", color="#7f7f7f",
                label=f"k random active atoms ({len(random)} draws)")
        ax.fill_between(ks, random.min(axis=0), random.max(axis=0), color="#7f7f7f", alpha=0.25,
                        label="random: range over draws")
        ax.axhline(np.mean([r.full_iou for r in results]), color="black", linewidth=0.8, linestyle=":",
                   label="all atoms (unchanged)")
        label_axes(ax, f"k: atoms {verb}", f"mask IoU (mean of {len(results)} slots)", f"{name.capitalize()}")
        ax.set_ylim(-0.02, 1.02)
        # below the axes: the curves can run anywhere inside them
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.suptitle(title)
    return fig


def slot_mask_evaluator(head: torch.nn.Module, slot_embeddings: Tensor, image_embeddings: Tensor,
                        target: Tensor, slot: int, *, logit_threshold: float = 0.0,
                        policy_image: Tensor | None = None) -> Evaluate:
    """evaluate(codes) -> IoU of `slot`'s mask (logit > threshold) with `target`, for one sample.

    slot_embeddings (1, K_s, d_llm), image_embeddings (1, C, h, w), policy_image (1, g*g, d_llm)
    or None (`SegCompassOutput.policy_image`); target (4h, 4w) bool in
    the head's mask frame (SAM's padded square; `segcompass.postprocess.targets_to_frame`).
    """
    target = target.bool()

    def evaluate(codes: SparseCodes) -> float:
        sample_index = torch.zeros(codes.n_tokens, dtype=torch.int64, device=codes.indices.device)
        with torch.no_grad():
            out = head(codes, sample_index, slot_embeddings, image_embeddings, policy_image)
        pred = out.mask_logits[0, slot] > logit_threshold  # (4h, 4w)
        union = (pred | target).sum().item()
        return (pred & target).sum().item() / union if union else 1.0

    return evaluate
