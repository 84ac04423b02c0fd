"""ReasonSeg (LISA): a folder of `<stem>.jpg` + LabelMe-style `<stem>.json`.

    {"text": ["What in the picture ...?", ...], "is_sentence": true,
     "shapes": [{"label": "target" | "ignore", "points": [[x, y], ...],
                 "shape_type": "polygon", "group_id": ..., ...}, ...]}

The ground truth is LISA's label map (see `rasterize.py`): shapes drawn largest first,
0 background, 1 target, 255 ignore ("ignore" anywhere in the label; "flag" shapes are
skipped). Like LISA the target is one mask, the union of the target shapes; each kept
shape's own raster is kept in `meta["shape_masks"]`. Images are read with their EXIF
orientation applied, as `cv2.imread` does in LISA.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from saekit.errors import UserError
from segcompass.data.coco import LazySamples, load_image_rgb, read_json
from segcompass.data.rasterize import (IGNORE_VALUE, TARGET_VALUE, LisaRaster, lisa_label_map,
                                       vertices_int32)
from segcompass.data.sample import SegSample

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
"""Image files looked for beside `<stem>.json`, in this order (ReasonSeg ships .jpg)."""


class Shape(NamedTuple):
    label: str
    vertices: np.ndarray
    """(N, 2) int32 [x, y], N >= 3, truncated toward zero as LISA does."""
    group_id: int | None


class ReasonSegTruth(NamedTuple):
    raster: LisaRaster
    """LISA's label map plus each shape's own raster."""
    shapes: list[Shape]
    texts: tuple[str, ...]
    is_sentence: bool

    @property
    def target(self) -> np.ndarray:
        """(H, W) bool target pixels (label 1)."""
        return self.raster.label_map == TARGET_VALUE

    @property
    def ignore(self) -> np.ndarray:
        """(H, W) bool ignored pixels (label 255)."""
        return self.raster.label_map == IGNORE_VALUE


MAX_COORDINATE = 2 ** 31
"""Polygon coordinates must fit LISA's int32 (past it the cast is undefined)."""


def find_image(json_path: Path) -> Path:
    """The image beside `json_path` (same stem); UserError if there is none."""
    for suffix in IMAGE_SUFFIXES:
        path = json_path.with_suffix(suffix)
        if path.is_file():
            return path
    raise UserError(f"{json_path}: no image {json_path.stem}{'|'.join(IMAGE_SUFFIXES)} beside it")


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image after EXIF orientation, read from its header only."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            if im.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # rotated by 90 degrees
                width, height = height, width
    except (OSError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot read the image ({err})") from None
    return height, width


def read_shapes(anno: dict, path: Path) -> list[Shape]:
    """The shapes LISA draws ("flag" dropped), each checked: a list of >= 3 finite [x, y]."""
    shapes = anno.get("shapes")
    if not isinstance(shapes, list):
        raise UserError(f"{path}: field 'shapes' is missing or not a list")
    out = []
    for i, shape in enumerate(shapes):
        where = f"{path}: field 'shapes[{i}]"
        if not isinstance(shape, dict) or not isinstance(shape.get("label"), str):
            raise UserError(f"{where}.label' is missing or not a string")
        if shape["label"].lower() == "flag":  # LISA: meaningless deprecated annotations
            continue
        if shape.get("shape_type", "polygon") not in ("polygon", None):
            raise UserError(f"{where}.shape_type' is '{shape['shape_type']}'; only polygons "
                            "are drawn as LISA draws them")
        points = shape.get("points")
        if not isinstance(points, list) or not all(
                isinstance(p, (list, tuple)) and len(p) == 2
                and all(isinstance(c, (int, float)) and not isinstance(c, bool)
                        and math.isfinite(c) and abs(c) < MAX_COORDINATE for c in p) for p in points):
            raise UserError(f"{where}.points' must be a list of finite [x, y] pairs within "
                            f"+-{MAX_COORDINATE} (LISA reads them as int32)")
        if len(points) < 3:
            raise UserError(f"{where}.points' has {len(points)} point(s); a polygon needs "
                            "at least 3")
        out.append(Shape(shape["label"], vertices_int32(points), shape.get("group_id")))
    return out


def read_truth(json_path: str | Path, height: int, width: int) -> ReasonSegTruth:
    """Everything LISA's `get_mask_from_json` returns for an image of size (height, width)."""
    json_path = Path(json_path)
    anno = read_json(json_path)
    if not isinstance(anno, dict):
        raise UserError(f"{json_path}: expected a JSON object")
    texts = anno.get("text")
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise UserError(f"{json_path}: field 'text' must be a list of strings")
    shapes = read_shapes(anno, json_path)
    raster = lisa_label_map([(s.label, s.vertices) for s in shapes], height, width)
    return ReasonSegTruth(raster, shapes, tuple(texts), bool(anno.get("is_sentence", False)))


def build_sample(json_path: Path) -> SegSample:
    image_path = find_image(json_path)
    image = load_image_rgb(image_path)
    truth = read_truth(json_path, *image.shape[:2])
    target = truth.target
    masks = target[None] if target.any() else np.zeros((0, *target.shape), dtype=bool)
    ignore = truth.ignore
    meta = {"is_sentence": truth.is_sentence, "json_path": str(json_path),
            "image_path": str(image_path), "shape_labels": [s.label for s in truth.shapes],
            "shape_group_ids": [s.group_id for s in truth.shapes],
            "shape_masks": truth.raster.shape_masks}
    return SegSample(json_path.stem, image, truth.texts, masks,
                     ignore if ignore.any() else None, "reasonseg", meta)


def list_samples(folder: str | Path) -> list[Path]:
    """Sorted `<stem>.json` files of a ReasonSeg folder, each checked to have its image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: ReasonSeg folder not found")
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise UserError(f"{folder}: no <stem>.json annotations found")
    for path in paths:
        find_image(path)
    return paths


def load_reasonseg(folder: str | Path) -> LazySamples:
    """The samples of a ReasonSeg folder (one per json), built lazily."""
    return LazySamples(list_samples(folder), build_sample)
