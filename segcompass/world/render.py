"""Rendering of the embedded world: shape stencils, textured backgrounds, occlusion-aware painting.

Everything here is vectorised numpy on precomputed stencils (one boolean array per
shape × size), so a 128×128 scene with 7 objects renders in well under a millisecond.
Instance masks are the *visible* pixels after painting in order (later objects occlude
earlier ones); a scene whose objects are hidden below a visible-area fraction is rejected
by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import numpy as np

IMAGE_SIZE = 128
"""Side of every world image in pixels."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
"""Shape names. Hexagons were left out on purpose: at the 64-pixel resolution the tiny
policy sees, a hexagon and a circle differ by a few pixels."""

SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles",
    "diamond": "diamonds", "star": "stars", "cross": "crosses",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 55),
    "blue": (35, 75, 220),
    "yellow": (240, 215, 30),
    "purple": (145, 50, 190),
    "white": (245, 245, 245),
}
"""Colour name -> RGB. Saturated hues plus white against a grey, low-saturation background
(every pair differs by >= 90 in some channel, so jitter and noise never confuse them)."""

SIZES: dict[str, int] = {"small": 10, "medium": 14, "large": 19}
"""Size label -> stencil radius in pixels at 128×128 (diameters 21 / 29 / 39)."""

SIZE_RANK: dict[str, int] = {"small": 0, "medium": 1, "large": 2}


def _polygon_inside(xs: np.ndarray, ys: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """(H, W) bool: even-odd ray casting of points (xs, ys) against a closed polygon (V, 2)."""
    inside = np.zeros(xs.shape, dtype=bool)
    x0, y0 = vertices[-1]
    for x1, y1 in vertices:
        crosses = (y1 > ys) != (y0 > ys)
        x_at = (x0 - x1) * (ys - y1) / np.where(y0 == y1, 1e-9, y0 - y1) + x1
        inside ^= crosses & (xs < x_at)
        x0, y0 = x1, y1
    return inside


def _star_vertices(radius: float) -> np.ndarray:
    """(10, 2) vertices of a five-pointed star pointing up, inner radius 0.45 R."""
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, radius, 0.45 * radius)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


@lru_cache(maxsize=None)
def stencil(shape: str, size: str) -> np.ndarray:
    """(2r+1, 2r+1) bool mask of `shape` at `size`, centred; cached, read-only."""
    r = SIZES[size]
    coords = np.arange(-r, r + 1, dtype=np.float64)
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # (2r+1, 2r+1) each
    if shape == "circle":
        mask = xs**2 + ys**2 <= r * r
    elif shape == "square":
        half = 0.82 * r
        mask = (np.abs(xs) <= half) & (np.abs(ys) <= half)
    elif shape == "diamond":
        mask = np.abs(xs) + np.abs(ys) <= r
    elif shape == "triangle":
        vertices = np.array([[0.0, -r], [r, 0.8 * r], [-r, 0.8 * r]])
        mask = _polygon_inside(xs, ys, vertices)
    elif shape == "star":
        mask = _polygon_inside(xs, ys, _star_vertices(r + 0.5))
    elif shape == "cross":
        arm = 0.34 * r
        mask = ((np.abs(xs) <= arm) & (np.abs(ys) <= r)) | ((np.abs(ys) <= arm) & (np.abs(xs) <= r))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    mask.setflags(write=False)
    return mask


class Placement(NamedTuple):
    """One object to paint: what, and where its stencil's centre goes."""

    shape: str
    colour: str
    size: str
    cy: int
    """Row of the stencil centre in pixels."""
    cx: int
    """Column of the stencil centre in pixels."""


class Layout(NamedTuple):
    """Which object is visible where, before any colour is drawn."""

    labels: np.ndarray
    """(H, W) int16: index of the object visible at each pixel, -1 for background."""
    areas: np.ndarray
    """(N,) int64 visible pixel count of each object."""
    full_areas: np.ndarray
    """(N,) int64 stencil pixel count of each object (its area before occlusion)."""


def _window(obj: Placement) -> tuple[slice, slice]:
    """(rows, cols) of the image covered by an object's stencil."""
    r = SIZES[obj.size]
    return slice(obj.cy - r, obj.cy + r + 1), slice(obj.cx - r, obj.cx + r + 1)


def layout(placements: list[Placement], size: int = IMAGE_SIZE) -> Layout:
    """Stamp stencils in list order (later objects occlude earlier ones) into a label map."""
    labels = np.full((size, size), -1, dtype=np.int16)
    full_areas = np.zeros(len(placements), dtype=np.int64)
    for index, obj in enumerate(placements):
        mask = stencil(obj.shape, obj.size)
        labels[_window(obj)][mask] = index
        full_areas[index] = int(mask.sum())
    areas = np.bincount(labels.ravel() + 1, minlength=len(placements) + 1)[1:]  # drop background
    labels.setflags(write=False)
    return Layout(labels, areas, full_areas)


_BLOCK = 8
"""Side in pixels of the background's texture blocks."""
_NOISE = 7
"""Per-pixel noise amplitude."""


