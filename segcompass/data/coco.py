"""COCO pieces shared by the RefCOCO/+/g and gRefCOCO loaders: `instances.json`, masks
of annotations (polygons or RLE, via pycocotools), images, and a lazy sample sequence."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from saekit.errors import UserError
from segcompass.data.sample import SegSample


def read_json(path: str | Path) -> Any:
    """Parse a JSON file (UTF-8, then cp1252 as LISA falls back); UserError if missing/bad."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    raw = path.read_bytes()
    for encoding in ("utf-8", "cp1252"):
        try:
            return json.loads(raw.decode(encoding))
        except UnicodeDecodeError:
            continue
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
    raise UserError(f"{path}: neither UTF-8 nor cp1252 text")


class CocoInstances(NamedTuple):
    path: Path
    """The instances.json these came from (named in every error)."""
    images: dict[int, dict]
    """image id -> image record (file_name, height, width, id)."""
    annotations: dict[int, dict]
    """annotation id -> annotation (segmentation, bbox, category_id, image_id, iscrowd)."""
    categories: dict[int, str]
    """category id -> name."""


def read_instances(path: str | Path) -> CocoInstances:
    """Index a COCO instances file by image, annotation and category id."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with 'images' and 'annotations'")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path}: field '{key}' is missing or not a list")
    try:
        images = {int(im["id"]): im for im in data["images"]}
        annotations = {int(a["id"]): a for a in data["annotations"]}
        categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{path}: an image/annotation/category record lacks a valid "
                        f"field ({type(err).__name__}: {err})") from None
    return CocoInstances(path, images, annotations, categories)


def _polygon_parts(seg: list, where: str) -> list[list[float]]:
    parts = []
    for k, poly in enumerate(seg):
        if not isinstance(poly, (list, tuple)) or not all(
                isinstance(c, (int, float)) and not isinstance(c, bool) for c in poly):
            raise UserError(f"{where}: field 'segmentation[{k}]' is not a list of numbers")
        if len(poly) % 2 or len(poly) < 6:
            raise UserError(f"{where}: field 'segmentation[{k}]' is a polygon with "
                            f"{len(poly) / 2:g} points; a polygon needs at least 3 (x, y) pairs")
        parts.append([float(c) for c in poly])
    return parts


def segmentation_mask(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    """(H, W) bool union of a COCO segmentation: polygons (list of [x0, y0, x1, y1, ...]),
    an RLE dict (compressed or not) or a list of RLE dicts. An empty list gives an empty
    mask (as LISA's RefCOCO loader does). `where` names the file/annotation in errors."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list) and len(seg) == 0:
        return np.zeros((height, width), dtype=bool)
    if isinstance(seg, dict):
        seg = [seg]
    if not isinstance(seg, list):
        raise UserError(f"{where}: field 'segmentation' is neither polygons nor RLE")
    if isinstance(seg[0], dict):
        rles = []
        for rle in seg:
            if "counts" not in rle or "size" not in rle:
                raise UserError(f"{where}: RLE 'segmentation' needs 'counts' and 'size'")
            if list(rle["size"]) != [height, width]:
                raise UserError(f"{where}: RLE size {rle['size']} != image size "
                                f"{[height, width]}")
            if isinstance(rle["counts"], list):
                rles.append(mask_utils.frPyObjects(rle, height, width))
            else:
                counts = rle["counts"]
                rles.append({"size": [height, width],
                             "counts": counts.encode() if isinstance(counts, str) else counts})
    else:
        rles = mask_utils.frPyObjects(_polygon_parts(seg, where), height, width)
    decoded = mask_utils.decode(rles)  # (H, W, parts) uint8
    return decoded.any(axis=2)


def annotation_mask(instances: CocoInstances, ann_id: int, height: int, width: int,
                    where: str) -> np.ndarray:
    """(H, W) bool mask of annotation `ann_id`; UserError (naming `where`) if it is absent."""
    ann = instances.annotations.get(ann_id)
    if ann is None:
        raise UserError(f"{where}: field 'ann_id' = {ann_id} is not an annotation id in "
                        f"{instances.path}")
    return segmentation_mask(ann.get("segmentation", []), height, width,
                             f"{instances.path}: annotation {ann_id}")


def image_record(instances: CocoInstances, image_id: int, where: str) -> dict:
    record = instances.images.get(image_id)
    if record is None:
        raise UserError(f"{where}: field 'image_id' = {image_id} is not an image id in "
                        f"{instances.path}")
    return record


def load_image_rgb(path: str | Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB, EXIF orientation applied (as `cv2.imread`, which LISA uses)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {'is a folder, not an image' if path.is_dir() else 'image not found'}")
    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except (OSError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot read the image ({err})") from None


def load_coco_image(image_dir: Path, record: dict, where: str) -> np.ndarray:
    """The image of an instances.json record, checked against its height/width."""
    file_name = record.get("file_name") or "COCO_train2014_%012d.jpg" % int(record["id"])
    image = load_image_rgb(image_dir / file_name)
    expected = (int(record["height"]), int(record["width"]))
    if image.shape[:2] != expected:
        raise UserError(f"{image_dir / file_name}: image is {image.shape[1]}x{image.shape[0]} "
                        f"but {where} says {expected[1]}x{expected[0]}")
    return image


def check_image_files(image_dir: Path, instances: CocoInstances, image_ids: Iterable[int], where: str) -> None:
    """UserError naming the first missing image file (and how many are missing) among the
    images of `image_ids`, before any sample is built: a long run fails at its start."""
    missing = []
    for image_id in dict.fromkeys(int(i) for i in image_ids):
        record = image_record(instances, image_id, where)
        file_name = record.get("file_name") or "COCO_train2014_%012d.jpg" % image_id
        if not (image_dir / file_name).is_file():
            missing.append(image_dir / file_name)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"{missing[0]}: image not found{more}; {where} refers to it")


class LazySamples(Sequence):
    """A sequence of SegSamples built on access from `records` by `build(record)`."""

    def __init__(self, records: Sequence[Any], build: Callable[[Any], SegSample]):
        self.records = list(records)
        self._build = build

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> SegSample:  # type: ignore[override]
        return self._build(self.records[index])

    def __iter__(self) -> Iterator[SegSample]:
        for record in self.records:
            yield self._build(record)
