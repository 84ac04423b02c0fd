"""Pixel-exact polygon rasterisation as LISA's ReasonSeg loader does it, in numpy.

LISA's `utils/data_processing.py::get_mask_from_json` turns LabelMe polygons into the
ground-truth label map with OpenCV:

    pts = np.array([points], dtype=np.int32)          # vertices truncated toward zero
    cv2.polylines(mask, pts, True, value, 1)          # closed 1-pixel outline (LINE_8)
    cv2.fillPoly(mask, pts, value)                    # scan-line fill

shapes sorted by the area of their own raster, largest drawn first (so a smaller shape
drawn later wins), label containing "ignore" -> 255, "flag" skipped, anything else -> 1.
Published ReasonSeg gIoU/cIoU are computed against that map, so matching it pixel for
pixel is what makes our scores comparable. OpenCV is not a dependency: the two drawing
primitives are re-implemented here from OpenCV's `imgproc/src/drawing.cpp` for the case
LISA uses (integer vertices, `shift=0`, thickness 1, 8-connected lines):

- a line is OpenCV's `LineIterator` (8-connected Bresenham, drawn left to right, end
  points first clipped to the image by `clipLine`);
- `fillPoly` draws every edge as such a line, then fills each scan line y between pairs
  of edge crossings sorted by x. An edge covers rows [y_top, y_bottom); its 16.16
  fixed-point x starts at x_top + 1/2 and steps by trunc((x_bottom - x_top) * 2^16 /
  (y_bottom - y_top)) per row (an edge leaving the image is re-derived from its clipped
  end points, without the 1/2); a span covers pixels floor(x_left) .. floor(x_right);
- `polylines` draws the same edge lines again, so the union is fill + outline.

These are the semantics of OpenCV 4.x (checked pixel for pixel against 4.8.0, the version
LISA pins, and 4.10.0). OpenCV 5.0 changed the fill (no 1/2 offset, ceil on the left), so
masks drawn with 5.x differ on some boundary pixels; LISA's published numbers predate it.

`line_pixels`/`fill_poly_mask` compute every line pixel and every edge crossing of every
scan line at once with array arithmetic (the spans are then written as slices);
`reference_line_pixels` and `reference_fill_poly` are line-by-line ports of the C loops
(active edge list, bubble sort) kept as the slow references the tests hold them to; tests also hold both
to label maps drawn by real OpenCV 4.8 (`tests/fixtures/lisa-raster/`).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

XY_SHIFT = 16
XY_ONE = 1 << XY_SHIFT

IGNORE_VALUE = 255
"""Label value of `ignore` shapes in LISA's map (excluded from every metric)."""
TARGET_VALUE = 1


def vertices_int32(points: Sequence[Sequence[float]]) -> np.ndarray:
    """(N, 2) float [x, y] points -> (N, 2) int32, truncated toward zero as
    `np.array([points], dtype=np.int32)` does in LISA."""
    arr = np.asarray(points, dtype=np.float64)
    return arr.astype(np.int32).reshape(-1, 2)


# ----------------------------------------------------------------------------- lines