@lru_cache(maxsize=None)
def _block_ids(size: int) -> np.ndarray:
    """(size, size) int16 index of the texture block each pixel lies in."""
    cells = np.arange(size) // _BLOCK
    return (cells[:, None] * (size // _BLOCK) + cells[None, :]).astype(np.int16)


def background_shades(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """((size/8)², 3) uint8 shade of each 8×8 background block: one grey, low-saturation tint
    per image plus a random lightness per block, all within [52, 178]."""
    base = rng.integers(80, 150) + rng.integers(-10, 11, size=3)  # (3,)
    shades = base + rng.integers(-18, 19, size=((size // _BLOCK) ** 2, 1))  # (blocks, 3)
    return shades.astype(np.uint8)


def render(placements: list[Placement], scene: Layout, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 image of a layout over a textured background.

    One gather paints everything: pixel p takes row `labels[p]` of the object palette, or
    row N + block(p) of the background shades. Each object gets its colour with a
    per-object jitter; the whole image then gets per-pixel noise, so no colour is
    ever a single exact RGB value. The uint8 arithmetic never wraps: colours are clipped
    to [7, 241], the background lies in [52, 178], and noise is added as [0, 14] to values
    lowered by 7.
    """
    size = scene.labels.shape[0]
    palette = np.array([COLOURS[o.colour] for o in placements]).reshape(-1, 3)  # (N, 3)
    palette += rng.integers(-12, 13, size=palette.shape)
    palette = np.clip(palette, _NOISE, 255 - 2 * _NOISE).astype(np.uint8)
    # The table is shifted down by the noise amplitude so that adding noise in [0, 2A] centres it.
    table = np.concatenate([palette, background_shades(rng, size)]) - np.uint8(_NOISE)  # (N + blocks, 3)
    rows = np.where(scene.labels >= 0, scene.labels, _block_ids(size) + len(placements))  # (H, W)
    image = np.take(table, rows, axis=0)  # (H, W) -> (H, W, 3); np.take is ~4x faster than table[rows]
    noise = np.frombuffer(rng.bytes(image.size), dtype=np.uint8).reshape(image.shape)
    image += noise % np.uint8(2 * _NOISE + 1)
    return image


def instance_masks(labels: np.ndarray, n_objects: int) -> np.ndarray:
    """(N, H, W) bool visible-pixel masks from an (H, W) label map."""
    return labels[None, :, :] == np.arange(n_objects, dtype=labels.dtype)[:, None, None]


def patch_objects(labels: np.ndarray, grid: int, min_cover: float = 0.25) -> np.ndarray:
    """(grid, grid) int64: the object covering most of each image patch, -1 where objects cover
    less than `min_cover` of it (background). The patch grid is the vision tower's token grid."""
    size = labels.shape[0]
    if size % grid:
        raise ValueError(f"image side {size} is not a multiple of the grid {grid}")
    n_objects = int(labels.max()) + 1
    side = size // grid
    # (H, W) -> (grid, side, grid, side): one count per object and patch
    blocks = labels.reshape(grid, side, grid, side)
    counts = np.stack([(blocks == i).sum(axis=(1, 3)) for i in range(n_objects)]) if n_objects else \
        np.zeros((1, grid, grid), dtype=np.int64)  # (N, grid, grid)
    best = counts.argmax(axis=0)
    covered = counts.max(axis=0) >= min_cover * side * side
    return np.where(covered & (n_objects > 0), best, -1).astype(np.int64)


ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLUMNS: tuple[str, ...] = ("left", "centre", "right")


@dataclass(frozen=True, eq=False)
class WorldObject:
    """One painted object; its visible instance mask is read off the scene's label map."""

    index: int
    """Painting order (0 = painted first, may be occluded by any later object)."""
    shape: str
    """One of SHAPES."""
    colour: str
    """One of COLOURS."""
    size: str
    """Size label: 'small', 'medium' or 'large' (the stencil radius, see SIZES)."""
    centre: tuple[float, float]
    """(x, y) pixel centre of the stencil; spatial relations are judged on it."""
    area: int
    """Visible pixel count (after occlusion)."""
    full_area: int
    """Pixel count of the unoccluded stencil."""
    labels: np.ndarray = field(repr=False)
    """(H, W) int16 label map of the whole scene (shared, read-only)."""

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool visible pixels."""
        return self.labels == self.index

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the visible pixels, x1/y1 exclusive ((0, 0, 0, 0) if none)."""
        mask = self.mask
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not len(rows):
            return (0, 0, 0, 0)
        return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)

    @property
    def name(self) -> str:
        """'red square' — unique within a scene (no two objects share colour and shape)."""
        return f"{self.colour} {self.shape}"

    @property
    def position(self) -> str:
        """'top left' … 'bottom right': the 3×3 cell of the image holding the centre."""
        x, y = self.centre
        side = self.labels.shape[0]
        return f"{ROWS[min(int(3 * y / side), 2)]} {COLUMNS[min(int(3 * x / side), 2)]}"

    def attributes(self) -> dict:
        """JSON-able attributes (no mask), as written to exports and SegSample.meta."""
        return {"index": self.index, "shape": self.shape, "colour": self.colour, "size": self.size,
                "centre": list(self.centre), "bbox": list(self.bbox), "area": self.area,
                "full_area": self.full_area, "position": self.position}


def scene_objects(placements: list[Placement], scene: Layout) -> list[WorldObject]:
    """WorldObjects of a layout (masks and boxes are read off the shared label map on demand)."""
    return [WorldObject(index, obj.shape, obj.colour, obj.size, (float(obj.cx), float(obj.cy)),
                        int(scene.areas[index]), int(scene.full_areas[index]), scene.labels)
            for index, obj in enumerate(placements)]
