"""Figure 4: how many SAE atoms are active per token, by token group, across thresholds τ.

Groups (the paper's four token types, with the image split three ways):
    question              PROMPT tokens (the user's instruction)
    cot                   RESPONSE tokens (the chain of thought and what follows it)
    instance_image        IMAGE tokens whose patch overlaps a referred (target) instance
    background_image      IMAGE tokens whose patch overlaps no object
    other_instance_image  IMAGE tokens whose patch overlaps only objects that are not referred
SPECIAL tokens (BOS, chat markers), image positions off the patch grid (LLaVA's CLS feature
under the "full" strategy) and patches overlapping both a referred and another object
belong to no group. Without the other objects' masks, their patches count as background
(the paper's split).

Causal-attention caveat: in LLaVA's prompt (and this repository's policies, "USER: <image>\n
{prompt}") the image tokens come before the instruction, so under causal attention their
codes are a function of the image alone and cannot depend on which object is referred to.
"Referred instance vs background" therefore measures how salient objects are, not reference.
The control is the comparison inside each image of the referred instance with the other
instances (same image, same code): `paired_difference`, one value per image that has both.
Even that difference can only come from what the referred objects are (templates that refer
to "the largest" pick large ones), never from the instruction; background stays as the
secondary reference.

A token's count at τ is the number of atoms with |h_j| > τ. The pooled mean and its standard
error are over tokens pooled across samples; tokens of one sample are not independent,
so that s.e.m. understates the sample-to-sample spread (it is a readability band). The
paired difference's s.e.m. is over images, which are independent.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from analyses.patches import as_numpy, grid_of, patch_fractions, rows_by_sample
from analyses.plotting import GROUP_COLOURS, label_axes, new_figure
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes

GROUPS: tuple[str, ...] = ("question", "cot", "instance_image", "background_image", "other_instance_image")
"""Group names; `token_groups` returns indices into this tuple (the first four keep the paper's
order, so a group keeps its colour)."""
GROUP_LABELS: dict[str, str] = {"question": "question", "cot": "chain of thought",
                                "instance_image": "referred instance (image)",
                                "background_image": "background (image)",
                                "other_instance_image": "other instances (image)"}
"""Legend text of each group."""
CAVEAT = ("Image tokens precede the instruction: under causal attention their codes cannot depend on "
          "which object is referred, so referred instance vs background measures saliency, not reference; "
          "the control is referred vs the other instances of the same image.")
"""The causal-attention caveat, as written into figure subtitles and summaries."""
EXCLUDED = -1
"""Group label of tokens that belong to no group."""
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def _union(masks, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """(H, W) bool union of masks given as (H, W), (n, H, W) or a list of (H, W) (n may be 0;
    an empty list needs `shape`)."""
    if isinstance(masks, (list, tuple)):
        if not masks:
            return np.zeros(shape, dtype=bool)
        masks = np.stack([as_numpy(m) for m in masks])
    masks = as_numpy(masks).astype(bool)
    return masks.any(axis=0) if masks.ndim == 3 else masks


def token_groups(token_types, image_grid, token_sample_index, target_masks: Sequence,
                 grid_shape, *, other_masks: Sequence | None = None, min_fraction: float = 0.0) -> np.ndarray:
    """(N,) int8 group of each token: an index into GROUPS, or EXCLUDED.

    token_types (N,) `TokenType` values; image_grid (N, 2) (row, col) of image tokens, -1
    elsewhere; token_sample_index (N,) sample of each token; target_masks[b] the targets of
    sample b as (H, W) or (n_b, H, W) in the frame the model saw; other_masks[b] the other
    (not referred) objects of sample b in the same frame and forms (a list of (H, W) too), or
    None; grid_shape (rows, cols), shared or one per sample. A patch belongs to a set of
    objects when more than `min_fraction` of its pixels lie in their union (0: any overlap):
    referred only -> instance, others only -> other instance, both -> EXCLUDED, neither ->
    background.
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
        if other_masks is not None and sample >= len(other_masks):
            raise ValueError(f"token of sample {sample} but only {len(other_masks)} other-object masks")
        shape = grid_of(grid_shape, sample)
        referred = _union(target_masks[sample])
        cells = grid[rows, 0], grid[rows, 1]
        on_referred = patch_fractions(referred, shape)[cells] > min_fraction  # (n_image,)
        on_other = np.zeros_like(on_referred)
        if other_masks is not None:
            on_other = patch_fractions(_union(other_masks[sample], referred.shape), shape)[cells] > min_fraction
        labels = np.select([on_referred & on_other, on_referred, on_other],
                           [EXCLUDED, GROUPS.index("instance_image"), GROUPS.index("other_instance_image")],
                           GROUPS.index("background_image"))
        groups[rows] = labels
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


