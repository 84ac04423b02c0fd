"""Write any iterable of SegSamples in the three real formats, so the real loaders read them.

- `export_refcoco`: `<root>/<dataset>/refs(<split_by>).p` (standard pickle, protocol 2, as
  the refer API's files) + `<root>/<dataset>/instances.json` + JPEG images named
  `COCO_train2014_%012d.jpg` under the refer API's image folder. One target per sample.
- `export_grefcoco`: `<root>/grefcoco/grefs(unc).json` + `instances.json` + images under
  ReLA's folder; any number of targets, `ann_id: [-1]` and `no_target: true` for none.
- `export_reasonseg`: `<folder>/<stem>.jpg|png` + LabelMe-style `<stem>.json` with
  `text`, `is_sentence` and `target` / `ignore` polygons.

Masks become polygons that reproduce them exactly under each format's own rasteriser:

- COCO (pycocotools `frPyObjects`): the pixel-edge outline of each 4-connected
  component, vertices on pixel corners; a pixel is inside iff its centre is, so the
  decode is exact. `segmentation="rle"` writes compressed RLE instead.
- ReasonSeg (LISA's polylines + fillPoly): the chain of boundary pixel centres of each
  component; its outline redraws the boundary pixels and its scan-line fill covers the
  inside (every edge steps by at most one pixel per row, so the fixed-point x is exact).

Neither polygon kind can carry a hole (COCO unions the parts of an annotation; LISA
paints only 1 and 255), so a mask with holes is first cut into hole-free pieces: a
piece with an enclosed background region is split below that region's bottom row,
which opens it, until no piece has one. The round trip is then exact (tests check it
on random and world masks); what the formats cannot carry is dropped and counted:
COCO has no ignore region, and ReasonSeg keeps only the union of the targets (instance
identity survives as each shape's `group_id`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from saekit.atomic import atomic_file, atomic_write_bytes
from saekit.errors import UserError
from segcompass.data.sample import SegSample

_CROSS = ndimage.generate_binary_structure(2, 1)  # 4-connectivity
_SQUARE = ndimage.generate_binary_structure(2, 2)  # 8-connectivity


# ------------------------------------------------------------------ mask -> polygons

def _enclosed_region(mask: np.ndarray, background_structure: np.ndarray) -> np.ndarray | None:
    """(H, W) bool of one background component that does not reach the border, or None."""
    padded = np.pad(~mask, 1, constant_values=True)
    labels, count = ndimage.label(padded, structure=background_structure)
    if count <= 1:
        return None
    outside = labels[0, 0]
    enclosed = [k for k in range(1, count + 1) if k != outside]
    return labels[1:-1, 1:-1] == enclosed[0] if enclosed else None


def hole_free_pieces(mask: np.ndarray, background_structure: np.ndarray) -> list[np.ndarray]:
    """Disjoint (H, W) bool pieces whose union is `mask`, none enclosing background
    (components of ~mask under `background_structure` that miss the border)."""
    pieces, stack = [], [np.asarray(mask, dtype=bool)]
    while stack:
        piece = stack.pop()
        hole = _enclosed_region(piece, background_structure)
        if hole is None:
            pieces.append(piece)
            continue
        bottom = int(np.flatnonzero(hole.any(axis=1))[-1])
        upper, lower = piece.copy(), piece.copy()
        upper[bottom + 1:] = False  # the hole's last row now borders open background
        lower[:bottom + 1] = False
        stack.extend(p for p in (upper, lower) if p.any())
    return pieces


# Each boundary side of a foreground pixel (r, c) as a directed edge between corners
# (x, y), oriented so the edges of one pixel chain into a cycle around it.
_SIDES = (  # (neighbour dr, dc), start corner (dx, dy), end corner (dx, dy)
    ((-1, 0), (1, 0), (0, 0)),  # top: right-to-left
    ((0, -1), (0, 0), (0, 1)),  # left: downwards
    ((1, 0), (0, 1), (1, 1)),  # bottom: left-to-right
    ((0, 1), (1, 1), (1, 0)),  # right: upwards
)


def boundary_cycles(mask: np.ndarray) -> list[np.ndarray]:
    """Closed chains of boundary pixel sides of `mask`, one per 4-connected component
    outline (and per enclosed background region, if any).

    Each cycle is (L, 4) int64 [r, c, x, y]: the pixel of each side and the corner where
    the side starts. Where two pixels touch only diagonally the chain stays with the
    pixel it is following, so diagonal neighbours are kept apart (4-connectivity).
    """
    padded = np.pad(np.asarray(mask, dtype=bool), 1)
    rows, cols = np.nonzero(mask)
    sides = []
    for (dr, dc), start, end in _SIDES:
        open_side = ~padded[rows + 1 + dr, cols + 1 + dc]
        r, c = rows[open_side], cols[open_side]
        sides.append(np.stack([r, c, c + start[0], r + start[1], c + end[0], r + end[1]], 1))
    edges = np.concatenate(sides).astype(np.int64)  # (E, 6) [r, c, x0, y0, x1, y1]
    outgoing: dict[tuple[int, int], list[int]] = {}
    for i, (x0, y0) in enumerate(edges[:, 2:4].tolist()):
        outgoing.setdefault((x0, y0), []).append(i)
    used = np.zeros(len(edges), dtype=bool)
    cycles = []
    for first in range(len(edges)):
        if used[first]:
            continue
        chain, i = [], first
        while not used[i]:
            used[i] = True
            chain.append(i)
            options = outgoing[(int(edges[i, 4]), int(edges[i, 5]))]
            if len(options) == 1:
                i = options[0]
            else:  # a corner shared by two diagonal pixels: stay with this pixel
                i = next(j for j in options
                         if edges[j, 0] == edges[i, 0] and edges[j, 1] == edges[i, 1])
        cycles.append(edges[chain][:, :4])
    return cycles


def _drop_collinear(points: np.ndarray) -> np.ndarray:
    """Remove vertices of a closed (L, 2) chain where the step direction does not change."""
    if len(points) < 3:
        return points
    step_in = points - np.roll(points, 1, axis=0)
    step_out = np.roll(points, -1, axis=0) - points
    turn = (step_in[:, 0] * step_out[:, 1] - step_in[:, 1] * step_out[:, 0] != 0) | (
        (step_in * step_out).sum(axis=1) <= 0)
    return points[turn] if turn.any() else points[:1]


def mask_to_coco_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons ([x0, y0, x1, y1, ...], pixel corners) that pycocotools decodes back
    to exactly `mask`."""
    polygons = []
    for piece in hole_free_pieces(mask, _SQUARE):
        for cycle in boundary_cycles(piece):
            corners = _drop_collinear(cycle[:, 2:4])
            polygons.append([float(v) for v in corners.reshape(-1)])
    return polygons