def clip_line(x1: int, y1: int, x2: int, y2: int, width: int, height: int
              ) -> tuple[bool, int, int, int, int]:
    """OpenCV `clipLine(Size, pt1, pt2)`: clip the segment to [0, w-1] x [0, h-1].

    Returns (inside, x1, y1, x2, y2); the arithmetic (truncating division, in the order
    OpenCV mutates the end points) is kept so the clipped pixels match.
    """
    if width <= 0 or height <= 0:
        return False, x1, y1, x2, y2
    right, bottom = width - 1, height - 1
    c1 = (x1 < 0) + (x1 > right) * 2 + (y1 < 0) * 4 + (y1 > bottom) * 8
    c2 = (x2 < 0) + (x2 > right) * 2 + (y2 < 0) * 4 + (y2 > bottom) * 8
    if (c1 & c2) == 0 and (c1 | c2) != 0:
        if c1 & 12:
            a = 0 if c1 < 8 else bottom
            x1 += int(float(a - y1) * (x2 - x1) / (y2 - y1))
            y1 = a
            c1 = (x1 < 0) + (x1 > right) * 2
        if c2 & 12:
            a = 0 if c2 < 8 else bottom
            x2 += int(float(a - y2) * (x2 - x1) / (y2 - y1))
            y2 = a
            c2 = (x2 < 0) + (x2 > right) * 2
        if (c1 & c2) == 0 and (c1 | c2) != 0:
            if c1:
                a = 0 if c1 == 1 else right
                y1 += int(float(a - x1) * (y2 - y1) / (x2 - x1))
                x1 = a
                c1 = 0
            if c2:
                a = 0 if c2 == 1 else right
                y2 += int(float(a - x2) * (y2 - y1) / (x2 - x1))
                x2 = a
                c2 = 0
    return (c1 | c2) == 0, x1, y1, x2, y2


def _clipped_segments(starts: np.ndarray, ends: np.ndarray, height: int, width: int
                      ) -> np.ndarray:
    """(E, 2) [x, y] start/end points -> (E', 4) [x0, y0, x1, y1] after OpenCV's clipping
    (segments entirely outside are dropped)."""
    segs = np.concatenate([starts, ends], axis=1).astype(np.int64)  # (E, 4)
    outside = ((segs[:, [0, 2]] < 0) | (segs[:, [0, 2]] >= width)
               | (segs[:, [1, 3]] < 0) | (segs[:, [1, 3]] >= height)).any(axis=1)
    keep = np.ones(len(segs), dtype=bool)
    for i in np.flatnonzero(outside):  # few edges leave the image: scalar path is fine
        inside, *clipped = clip_line(*(int(v) for v in segs[i]), width, height)
        keep[i] = inside
        segs[i] = clipped
    return segs[keep]


