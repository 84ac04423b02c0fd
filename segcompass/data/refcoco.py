"""RefCOCO / RefCOCO+ / RefCOCOg in the refer API's layout (lichengunc/refer, as LISA reads it).

    <root>/<dataset>/refs(<split_by>).p      list of refs, read with a plain-data unpickler
    <root>/<dataset>/instances.json          COCO images / annotations / categories
    <image_dir>/COCO_train2014_%012d.jpg     default <root>/images/mscoco/images/train2014

A ref is {ref_id, ann_id, image_id, split, category_id, file_name, sent_ids,
sentences: [{sent, raw, tokens, sent_id}]}; one ref is one SegSample with all its
sentences as instructions (the `sent` field, as LISA feeds them) and the single
referred instance as its target. Official splits: unc (refcoco, refcoco+) train / val /
testA / testB; umd (refcocog) train / val / test; google (refcoco, refcocog) train / val
(/ test). The splits a file really holds are read from it; any other is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from saekit.errors import UserError
from segcompass.data.coco import (CocoInstances, LazySamples, annotation_mask, check_image_files,
                                  image_record, load_coco_image, read_instances)
from segcompass.data.safe_pickle import load_plain
from segcompass.data.sample import SegSample

KNOWN_SPLIT_BYS: dict[str, tuple[str, ...]] = {
    "refcoco": ("unc", "google"),
    "refcoco+": ("unc",),
    "refcocog": ("umd", "google"),
}
"""Which `refs(<split_by>).p` each dataset ships; the first is the default (LISA's choice)."""

REF_FIELDS = ("ref_id", "ann_id", "image_id", "split", "sentences")
"""Fields every ref record must have."""


def default_image_dir(root: str | Path) -> Path:
    """Where the refer API looks for COCO train2014 images."""
    return Path(root) / "images" / "mscoco" / "images" / "train2014"


def refs_file(root: str | Path, dataset: str, split_by: str | None, stem: str = "refs",
              suffixes: tuple[str, ...] = (".p",)) -> Path:
    """`<root>/<dataset>/<stem>(<split_by>)<suffix>`; UserError listing what exists if absent."""
    folder = Path(root) / dataset
    if not folder.is_dir():
        raise UserError(f"{folder}: dataset folder not found (expected {dataset}/ under {root})")
    if split_by is None:
        split_by = KNOWN_SPLIT_BYS.get(dataset, ("unc",))[0]
    for suffix in suffixes:
        path = folder / f"{stem}({split_by}){suffix}"
        if path.is_file():
            return path
    present = sorted(p.name for p in folder.glob(f"{stem}(*)*"))
    raise UserError(f"{folder}: no {stem}({split_by}){'/'.join(suffixes)}; present: "
                    f"{', '.join(present) or 'none'}")


def check_refs(refs: Any, path: Path) -> list[dict]:
    """The refs as a list of dicts with REF_FIELDS and well-formed sentences."""
    if not isinstance(refs, list):
        raise UserError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):
            raise UserError(f"{path}: ref #{k} is a {type(ref).__name__}, not a dict")
        for field in REF_FIELDS:
            if field not in ref:
                raise UserError(f"{path}: ref #{k} (ref_id {ref.get('ref_id')}) lacks field "
                                f"'{field}'")
        for field in ("image_id", "ann_id"):  # ann_id: a list of ids in gRefCOCO
            value = ref[field]
            ids = value if field == "ann_id" and isinstance(value, list) else [value]
            if not all(_is_id(v) for v in ids):
                raise UserError(f"{path}: ref_id {ref['ref_id']}: field '{field}' = {value!r} is "
                                "not an integer id")
        sentences = ref["sentences"]
        if not isinstance(sentences, list) or not all(
                isinstance(s, dict) and isinstance(s.get("sent", s.get("raw")), str)
                for s in sentences):
            raise UserError(f"{path}: ref_id {ref['ref_id']}: field 'sentences' must be a list "
                            "of {sent, raw, tokens, sent_id} records")
    return refs


