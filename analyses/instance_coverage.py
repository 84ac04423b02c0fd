"""Figure 5: how much of each target instance the most strongly activated image tokens cover.

Per sample, its image tokens are ranked by SAE activation magnitude; the top K% of them
(n_top = ceil(K/100 * n_image_tokens), ties broken by a seeded random order) form a union
of patches. An instance's coverage is the fraction of its pixels inside that union: the
probability that a pixel drawn uniformly from the instance is covered, which is our
reading of the paper's "probability that its pixels are covered". The curve is the mean
over instances (every target instance of every sample counts once).

Referred vs other instances: the paper compares the referred (target) instances with
random patches. In LLaVA's prompt the image tokens come before the instruction, so under
causal attention their codes, and this ranking, are the same whichever object is referred
to: a coverage above random shows that objects are salient, not that the referred one is.
Given the other objects of each image, the same ranking also scores them: the control is the
referred instances' coverage against the other instances' coverage in the same image
(`coverage_curve`'s paired_difference, one value per image holding both), with random K%
kept as the secondary reference. A referred-vs-other gap can only come from what the referred
objects are (templates that refer to "the largest" pick large ones), never from the
instruction.

Magnitude (the paper says only "activation magnitude"): the L2 norm of the token's code
by default; "l1" (sum of |h_j|) and "max" (largest |h_j|) are available.

Random-K% baseline: n_top patches drawn uniformly without replacement. Every patch is then
selected with probability n_top / n, so an instance's expected coverage is exactly
n_top / n whatever its shape (the patches tile the image); we report this analytic
expectation. `sampled_random_coverage` is the Monte Carlo reference it is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from analyses.activation_patterns import CAVEAT, subtitled
from analyses.patches import as_numpy, grid_of, patch_pixel_counts, rows_by_sample
from analyses.plotting import label_axes, new_figure
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes

Magnitude = Literal["l2", "l1", "max"]
DEFAULT_K_PERCENTS: tuple[float, ...] = (1, 2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100)


def token_magnitude(codes: SparseCodes, magnitude: Magnitude = "l2") -> np.ndarray:
    """(N,) float64 activation magnitude of each token's code (0 for a token with no atom)."""
    values = codes.values.detach().double().abs().cpu()  # (nnz,)
    rows = codes.row_ids().cpu()
    if magnitude == "l2":
        return torch.zeros(codes.n_tokens, dtype=torch.float64).index_add_(0, rows, values**2).sqrt().numpy()
    if magnitude == "l1":
        return torch.zeros(codes.n_tokens, dtype=torch.float64).index_add_(0, rows, values).numpy()
    if magnitude == "max":
        out = torch.zeros(codes.n_tokens, dtype=torch.float64)
        return out.scatter_reduce_(0, rows, values, reduce="amax", include_self=True).numpy()
    raise ValueError(f"magnitude must be 'l2', 'l1' or 'max', got {magnitude!r}")


def n_top(k_percent: float, n: int) -> int:
    """Number of tokens in the top K% of n: ceil(K/100 * n) (rounded first, so 25% of 16 is 4)."""
    return int(np.ceil(round(k_percent / 100.0 * n, 9)))


def sample_coverage(scores: np.ndarray, instance_counts: np.ndarray, k_percents: Sequence[float],
                    rng: np.random.Generator) -> np.ndarray:
    """(n_instances, n_k) coverage of each instance by the top-K% patches of one sample.

    scores (rows, cols) magnitude per patch; instance_counts (n_instances, rows, cols)
    pixels of each instance per patch.
    """
    flat_scores = scores.reshape(-1)  # (rows, cols) -> (n,)
    counts = instance_counts.reshape(len(instance_counts), -1)  # (I, rows, cols) -> (I, n)
    order = np.lexsort((rng.random(flat_scores.size), -flat_scores))  # descending, random ties
    covered = np.concatenate([np.zeros((len(counts), 1)), np.cumsum(counts[:, order], axis=1)], axis=1)
    tops = [n_top(k, flat_scores.size) for k in k_percents]
    return covered[:, tops] / counts.sum(axis=1, keepdims=True)  # (I, n_k)


def sampled_random_coverage(instance_counts: np.ndarray, k_percents: Sequence[float], draws: int,
                            rng: np.random.Generator) -> np.ndarray:
    """(n_instances, n_k) mean coverage over `draws` uniform random K% patch sets (reference)."""
    counts = instance_counts.reshape(len(instance_counts), -1)  # (I, n)
    n = counts.shape[1]
    total = np.zeros((len(counts), len(k_percents)))
    for _ in range(draws):
        order = rng.permutation(n)
        covered = np.concatenate([np.zeros((len(counts), 1)), np.cumsum(counts[:, order], axis=1)], axis=1)
        total += covered[:, [n_top(k, n) for k in k_percents]]
    return total / draws / counts.sum(axis=1, keepdims=True)