def mask_to_lisa_polygons(mask: np.ndarray) -> list[list[list[int]]]:
    """LabelMe polygons ([[x, y], ...], pixel centres, >= 3 points) that LISA's
    polylines + fillPoly paint back to exactly `mask`."""
    polygons = []
    for piece in hole_free_pieces(mask, _CROSS):
        for cycle in boundary_cycles(piece):
            centres = cycle[:, [1, 0]]  # (L, 2) [x, y] = [c, r]
            keep = np.any(centres != np.roll(centres, 1, axis=0), axis=1)
            centres = centres[keep] if keep.any() else centres[:1]
            centres = _drop_collinear(centres)
            while len(centres) < 3:  # 1- or 2-pixel pieces: repeat a vertex
                centres = np.concatenate([centres, centres[-1:]])
            polygons.append(centres.tolist())
    return polygons


# ------------------------------------------------------------------ shared writing

class ExportSummary(NamedTuple):
    root: Path
    """Folder written."""
    n_samples: int
    n_images: int
    n_annotations: int
    """Distinct instance masks (COCO formats) or shapes written (ReasonSeg)."""
    dropped_ignore: int
    """Samples whose ignore mask the format could not carry."""


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def _write_image(path: Path, image: np.ndarray, jpeg_quality: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    with atomic_file(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(
            tmp, format=fmt, **({"quality": jpeg_quality} if fmt == "JPEG" else {}))


def _target_categories(sample: SegSample) -> list[str]:
    """A category name per target: meta['categories'], else the world inventory's shape."""
    n = len(sample.target_masks)
    names = sample.meta.get("categories")
    if isinstance(names, list) and len(names) == n:
        return [str(x) or "object" for x in names]
    inventory, targets = sample.meta.get("inventory"), sample.meta.get("targets")
    if isinstance(inventory, list) and isinstance(targets, list) and len(targets) == n:
        return [str(inventory[t].get("shape", "object")) for t in targets]
    return ["object"] * n


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _sentences(sample: SegSample, next_sent_id: int) -> list[dict]:
    return [{"tokens": _tokens(t), "raw": t, "sent_id": next_sent_id + k, "sent": t.strip()}
            for k, t in enumerate(sample.instructions)]


class _CocoWriter:
    """Accumulates COCO images / annotations / categories, deduplicating images and masks."""

    def __init__(self, image_dir: Path, segmentation: str, jpeg_quality: int, image_format: str = "jpg"):
        self.image_dir, self.segmentation, self.jpeg_quality = image_dir, segmentation, jpeg_quality
        self.image_format = image_format
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.categories: dict[str, int] = {}
        self._image_ids: dict[str, int] = {}
        self._ann_ids: dict[tuple[int, str], int] = {}

    def image_id(self, image: np.ndarray) -> int:
        key = hashlib.sha1(np.ascontiguousarray(image).tobytes()
                           + str(image.shape).encode()).hexdigest()
        if key not in self._image_ids:
            image_id = len(self._image_ids) + 1
            file_name = "COCO_train2014_%012d.%s" % (image_id, self.image_format)
            _write_image(self.image_dir / file_name, image, self.jpeg_quality)
            self.images.append({"id": image_id, "file_name": file_name,
                                "height": int(image.shape[0]), "width": int(image.shape[1])})
            self._image_ids[key] = image_id
        return self._image_ids[key]

    def ann_id(self, image_id: int, mask: np.ndarray, category: str) -> int:
        key = (image_id, hashlib.sha1(np.packbits(mask).tobytes()).hexdigest())
        if key not in self._ann_ids:
            cat_id = self.categories.setdefault(category, len(self.categories) + 1)
            self._ann_ids[key] = ann_id = len(self._ann_ids) + 1
            self.annotations.append(_coco_annotation(ann_id, image_id, cat_id, mask,
                                                     self.segmentation))
        return self._ann_ids[key]

    def instances(self) -> dict:
        return {"info": {"description": "written by segcompass.data.export"},
                "images": self.images, "annotations": self.annotations,
                "categories": [{"id": i, "name": n, "supercategory": n}
                               for n, i in self.categories.items()]}


def _coco_annotation(ann_id: int, image_id: int, cat_id: int, mask: np.ndarray,
                     segmentation: str) -> dict:
    ys, xs = np.nonzero(mask)
    bbox = ([float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
             float(ys.max() - ys.min() + 1)] if len(xs) else [0.0, 0.0, 0.0, 0.0])
    if segmentation == "rle":
        from pycocotools import mask as mask_utils
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        seg: Any = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
    else:
        seg = mask_to_coco_polygons(mask)
    return {"id": ann_id, "image_id": image_id, "category_id": cat_id, "iscrowd": 0,
            "area": float(mask.sum()), "bbox": bbox, "segmentation": seg}


def _check_sample(sample: SegSample) -> None:
    h, w = sample.image.shape[:2]
    if sample.target_masks.shape[1:] != (h, w):
        raise UserError(f"sample {sample.sample_id}: target masks {sample.target_masks.shape} "
                        f"do not match its {w}x{h} image")


# ------------------------------------------------------------------ the three formats

def _export_coco_refs(samples: Iterable[SegSample], writer: _CocoWriter, multi: bool,
                      default_split: str) -> tuple[list[dict], int, int]:
    refs, sent_id, dropped = [], 0, 0
    for sample in samples:
        _check_sample(sample)
        if not multi and len(sample.target_masks) != 1:
            raise UserError(f"sample {sample.sample_id} has {len(sample.target_masks)} targets; "
                            "RefCOCO refs have exactly one (use export_grefcoco)")
        dropped += int(sample.ignore_mask is not None and bool(np.any(sample.ignore_mask)))
        image_id = writer.image_id(sample.image)
        cats = _target_categories(sample)
        ann_ids = [writer.ann_id(image_id, np.asarray(m, bool), c)
                   for m, c in zip(sample.target_masks, cats)]
        cat_ids = [writer.categories[c] for c in cats]
        sentences = _sentences(sample, sent_id)
        sent_id += len(sentences)
        ref = {"ref_id": len(refs), "image_id": image_id,
               "split": str(sample.meta.get("split", default_split)),
               "sentences": sentences, "sent_ids": [s["sent_id"] for s in sentences]}
        if multi:
            ref.update(ann_id=ann_ids or [-1], category_id=cat_ids or [-1],
                       no_target=not ann_ids,
                       file_name="COCO_train2014_%012d.jpg" % image_id)
        else:
            ref.update(ann_id=ann_ids[0], category_id=cat_ids[0],
                       file_name="COCO_train2014_%012d_%d.jpg" % (image_id, ann_ids[0]))
        refs.append(ref)
    return refs, dropped, len(refs)


def export_refcoco(samples: Iterable[SegSample], root: str | Path, *, dataset: str = "refcoco",
                   split_by: str = "unc", segmentation: Literal["polygon", "rle"] = "polygon",
                   image_dir: str | Path | None = None, default_split: str = "val",
                   jpeg_quality: int = 95, image_format: Literal["jpg", "png"] = "jpg") -> ExportSummary:
    """RefCOCO-style dataset under `root`; a sample's split is `meta['split']`. `image_format`
    png writes lossless `COCO_train2014_%012d.png` files (instances.json names them)."""
    from segcompass.data.refcoco import default_image_dir

    root = Path(root)
    writer = _CocoWriter(Path(image_dir) if image_dir else default_image_dir(root),
                         segmentation, jpeg_quality, image_format)
    refs, dropped, n = _export_coco_refs(samples, writer, False, default_split)
    _write_atomic(root / dataset / f"refs({split_by}).p", pickle.dumps(refs, protocol=2))
    _write_atomic(root / dataset / "instances.json", json.dumps(writer.instances()).encode())
    return ExportSummary(root, n, len(writer.images), len(writer.annotations), dropped)


def export_grefcoco(samples: Iterable[SegSample], root: str | Path, *,
                    segmentation: Literal["polygon", "rle"] = "polygon",
                    image_dir: str | Path | None = None, default_split: str = "val",
                    jpeg_quality: int = 95, dataset: str = "grefcoco",
                    image_format: Literal["jpg", "png"] = "jpg") -> ExportSummary:
    """gRefCOCO-style dataset under `root` (multi-target and no-target refs); `image_format`
    as `export_refcoco`."""
    from segcompass.data.grefcoco import default_image_dir

    root = Path(root)
    writer = _CocoWriter(Path(image_dir) if image_dir else default_image_dir(root),
                         segmentation, jpeg_quality, image_format)
    refs, dropped, n = _export_coco_refs(samples, writer, True, default_split)
    _write_atomic(root / dataset / "grefs(unc).json", json.dumps(refs).encode())
    _write_atomic(root / dataset / "instances.json", json.dumps(writer.instances()).encode())
    return ExportSummary(root, n, len(writer.images), len(writer.annotations), dropped)


def _stem(sample_id: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id) or "sample"
    candidate, k = stem, 1
    while candidate in taken:
        candidate, k = f"{stem}_{k}", k + 1
    taken.add(candidate)
    return candidate


def reasonseg_shapes(sample: SegSample) -> list[dict]:
    """LabelMe shapes of a sample: `target` polygons of each instance (minus ignored
    pixels, group_id = instance index), then `ignore` polygons."""
    ignore = (np.zeros(sample.image.shape[:2], bool) if sample.ignore_mask is None
              else np.asarray(sample.ignore_mask, bool))
    shapes = []
    for k, mask in enumerate(sample.target_masks):
        for poly in mask_to_lisa_polygons(np.asarray(mask, bool) & ~ignore):
            shapes.append({"label": "target", "points": poly, "group_id": k,
                           "shape_type": "polygon", "flags": {}})
    for poly in mask_to_lisa_polygons(ignore):
        shapes.append({"label": "ignore", "points": poly, "group_id": None,
                       "shape_type": "polygon", "flags": {}})
    return shapes


def export_reasonseg(samples: Iterable[SegSample], folder: str | Path, *,
                     image_format: Literal["jpg", "png"] = "jpg",
                     jpeg_quality: int = 95) -> ExportSummary:
    """ReasonSeg-style folder: `<stem>.<image_format>` + `<stem>.json` per sample."""
    folder = Path(folder)
    taken: set[str] = set()
    n = n_shapes = 0
    for sample in samples:
        _check_sample(sample)
        stem = _stem(sample.sample_id, taken)
        shapes = reasonseg_shapes(sample)
        h, w = sample.image.shape[:2]
        anno = {"text": list(sample.instructions),
                "is_sentence": bool(sample.meta.get("is_sentence", False)),
                "shapes": shapes, "imagePath": f"{stem}.{image_format}",
                "imageHeight": int(h), "imageWidth": int(w)}
        _write_image(folder / f"{stem}.{image_format}", sample.image, jpeg_quality)
        _write_atomic(folder / f"{stem}.json", json.dumps(anno).encode())
        n, n_shapes = n + 1, n_shapes + len(shapes)
    return ExportSummary(folder, n, n, n_shapes, 0)