def _is_id(value: Any) -> bool:
    """An int, or a str holding one (not a bool or float)."""
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def select_split(refs: list[dict], split: str, path: Path) -> list[dict]:
    """Refs of `split`; UserError listing the splits the file holds if it has none."""
    valid = sorted({str(r["split"]) for r in refs})
    if not valid:
        raise UserError(f"{path}: holds no refs at all; it is empty or cut short")
    if split not in valid:
        raise UserError(f"{path}: unknown split '{split}'; this file has: {', '.join(valid)}")
    return [r for r in refs if r["split"] == split]


def sentence_texts(ref: dict) -> tuple[str, ...]:
    """The `sent` of each sentence (LISA's choice), `raw` where `sent` is missing."""
    return tuple(s.get("sent", s.get("raw")) for s in ref["sentences"])


def build_ref_sample(ref: dict, instances: CocoInstances, image_dir: Path, refs_path: Path,
                     dataset: str, ann_ids: list[int]) -> SegSample:
    """One SegSample: the ref's image, its sentences, one (H, W) mask per id in `ann_ids`."""
    where = f"{refs_path}: ref_id {ref['ref_id']}"
    record = image_record(instances, int(ref["image_id"]), where)
    height, width = int(record["height"]), int(record["width"])
    masks = np.zeros((len(ann_ids), height, width), dtype=bool)  # (N, H, W)
    categories = []
    for i, ann_id in enumerate(ann_ids):
        masks[i] = annotation_mask(instances, ann_id, height, width, where)
        ann = instances.annotations[ann_id]
        if int(ann.get("image_id", ref["image_id"])) != int(ref["image_id"]):
            raise UserError(f"{where}: annotation {ann_id} belongs to image "
                            f"{ann['image_id']}, not {ref['image_id']}")
        categories.append(instances.categories.get(int(ann.get("category_id", -1)), ""))
    image = load_coco_image(image_dir, record, f"{instances.path} (image {record['id']})")
    meta = {"ref_id": ref["ref_id"], "ann_ids": list(ann_ids), "image_id": int(ref["image_id"]),
            "split": ref["split"], "sent_ids": [s.get("sent_id") for s in ref["sentences"]],
            "raw": [s.get("raw", s.get("sent")) for s in ref["sentences"]],
            "categories": categories, "file_name": record.get("file_name"),
            "refs_file": str(refs_path)}
    return SegSample(str(ref["ref_id"]), image, sentence_texts(ref), masks, None, dataset, meta)


def load_refcoco(root: str | Path, dataset: str = "refcoco", split_by: str | None = None,
                 split: str = "val", image_dir: str | Path | None = None,
                 check_images: bool = False) -> LazySamples:
    """The refs of one split of RefCOCO/+/g as lazily built SegSamples (one per ref).

    `split_by` defaults to unc (refcoco, refcoco+) or umd (refcocog); `image_dir` to the
    refer API's `<root>/images/mscoco/images/train2014`. `check_images`: refuse up front
    when an image file is missing (otherwise the sample that needs it raises).
    """
    path = refs_file(root, dataset, split_by)
    refs = select_split(check_refs(load_plain(path), path), split, path)
    instances = read_instances(Path(root) / dataset / "instances.json")
    images = Path(image_dir) if image_dir is not None else default_image_dir(root)
    for ref in refs:  # fail early on dangling ids rather than midway through an epoch
        if isinstance(ref["ann_id"], list) or int(ref["ann_id"]) not in instances.annotations:
            raise UserError(f"{path}: ref_id {ref['ref_id']}: field 'ann_id' = {ref['ann_id']} "
                            f"is not an annotation id in {instances.path}")
        image_record(instances, int(ref["image_id"]), f"{path}: ref_id {ref['ref_id']}")
    if check_images:
        check_image_files(images, instances, [r["image_id"] for r in refs], f"{path} (split {split})")
    return LazySamples(refs, lambda ref: build_ref_sample(
        ref, instances, images, path, dataset, [int(ref["ann_id"])]))