def _sample_scores(magnitude: np.ndarray, grid: np.ndarray, rows: np.ndarray,
                   grid_shape: tuple[int, int], sample: int) -> np.ndarray:
    """(rows, cols) magnitude of a sample's image tokens placed on its grid (each cell once)."""
    scores = np.full(grid_shape, np.nan)
    scores[grid[rows, 0], grid[rows, 1]] = magnitude[rows]
    if np.isnan(scores).any() or len(rows) != scores.size:
        raise ValueError(f"sample {sample}: its {len(rows)} image tokens do not fill its "
                         f"{grid_shape[0]}x{grid_shape[1]} token grid exactly once")
    return scores


class InstanceCoverage(NamedTuple):
    """Coverage of every non-empty instance (samples in order; in a sample its referred
    instances, then its other ones), one column per K."""

    coverage: np.ndarray
    """(n_instances, n_k) fraction of the instance's pixels in the top-K% patches."""
    random: np.ndarray
    """(n_instances, n_k) expected fraction under random K% patches: n_top / n of its grid."""
    sample: np.ndarray
    """(n_instances,) int64 sample each instance belongs to."""
    referred: np.ndarray
    """(n_instances,) bool: a referred (target) instance; False for the image's other objects."""


def _instances(masks) -> np.ndarray:
    """(n, H, W) bool non-empty instances of (n, H, W), (H, W) or a non-empty list of (H, W)."""
    masks = np.stack([as_numpy(m) for m in masks]) if isinstance(masks, (list, tuple)) else as_numpy(masks)
    masks = masks.astype(bool)
    masks = masks[None] if masks.ndim == 2 else masks  # (n, H, W)
    return masks[masks.any(axis=(1, 2))]  # drop empty instances (a no-target sample has none)


def per_instance_coverage(codes: SparseCodes, token_types, image_grid, token_sample_index,
                          instance_masks: Sequence, grid_shape, k_percents: Sequence[float] = DEFAULT_K_PERCENTS,
                          *, other_masks: Sequence | None = None, magnitude: Magnitude = "l2",
                          seed: int = 0) -> InstanceCoverage:
    """Top-K% and random-K% coverage of every referred instance and, given `other_masks`, of
    every other object of the same images (ranked by the same codes).

    Arguments as `analyses.activation_patterns.token_groups`; instance_masks[b] is
    (n_b, H, W) (n_b may be 0) or a single (H, W) instance; other_masks[b] the same for the
    objects sample b does not refer to (a list of (H, W) too); empty instances are skipped.
    """
    if any(not 0 <= k <= 100 for k in k_percents):
        raise ValueError(f"K must be percentages in [0, 100], got {list(k_percents)}")
    mags = token_magnitude(codes, magnitude)
    types, grid = as_numpy(token_types).astype(np.int64), as_numpy(image_grid).astype(np.int64)
    samples = as_numpy(token_sample_index).astype(np.int64)
    on_grid = (types == TokenType.IMAGE) & (grid[:, 0] >= 0)
    rng = np.random.default_rng(seed)
    coverage, random, owner = [np.zeros((0, len(k_percents)))], [np.zeros((0, len(k_percents)))], []
    referred = []
    for sample, rows in rows_by_sample(on_grid, samples).items():
        targets = _instances(instance_masks[sample])
        others = _instances(other_masks[sample]) if other_masks is not None and len(other_masks[sample]) else \
            np.zeros((0, *targets.shape[1:]), bool)
        masks = np.concatenate([targets, others])  # (n_b, H, W)
        if not len(masks):
            continue
        shape = grid_of(grid_shape, sample)
        scores = _sample_scores(mags, grid, rows, shape, sample)
        counts = np.stack([patch_pixel_counts(m, shape) for m in masks])  # (n_b, rows, cols)
        coverage.append(sample_coverage(scores, counts, k_percents, rng))  # one tie order for all of them
        expected = [n_top(k, scores.size) / scores.size for k in k_percents]
        random.append(np.tile(expected, (len(masks), 1)))
        owner += [int(sample)] * len(masks)
        referred += [True] * len(targets) + [False] * len(others)
    return InstanceCoverage(np.concatenate(coverage), np.concatenate(random), np.asarray(owner, dtype=np.int64),
                            np.asarray(referred, dtype=bool))


