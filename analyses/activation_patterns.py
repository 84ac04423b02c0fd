"""Figure 4: how many SAE atoms are active per token, by token group, across thresholds τ.

Groups (the paper's four token types):
    question          PROMPT tokens (the user's instruction)
    cot               RESPONSE tokens (the chain of thought and what follows it)
    instance_image    IMAGE tokens whose patch overlaps the union of the target masks
    background_image  the other IMAGE tokens
SPECIAL tokens (BOS, chat markers) and image positions off the patch grid (LLaVA's CLS
feature under the "full" strategy) belong to no group.

A token's count at τ is the number of atoms with |h_j| > τ. The mean and its standard
error are over tokens pooled across samples; tokens of one sample are not independent,
so the s.e.m. understates the sample-to-sample spread (it is a readability band).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from analyses.patches import as_numpy, grid_of, patch_fractions, rows_by_sample
from analyses.plotting import GROUP_COLOURS, label_axes, new_figure
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes

GROUPS: tuple[str, ...] = ("question", "cot", "instance_image", "background_image")
"""Group names; `token_groups` returns indices into this tuple."""
EXCLUDED = -1
"""Group label of tokens that belong to no group."""
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _union(masks) -> np.ndarray:
    """(H, W) bool union of a sample's targets given as (H, W) or (n, H, W) (n may be 0)."""
    masks = as_numpy(masks).astype(bool)
    return masks.any(axis=0) if masks.ndim == 3 else masks


def token_groups(token_types, image_grid, token_sample_index, target_masks: Sequence,
                 grid_shape, *, min_fraction: float = 0.0) -> np.ndarray:
    """(N,) int8 group of each token: an index into GROUPS, or EXCLUDED.

    token_types (N,) `TokenType` values; image_grid (N, 2) (row, col) of image tokens, -1
    elsewhere; token_sample_index (N,) sample of each token; target_masks[b] the targets of
    sample b as (H, W) or (n_b, H, W) in the frame the model saw; grid_shape (rows, cols),
    shared or one per sample. An image token is an instance token when more than
    `min_fraction` of its patch's pixels lie in the target union (0: any overlap).
    """
    types, grid = as_numpy(token_types).astype(np.int64), as_numpy(image_grid).astype(np.int64)
    samples = as_numpy(token_sample_index).astype(np.int64)
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction}")
    groups = np.full(len(types), EXCLUDED, dtype=np.int8)
    groups[types == TokenType.PROMPT] = GROUPS.index("question")
    groups[types == TokenType.RESPONSE] = GROUPS.index("cot")
    on_grid = (types == TokenType.IMAGE) & (grid[:, 0] >= 0)
    for sample, rows in rows_by_sample(on_grid, samples).items():
        if sample >= len(target_masks):
            raise ValueError(f"token of sample {sample} but only {len(target_masks)} target masks")
        fractions = patch_fractions(_union(target_masks[sample]), grid_of(grid_shape, sample))
        overlap = fractions[grid[rows, 0], grid[rows, 1]] > min_fraction  # (n_image,)
        groups[rows] = np.where(overlap, GROUPS.index("instance_image"), GROUPS.index("background_image"))
    return groups


def active_counts(codes: SparseCodes, thresholds: Sequence[float]) -> np.ndarray:
    """(n_thresholds, N) int64 number of atoms with |h| > τ per token, for each τ."""
    magnitude = codes.values.detach().abs().float().cpu()  # (nnz,)
    rows = codes.row_ids().cpu()  # (nnz,)
    out = np.zeros((len(thresholds), codes.n_tokens), dtype=np.int64)
    for i, tau in enumerate(thresholds):
        active = magnitude > float(tau)
        out[i] = torch.bincount(rows[active], minlength=codes.n_tokens).numpy()
    return out


def active_counts_reference(codes: SparseCodes, thresholds: Sequence[float]) -> np.ndarray:
    """Dense definition of `active_counts` (small inputs only)."""
    dense = codes.to_dense().abs().cpu()  # (N, d_sae)
    return np.stack([(dense > float(tau)).sum(dim=1).numpy() for tau in thresholds]).astype(np.int64)


def active_atoms_by_group(codes: SparseCodes, groups, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
                          ) -> pd.DataFrame:
    """Mean and s.e.m. of the number of active atoms per token, per group and threshold.

    codes over N tokens; groups (N,) from `token_groups`. Returns one row per (group, τ)
    with columns group, tau, mean, sem, n_tokens (mean/sem NaN for an empty group).
    """
    groups = as_numpy(groups)
    if len(groups) != codes.n_tokens:
        raise ValueError(f"{len(groups)} group labels for {codes.n_tokens} tokens")
    counts = active_counts(codes, thresholds)  # (n_tau, N)
    records = []
    for g, name in enumerate(GROUPS):
        members = counts[:, groups == g]  # (n_tau, n_g)
        n = members.shape[1]
        for i, tau in enumerate(thresholds):
            mean = float(members[i].mean()) if n else float("nan")
            sem = float(members[i].std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
            records.append({"group": name, "tau": float(tau), "mean": mean, "sem": sem, "n_tokens": n})
    return pd.DataFrame.from_records(records)


def min_margin(table: pd.DataFrame, group: str, baseline: str) -> float:
    """min over τ of mean[group] - mean[baseline]: > 0 iff `group` exceeds `baseline` at every τ."""
    wide = table.pivot(index="tau", columns="group", values="mean")
    return float((wide[group] - wide[baseline]).min())


def plot_active_atoms(table: pd.DataFrame, *, title: str = "Active SAE atoms per token (Figure 4)") -> Figure:
    """One line per group over τ (s.e.m. band), symlog x axis when τ spans decades."""
    fig, (ax,) = new_figure()
    for g, name in enumerate(GROUPS):
        rows = table[table.group == name].sort_values("tau")
        if rows.empty or rows["n_tokens"].iloc[0] == 0:
            continue
        colour = GROUP_COLOURS[g]
        sem = rows["sem"].fillna(0.0)
        ax.plot(rows.tau, rows["mean"], marker="o", color=colour,
                label=f"{name.replace('_', ' ')} (n={int(rows['n_tokens'].iloc[0])})")
        ax.fill_between(rows.tau, rows["mean"] - sem, rows["mean"] + sem, color=colour, alpha=0.2)
    positive = table.tau[table.tau > 0]
    if len(positive) and positive.max() / positive.min() > 20:
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    label_axes(ax, "activation threshold τ (atom active when |h| > τ)", "mean active atoms per token", title)
    ax.legend(title="token group")
    return fig
