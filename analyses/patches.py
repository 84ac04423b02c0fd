"""Geometry shared by the analyses: which pixels an LLM image token covers (+ array helpers).

An image token at (row, col) of a `rows x cols` token grid covers the pixel block
[floor(row*H/rows), floor((row+1)*H/rows)) x [floor(col*W/cols), floor((col+1)*W/cols))
of an H x W image: the blocks tile the image exactly, also when H is not a multiple of rows.
Masks must be given in the frame the model saw (after its processor's resize and crop:
LLaVA-1.5 centre-crops non-square images; the world's square images are not cropped).
"""

from __future__ import annotations

import numpy as np
import torch


def as_numpy(x) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def grid_of(grid_shape, sample: int) -> tuple[int, int]:
    """(rows, cols) of `sample`: `grid_shape` is one (rows, cols) for all samples (LLaVA's
    fixed 24x24) or a sequence of them, one per sample (Qwen2.5-VL's dynamic grids)."""
    if len(grid_shape) == 2 and all(np.isscalar(g) for g in grid_shape):
        return int(grid_shape[0]), int(grid_shape[1])
    rows, cols = grid_shape[sample]
    return int(rows), int(cols)


def rows_by_sample(selected: np.ndarray, token_sample_index: np.ndarray) -> dict[int, np.ndarray]:
    """sample -> ascending token rows where `selected` (N,) bool holds, in one sort (not one
    scan of all N tokens per sample)."""
    rows = np.flatnonzero(selected)
    samples = token_sample_index[rows]
    order = np.argsort(samples, kind="stable")  # keeps rows ascending within a sample
    rows, samples = rows[order], samples[order]
    starts = np.flatnonzero(np.r_[True, samples[1:] != samples[:-1]]) if len(rows) else np.zeros(0, int)
    return {int(samples[a]): rows[a:b] for a, b in zip(starts, [*starts[1:], len(rows)])}


def patch_edges(size: int, cells: int) -> np.ndarray:
    """(cells + 1,) int pixel boundaries of `cells` blocks tiling `size` pixels."""
    if not 1 <= cells <= size:
        raise ValueError(f"cannot tile {size} pixels with {cells} patches (need 1 <= patches <= pixels)")
    return (np.arange(cells + 1) * size) // cells


def patch_pixel_counts(mask: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) int64 number of `mask` pixels inside each patch of an (H, W) mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    rows, cols = grid_shape
    row_edges, col_edges = patch_edges(mask.shape[0], rows), patch_edges(mask.shape[1], cols)
    # reduceat sums the slices [edge_i, edge_{i+1}): (H, W) -> (rows, W) -> (rows, cols)
    per_row = np.add.reduceat(mask.astype(np.int64), row_edges[:-1], axis=0)
    return np.add.reduceat(per_row, col_edges[:-1], axis=1)


def patch_areas(image_shape: tuple[int, int], grid_shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) int64 pixel count of each patch."""
    heights = np.diff(patch_edges(image_shape[0], grid_shape[0]))
    widths = np.diff(patch_edges(image_shape[1], grid_shape[1]))
    return np.outer(heights, widths)


def patch_fractions(mask: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """(rows, cols) float64 fraction of each patch's pixels that lie in an (H, W) mask."""
    mask = np.asarray(mask)
    return patch_pixel_counts(mask, grid_shape) / patch_areas(mask.shape, grid_shape)


def patch_pixel_counts_reference(mask: np.ndarray, grid_shape: tuple[int, int]) -> np.ndarray:
    """Plain double loop over patches (the definition `patch_pixel_counts` is tested against)."""
    mask = np.asarray(mask).astype(bool)
    rows, cols = grid_shape
    height, width = mask.shape
    out = np.zeros((rows, cols), dtype=np.int64)
    for r in range(rows):
        for c in range(cols):
            block = mask[r * height // rows:(r + 1) * height // rows, c * width // cols:(c + 1) * width // cols]
            out[r, c] = int(block.sum())
    return out