def _mean_sem(values: np.ndarray, n_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Column means and standard errors of (n, n_k) values (NaN when n is 0, s.e.m. NaN when 1)."""
    n, nan = len(values), np.full(n_k, np.nan)
    return (values.mean(axis=0) if n else nan), (values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else nan)


def paired_coverage_difference(per: InstanceCoverage) -> np.ndarray:
    """(n_images, n_k) per image holding both: mean coverage of its referred instances minus
    mean coverage of its other instances."""
    out = []
    for sample in np.unique(per.sample):
        mine = per.sample == sample
        referred, other = per.coverage[mine & per.referred], per.coverage[mine & ~per.referred]
        if len(referred) and len(other):
            out.append(referred.mean(axis=0) - other.mean(axis=0))
    return np.stack(out) if out else np.zeros((0, per.coverage.shape[1]))


def coverage_curve(codes: SparseCodes, token_types, image_grid, token_sample_index, instance_masks: Sequence,
                   grid_shape, k_percents: Sequence[float] = DEFAULT_K_PERCENTS, *,
                   other_masks: Sequence | None = None, magnitude: Magnitude = "l2", seed: int = 0) -> pd.DataFrame:
    """Mean coverage of the referred instances by the top-K% tokens vs the other instances of
    the same images and vs the random-K% expectation, per K.

    Columns: k_percent; coverage, coverage_sem (referred instances); other_coverage,
    other_coverage_sem (the other instances, NaN without `other_masks`); random;
    ratio (= coverage / random); ratio_vs_other (= coverage / other_coverage);
    paired_difference, paired_difference_sem (within-image referred minus other, mean and
    s.e.m. over the n_paired_images images holding both); n_instances, n_other_instances,
    n_paired_images, magnitude. K% of n tokens rounds up, so `random` is slightly above
    K/100 when K/100 * n is not whole.
    """
    per = per_instance_coverage(codes, token_types, image_grid, token_sample_index, instance_masks,
                                grid_shape, k_percents, other_masks=other_masks, magnitude=magnitude, seed=seed)
    n_k = len(k_percents)
    coverage, sem = _mean_sem(per.coverage[per.referred], n_k)
    other, other_sem = _mean_sem(per.coverage[~per.referred], n_k)
    random = _mean_sem(per.random[per.referred], n_k)[0]
    paired = paired_coverage_difference(per)
    difference, difference_sem = _mean_sem(paired, n_k)
    with np.errstate(divide="ignore", invalid="ignore"):  # other instances never covered: inf
        ratio_vs_other = coverage / other
    return pd.DataFrame({"k_percent": np.asarray(k_percents, dtype=float), "coverage": coverage,
                         "coverage_sem": sem, "other_coverage": other, "other_coverage_sem": other_sem,
                         "random": random, "ratio": coverage / random, "ratio_vs_other": ratio_vs_other,
                         "paired_difference": difference, "paired_difference_sem": difference_sem,
                         "n_instances": int(per.referred.sum()), "n_other_instances": int((~per.referred).sum()),
                         "n_paired_images": len(paired), "magnitude": magnitude})


def plot_coverage(table: pd.DataFrame, *, title: str = "Instance coverage vs top-K% (Figure 5)",
                  caveat: str | None = CAVEAT) -> Figure:
    """Top-K% coverage of the referred instances and of the other instances (s.e.m. bands), and
    the random-K% baseline, over K; `caveat` is written under the title."""
    fig, (ax,) = new_figure(height=4.6)
    k = table.k_percent
    magnitude = table.magnitude.iloc[0] if len(table) else "l2"
    n = int(table.n_instances.iloc[0]) if len(table) else 0
    n_other = int(table.n_other_instances.iloc[0]) if len(table) and "n_other_instances" in table else 0
    lines = [("coverage", "coverage_sem", "#d62728", f"referred instances, top-K% by {magnitude} (n={n})")]
    if n_other:
        lines.append(("other_coverage", "other_coverage_sem", "#1f77b4",
                      f"other instances of the same images (n={n_other})"))
    for column, sem_column, colour, label in lines:
        cov, sem = table[column], table[sem_column].fillna(0.0)
        ax.plot(k, cov, marker="o", color=colour, label=label)
        ax.fill_between(k, cov - sem, cov + sem, color=colour, alpha=0.2)
    ax.plot(k, table.random, linestyle="--", color="#7f7f7f", label="random K% (expectation)")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    label_axes(ax, "K: percentage of image tokens kept", "instance pixel coverage (mean over instances)")
    fig.suptitle(subtitled(title, caveat), fontsize="medium")
    ax.legend(loc="lower right", fontsize="small")
    return fig
