"""gRefCOCO (henghuiding/gRefCOCO, as ReLA's `grefer.py` and LISA read it).

    <root>/grefcoco/grefs(unc).json    (or grefs(unc).p, read with the plain-data unpickler)
    <root>/grefcoco/instances.json
    <image_dir>/COCO_train2014_%012d.jpg   default <root>/images/train2014

A ref is {ref_id, image_id, ann_id: [ids] ([-1] for no target), category_id: [ids],
no_target: bool, split, sent_ids, sentences: [{sent, raw, tokens, sent_id}], file_name}.
One ref is one SegSample: every sentence an instruction, one mask per referred (non-crowd)
instance, none for a no-target ref. Splits: train, val, testA, testB.
"""

from __future__ import annotations

from pathlib import Path

from saekit.errors import UserError
from segcompass.data.coco import (CocoInstances, LazySamples, check_image_files, image_record, read_instances,
                                  read_json)
from segcompass.data.refcoco import build_ref_sample, check_refs, refs_file, select_split
from segcompass.data.safe_pickle import load_plain

NO_TARGET_ANN_ID = -1
"""gRefCOCO's `ann_id` of a no-target ref is `[-1]`."""


def default_image_dir(root: str | Path) -> Path:
    """Where ReLA's grefer looks for COCO train2014 images."""
    return Path(root) / "images" / "train2014"


def target_ann_ids(ref: dict, instances: CocoInstances, path: Path) -> list[int]:
    """The referred non-crowd annotation ids ([] for a no-target ref), checked against the
    ref's `no_target` flag and the instances file."""
    where = f"{path}: ref_id {ref['ref_id']}"
    raw = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    try:
        ids = [int(a) for a in raw if int(a) != NO_TARGET_ANN_ID]
    except (TypeError, ValueError):
        raise UserError(f"{where}: field 'ann_id' = {ref['ann_id']!r} is not a list of "
                        "ids") from None
    no_target = ref.get("no_target", not ids)
    if bool(no_target) == bool(ids):
        raise UserError(f"{where}: field 'no_target' = {no_target} contradicts 'ann_id' = "
                        f"{ref['ann_id']}")
    for ann_id in ids:
        if ann_id not in instances.annotations:
            raise UserError(f"{where}: field 'ann_id' holds {ann_id}, which is not an "
                            f"annotation id in {instances.path}")
    # ReLA drops crowd annotations from the targets.
    return [a for a in ids if not instances.annotations[a].get("iscrowd", 0)]


def load_grefcoco(root: str | Path, split: str = "val", split_by: str = "unc",
                  image_dir: str | Path | None = None, dataset: str = "grefcoco",
                  check_images: bool = False) -> LazySamples:
    """The refs of one gRefCOCO split as lazily built SegSamples (one per ref); `check_images`
    refuses up front when an image file is missing."""
    path = refs_file(root, dataset, split_by, stem="grefs", suffixes=(".json", ".p"))
    refs = read_json(path) if path.suffix == ".json" else load_plain(path)
    refs = select_split(check_refs(refs, path), split, path)
    instances = read_instances(Path(root) / dataset / "instances.json")
    images = Path(image_dir) if image_dir is not None else default_image_dir(root)
    targets = {}
    for ref in refs:  # validate every ref up front: errors name the file, ref and field
        image_record(instances, int(ref["image_id"]), f"{path}: ref_id {ref['ref_id']}")
        targets[id(ref)] = target_ann_ids(ref, instances, path)
    if check_images:
        check_image_files(images, instances, [r["image_id"] for r in refs], f"{path} (split {split})")

    def build(ref: dict):
        sample = build_ref_sample(ref, instances, images, path, dataset, targets[id(ref)])
        sample.meta["no_target"] = len(targets[id(ref)]) == 0
        return sample

    return LazySamples(refs, build)