def paired_difference(codes: SparseCodes, groups, token_sample_index, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                      *, group: str = "instance_image", baseline: str = "other_instance_image") -> pd.DataFrame:
    """Within-image difference of mean active atoms per token, `group` minus `baseline`, per τ.

    Per image with tokens in both groups: d = (mean count over its `group` tokens) - (mean
    count over its `baseline` tokens). Returns one row per τ with columns tau,
    mean_difference (mean of d over those images), sem (over images), fraction_positive
    (share of images with d > 0), n_images; NaN statistics when no image has both groups.
    """
    groups, samples = as_numpy(groups), as_numpy(token_sample_index).astype(np.int64)
    if len(groups) != codes.n_tokens or len(samples) != codes.n_tokens:
        raise ValueError(f"{len(groups)} group labels and {len(samples)} sample indices for {codes.n_tokens} tokens")
    counts = active_counts(codes, thresholds)  # (n_tau, N)
    n_samples = int(samples.max()) + 1 if len(samples) else 0
    means = []
    for name in (group, baseline):
        members = groups == GROUPS.index(name)
        size = np.bincount(samples[members], minlength=n_samples)  # (B,)
        sums = np.stack([np.bincount(samples[members], weights=row[members], minlength=n_samples)
                         for row in counts])  # (n_tau, B)
        means.append(np.where(size > 0, sums / np.maximum(size, 1), np.nan))
    diff = means[0] - means[1]  # (n_tau, B), NaN where an image lacks either group
    both = ~np.isnan(diff[0]) if len(thresholds) else np.zeros(n_samples, bool)
    d, n = diff[:, both], int(both.sum())
    nan = np.full(len(thresholds), np.nan)
    return pd.DataFrame({"tau": np.asarray(thresholds, dtype=float),
                         "mean_difference": d.mean(axis=1) if n else nan,
                         "sem": d.std(axis=1, ddof=1) / np.sqrt(n) if n > 1 else nan,
                         "fraction_positive": (d > 0).mean(axis=1) if n else nan, "n_images": n})


def min_margin(table: pd.DataFrame, group: str, baseline: str) -> float:
    """min over τ of mean[group] - mean[baseline]: > 0 iff `group` exceeds `baseline` at every τ."""
    wide = table.pivot(index="tau", columns="group", values="mean")
    return float((wide[group] - wide[baseline]).min())


def _tau_axis(ax, taus: pd.Series) -> None:
    """Symlog x axis when τ spans decades."""
    positive = taus[taus > 0]
    if len(positive) and positive.max() / positive.min() > 20:
        ax.set_xscale("symlog", linthresh=float(positive.min()))


def plot_active_atoms(table: pd.DataFrame, paired: dict[str, pd.DataFrame] | None = None, *,
                      title: str = "Active SAE atoms per token (Figure 4)", caveat: str | None = CAVEAT) -> Figure:
    """Left: one line per group over τ (pooled tokens, s.e.m. band). Right, when `paired` maps a
    legend label to a `paired_difference` table: the within-image differences over τ (s.e.m.
    band over images) against 0. `caveat` is written under the title."""
    fig, axes = new_figure(2 if paired else 1)
    ax = axes[0]
    for g, name in enumerate(GROUPS):
        rows = table[table.group == name].sort_values("tau")
        if rows.empty or rows["n_tokens"].iloc[0] == 0:
            continue
        colour = GROUP_COLOURS[g]
        sem = rows["sem"].fillna(0.0)
        ax.plot(rows.tau, rows["mean"], marker="o", color=colour,
                label=f"{GROUP_LABELS[name]} (n={int(rows['n_tokens'].iloc[0])})")
        ax.fill_between(rows.tau, rows["mean"] - sem, rows["mean"] + sem, color=colour, alpha=0.2)
    _tau_axis(ax, table.tau)
    label_axes(ax, "activation threshold τ (atom active when |h| > τ)", "mean active atoms per token",
               "All tokens, pooled")
    ax.legend(title="token group", fontsize="small")
    if paired:
        right = axes[1]
        right.axhline(0.0, color="black", linewidth=0.8)
        for i, (label, rows) in enumerate(paired.items()):
            rows = rows.sort_values("tau")
            if not rows.n_images.iloc[0]:
                continue
            colour, sem = GROUP_COLOURS[(2 + i) % len(GROUP_COLOURS)], rows["sem"].fillna(0.0)
            right.plot(rows.tau, rows.mean_difference, marker="o", color=colour,
                       label=f"{label} (n={int(rows.n_images.iloc[0])} images)")
            right.fill_between(rows.tau, rows.mean_difference - sem, rows.mean_difference + sem, color=colour,
                               alpha=0.2)
        _tau_axis(right, table.tau)
        label_axes(right, "activation threshold τ (atom active when |h| > τ)",
                   "difference of mean active atoms per token", "Within each image (paired)")
        if right.get_legend_handles_labels()[0]:
            right.legend(fontsize="small")
    fig.suptitle(subtitled(title, caveat, width=75 * len(axes)), fontsize="medium")
    return fig


def subtitled(title: str, caveat: str | None, *, width: int = 75) -> str:
    """`title`, then `caveat` wrapped to `width` characters on the lines below it."""
    return "\n".join([title, *textwrap.wrap(caveat, width)]) if caveat else title