def line_pixels(starts: np.ndarray, ends: np.ndarray, height: int, width: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of OpenCV 8-connected lines from `starts[i]` to `ends[i]` ((E, 2) [x, y]).

    Returns (ys, xs) int64 arrays of all pixels of all lines (with repeats).
    Closed form of `LineIterator`: along the major axis step k = 0..D the minor offset is
    ceil((2 d k - D) / (2 D)) = (2 d k + D - 1) // (2 D), which is where its error term
    err = D - 2d, err += -2d (+2D when err < 0) steps the minor axis.
    """
    segs = _clipped_segments(np.asarray(starts).reshape(-1, 2),
                             np.asarray(ends).reshape(-1, 2), height, width)
    if len(segs) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    swap = segs[:, 2] < segs[:, 0]  # drawn left to right: start at the smaller x
    segs[swap] = segs[swap][:, [2, 3, 0, 1]]
    x0, y0, x1, y1 = segs.T
    dx, dy = x1 - x0, y1 - y0  # dx >= 0
    sy = np.where(dy < 0, -1, 1)
    ady = np.abs(dy)
    y_major = ady > dx
    major_len = np.where(y_major, ady, dx)  # D
    minor_len = np.where(y_major, dx, ady)  # d
    counts = major_len + 1
    seg_of = np.repeat(np.arange(len(segs)), counts)  # (P,)
    k = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)  # (P,)
    big_d, small_d = major_len[seg_of], minor_len[seg_of]
    minor = (2 * small_d * k + big_d - 1) // np.maximum(2 * big_d, 1)
    minor = np.where(big_d == 0, 0, minor)
    ym = y_major[seg_of]
    xs = x0[seg_of] + np.where(ym, minor, k)
    ys = y0[seg_of] + sy[seg_of] * np.where(ym, k, minor)
    return ys, xs


def polyline_mask(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool of `cv2.polylines(mask, [vertices], True, 1, 1)`."""
    mask = np.zeros((height, width), dtype=bool)
    v = np.asarray(vertices, dtype=np.int64).reshape(-1, 2)
    ys, xs = line_pixels(np.roll(v, 1, axis=0), v, height, width)  # edges (v[i-1], v[i])
    mask[ys, xs] = True
    return mask


# ----------------------------------------------------------------------------- fill

class _Edges(NamedTuple):
    y0: np.ndarray  # (E,) top row (inclusive)
    y1: np.ndarray  # (E,) bottom row (exclusive)
    x: np.ndarray   # (E,) 16.16 fixed-point x at row y0
    dx: np.ndarray  # (E,) 16.16 fixed-point x step per row


def _poly_edges(v: np.ndarray, height: int, width: int) -> _Edges:
    """OpenCV 4.x `CollectPolyEdges` (shift 0) for one closed polygon, horizontal edges
    dropped. An edge inside the image gets its fixed-point x offset by +1/2; an edge with
    an end point outside is re-derived from its `clipLine`-clipped end points (when they
    still span several rows), with no offset."""
    p0 = np.roll(v, 1, axis=0).astype(np.int64)  # edge i goes from v[i-1] to v[i]
    p1 = v.astype(np.int64)
    keep = p0[:, 1] != p1[:, 1]
    p0, p1 = p0[keep], p1[keep]
    # (E, 2) [x_fixed, y] of the end points used for the slope ("pt0c", "pt1c").
    c0 = np.stack([(p0[:, 0] << XY_SHIFT) + (XY_ONE >> 1), p0[:, 1]], axis=1)
    c1 = np.stack([(p1[:, 0] << XY_SHIFT) + (XY_ONE >> 1), p1[:, 1]], axis=1)
    ends = np.concatenate([p0, p1], axis=1)
    outside = ((ends[:, [0, 2]] < 0) | (ends[:, [0, 2]] >= width)
               | (ends[:, [1, 3]] < 0) | (ends[:, [1, 3]] >= height)).any(axis=1)
    for i in np.flatnonzero(outside):  # rare: scalar path
        _, tx0, ty0, tx1, ty1 = clip_line(*(int(c) for c in ends[i]), width, height)
        if ty0 != ty1:
            c0[i], c1[i] = (tx0 << XY_SHIFT, ty0), (tx1 << XY_SHIFT, ty1)
        else:
            c0[i], c1[i] = (p0[i, 0] << XY_SHIFT, p0[i, 1]), (p1[i, 0] << XY_SHIFT, p1[i, 1])
    num, den = c1[:, 0] - c0[:, 0], c1[:, 1] - c0[:, 1]
    dx = np.sign(num) * np.sign(den) * (np.abs(num) // np.abs(den))  # C division truncates
    top_is_p0 = p0[:, 1] < p1[:, 1]
    y0 = np.where(top_is_p0, p0[:, 1], p1[:, 1])
    y1 = np.where(top_is_p0, p1[:, 1], p0[:, 1])
    top_c = np.where(top_is_p0[:, None], c0, c1)
    x = top_c[:, 0] + (y0 - top_c[:, 1]) * dx  # start x corrected for clipped edges
    return _Edges(y0, y1, x, dx)


def _fill_spans(edges: _Edges, height: int, width: int) -> np.ndarray:
    """(H, W) bool scan-line fill (`FillEdgeCollection`) without the edge lines."""
    mask = np.zeros((height, width), dtype=bool)
    if len(edges.y0) < 2:
        return mask
    rows = np.minimum(edges.y1, height) - edges.y0  # rows each edge is active below height
    rows = np.maximum(rows, 0)
    edge_of = np.repeat(np.arange(len(rows)), rows)  # (P,)
    step = np.arange(rows.sum()) - np.repeat(np.cumsum(rows) - rows, rows)  # (P,)
    y = edges.y0[edge_of] + step
    x = edges.x[edge_of] + step * edges.dx[edge_of]  # (P,) fixed point
    visible = y >= 0
    y, x = y[visible], x[visible]
    order = np.lexsort((x, y))  # by row, then x: the active list is sorted by x
    y, x = y[order], x[order]
    if len(y) == 0:
        return mask
    row_start = np.searchsorted(y, y, side="left")
    rank = np.arange(len(y)) - row_start
    if np.any(np.bincount(y - y.min()) % 2):
        raise AssertionError("odd number of edge crossings on a scan line")
    left, right = x[rank % 2 == 0], x[rank % 2 == 1]
    rows_lr = y[rank % 2 == 0]
    x_lo = left >> XY_SHIFT  # the edges carry the +1/2 offset: floor(x + 1/2)
    x_hi = right >> XY_SHIFT
    ok = (x_lo < width) & (x_hi >= 0) & (x_lo <= x_hi)
    x_lo = np.maximum(x_lo[ok], 0)
    x_hi = np.minimum(x_hi[ok], width - 1)
    rows_lr = rows_lr[ok]
    # One slice per span: spans are few (about two per row) and a slice is a memset,
    # cheaper than any per-pixel vectorisation once shapes get large.
    for row, lo, hi in zip(rows_lr.tolist(), x_lo.tolist(), x_hi.tolist()):
        mask[row, lo:hi + 1] = True
    return mask


def fill_poly_mask(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool of `cv2.fillPoly(mask, [vertices], 1)` (which also draws the edges)."""
    v = np.asarray(vertices, dtype=np.int64).reshape(-1, 2)
    mask = _fill_spans(_poly_edges(v, height, width), height, width)
    ys, xs = line_pixels(np.roll(v, 1, axis=0), v, height, width)
    mask[ys, xs] = True
    return mask


def lisa_shape_mask(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W) bool raster of one shape as LISA draws it: polylines + fillPoly.

    In OpenCV 4.x fillPoly already draws each edge with the same `Line(prev, cur)` call
    that polylines makes, so the outline adds no pixel (the golden-file test checks it)
    and fillPoly alone is drawn.
    """
    return fill_poly_mask(vertices, height, width)


class LisaRaster(NamedTuple):
    label_map: np.ndarray
    """(H, W) uint8: 0 background, 1 target, 255 ignore (LISA's ground-truth map)."""
    shape_masks: list[np.ndarray]
    """(H, W) bool raster of each kept shape on its own, in input order."""
    draw_order: list[int]
    """Indices into the kept shapes in the order they were painted."""


def lisa_label_map(shapes: Sequence[tuple[str, np.ndarray]], height: int, width: int
                   ) -> LisaRaster:
    """Paint `(label, (N, 2) int32 vertices)` shapes exactly as LISA's get_mask_from_json.

    Callers drop "flag" shapes first (LISA skips them before sorting).
    """
    shape_masks = [lisa_shape_mask(v, height, width) for _, v in shapes]
    # LISA: areas are uint8 mask sums (uint64); argsort (default kind) reversed.
    areas = np.array([m.sum() for m in shape_masks], dtype=np.uint64)
    order = [int(i) for i in np.argsort(areas)[::-1]]
    label_map = np.zeros((height, width), dtype=np.uint8)
    for i in order:
        value = IGNORE_VALUE if "ignore" in shapes[i][0].lower() else TARGET_VALUE
        label_map[shape_masks[i]] = value
    return LisaRaster(label_map, shape_masks, order)


# ------------------------------------------------------------------ slow references

def reference_line_pixels(x1: int, y1: int, x2: int, y2: int, height: int, width: int
                          ) -> list[tuple[int, int]]:
    """Literal port of OpenCV's LineIterator (8-connectivity, left_to_right) -> [(y, x)]."""
    if not (0 <= x1 < width and 0 <= x2 < width and 0 <= y1 < height and 0 <= y2 < height):
        inside, x1, y1, x2, y2 = clip_line(x1, y1, x2, y2, width, height)
        if not inside:
            return []
    dx, dy = x2 - x1, y2 - y1
    if dx < 0:  # left_to_right: swap the end points
        dx, dy, x1, y1 = -dx, -dy, x2, y2
    step_x, step_y = (1, 0), (0, 1 if dy >= 0 else -1)
    dy = abs(dy)
    major, minor = step_x, step_y
    if dy > dx:
        dx, dy = dy, dx
        major, minor = minor, major
    err, plus_delta, minus_delta = dx - 2 * dy, 2 * dx, -2 * dy
    x, y, out = x1, y1, []
    for _ in range(dx + 1):
        out.append((y, x))
        take_minor = err < 0
        err += minus_delta + (plus_delta if take_minor else 0)
        x += major[0] + (minor[0] if take_minor else 0)
        y += major[1] + (minor[1] if take_minor else 0)
    return out


def reference_fill_poly(vertices: np.ndarray, height: int, width: int) -> np.ndarray:
    """Slow port of `cv2.fillPoly` (edge lines + FillEdgeCollection with its active edge
    list and bubble sort), for parity tests of `fill_poly_mask`."""
    v = [(int(x), int(y)) for x, y in np.asarray(vertices).reshape(-1, 2)]
    mask = np.zeros((height, width), dtype=bool)
    edges = []
    for i in range(len(v)):
        (xa, ya), (xb, yb) = v[i - 1], v[i]
        for yy, xx in reference_line_pixels(xa, ya, xb, yb, height, width):
            mask[yy, xx] = True
        c0 = [(xa << XY_SHIFT) + (XY_ONE >> 1), ya]  # pt0c
        c1 = [(xb << XY_SHIFT) + (XY_ONE >> 1), yb]  # pt1c
        if not (0 <= xa < width and 0 <= xb < width and 0 <= ya < height and 0 <= yb < height):
            _, tx0, ty0, tx1, ty1 = clip_line(xa, ya, xb, yb, width, height)
            if ty0 != ty1:
                c0, c1 = [tx0 << XY_SHIFT, ty0], [tx1 << XY_SHIFT, ty1]
            else:
                c0, c1 = [xa << XY_SHIFT, ya], [xb << XY_SHIFT, yb]
        if ya == yb:
            continue
        num, den = c1[0] - c0[0], c1[1] - c0[1]
        dx = abs(num) // abs(den) * (1 if (num >= 0) == (den > 0) else -1)
        if ya < yb:
            edges.append([ya, yb, c0[0] + (ya - c0[1]) * dx, dx])  # [y0, y1, x, dx]
        else:
            edges.append([yb, ya, c1[0] + (yb - c1[1]) * dx, dx])
    if len(edges) < 2:
        return mask
    edges.sort(key=lambda e: (e[0], e[2], e[3]))  # CmpEdges: y0, x, dx
    active: list[list[int]] = []
    nxt = 0
    y_max = min(max(e[1] for e in edges), height)
    for y in range(edges[0][0], y_max):
        active = [e for e in active if e[1] != y]
        while nxt < len(edges) and edges[nxt][0] == y:  # insert keeping x order
            e, pos = edges[nxt], 0
            while pos < len(active) and active[pos][2] < e[2]:
                pos += 1
            active.insert(pos, e)
            nxt += 1
        for a, b in zip(active[0::2], active[1::2]):
            if y >= 0:
                lo, hi = (b, a) if a[2] > b[2] else (a, b)
                x1 = lo[2] >> XY_SHIFT  # non-antialiased: delta 0
                x2 = hi[2] >> XY_SHIFT
                if x1 < width and x2 >= 0:
                    mask[y, max(x1, 0):min(x2, width - 1) + 1] = True
            a[2] += a[3]
            b[2] += b[3]
        for i in range(len(active)):  # bubble sort by x
            for j in range(len(active) - 1 - i):
                if active[j][2] > active[j + 1][2]:
                    active[j], active[j + 1] = active[j + 1], active[j]
    return mask
