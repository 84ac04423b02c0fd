"""Real-format RefCOCO / gRefCOCO / ReasonSeg folders built from the voc-labelme photos.

The instances, polygons and photos are the fixture's real ones; only the referring
expressions are written here. Image ids follow the VOC file number (2011_000003 -> 3).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

STEMS = {3: "2011_000003", 6: "2011_000006", 25: "2011_000025"}


def coco_instances(fixtures_dir: Path) -> dict:
    """The fixture's COCO file with COCO-style image ids and file names."""
    data = json.loads((fixtures_dir / "coco" / "annotations.json").read_text())
    by_stem = {v: k for k, v in STEMS.items()}
    old_to_new = {}
    for im in data["images"]:
        new_id = by_stem[Path(im["file_name"]).stem]
        old_to_new[im["id"]] = new_id
        im["id"], im["file_name"] = new_id, "COCO_train2014_%012d.jpg" % new_id
    for ann in data["annotations"]:
        ann["image_id"] = old_to_new[ann["image_id"]]
        ann["id"] += 100  # ann ids 100.. (0 is a legal id, but keep it out of the way)
    return data


def copy_images(fixtures_dir: Path, image_dir: Path) -> None:
    image_dir.mkdir(parents=True, exist_ok=True)
    for image_id, stem in STEMS.items():
        shutil.copy(fixtures_dir / "labelme" / f"{stem}.jpg",
                    image_dir / ("COCO_train2014_%012d.jpg" % image_id))


def _sentences(texts: list[str], first_id: int) -> list[dict]:
    return [{"sent": t.lower(), "raw": t, "tokens": t.lower().split(), "sent_id": first_id + k}
            for k, t in enumerate(texts)]


# (ref_id, ann_id, image_id, split, sentences)
REFCOCO_REFS = [
    (0, 100, 3, "train", ["man on the left"]),
    (1, 102, 3, "val", ["the bottle", "green bottle on the table"]),
    (2, 103, 25, "val", ["the big bus"]),
    (3, 109, 6, "testA", ["the chair"]),
    (4, 111, 6, "testB", ["the sofa"]),  # four polygon parts
    (5, 101, 3, "val", ["person in the middle"]),  # two polygon parts
]


def build_refcoco(fixtures_dir: Path, root: Path, dataset: str = "refcoco",
                  split_by: str = "unc") -> Path:
    instances = coco_instances(fixtures_dir)
    anns = {a["id"]: a for a in instances["annotations"]}
    refs, sent_id = [], 0
    for ref_id, ann_id, image_id, split, texts in REFCOCO_REFS:
        sentences = _sentences(texts, sent_id)
        sent_id += len(sentences)
        refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split,
                     "category_id": anns[ann_id]["category_id"], "sentences": sentences,
                     "sent_ids": [s["sent_id"] for s in sentences],
                     "file_name": "COCO_train2014_%012d_%d.jpg" % (image_id, ann_id)})
    (root / dataset).mkdir(parents=True, exist_ok=True)
    (root / dataset / f"refs({split_by}).p").write_bytes(pickle.dumps(refs, protocol=2))
    (root / dataset / "instances.json").write_text(json.dumps(instances))
    copy_images(fixtures_dir, root / "images" / "mscoco" / "images" / "train2014")
    return root


# (ref_id, ann_ids, image_id, split, sentences); [-1] = no target
GREFCOCO_REFS = [
    (0, [106, 107, 108, 110], 6, "val", ["all the people", "everyone in the room"]),
    (1, [-1], 25, "val", ["the dog"]),
    (2, [102], 3, "val", ["the bottle"]),
    (3, [103, 104], 25, "train", ["both buses"]),
    (4, [-1], 3, "testA", ["the cat on the sofa"]),
]


def build_grefcoco(fixtures_dir: Path, root: Path) -> Path:
    instances = coco_instances(fixtures_dir)
    anns = {a["id"]: a for a in instances["annotations"]}
    refs, sent_id = [], 0
    for ref_id, ann_ids, image_id, split, texts in GREFCOCO_REFS:
        sentences = _sentences(texts, sent_id)
        sent_id += len(sentences)
        refs.append({"ref_id": ref_id, "ann_id": ann_ids, "image_id": image_id, "split": split,
                     "category_id": [anns[a]["category_id"] if a != -1 else -1 for a in ann_ids],
                     "no_target": ann_ids == [-1], "sentences": sentences,
                     "sent_ids": [s["sent_id"] for s in sentences],
                     "file_name": "COCO_train2014_%012d.jpg" % image_id})
    (root / "grefcoco").mkdir(parents=True, exist_ok=True)
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(refs))
    (root / "grefcoco" / "instances.json").write_text(json.dumps(instances))
    copy_images(fixtures_dir, root / "images" / "train2014")
    return root


def build_reasonseg(fixtures_dir: Path, folder: Path) -> Path:
    """ReasonSeg layout: each photo with its LabelMe shapes relabelled target / ignore."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(STEMS.values()):
        anno = json.loads((fixtures_dir / "labelme" / f"{stem}.json").read_text())
        shapes = [{"label": "ignore" if "ignore" in s["label"] else "target",
                   "labels": [s["label"]], "points": s["points"], "group_id": s["group_id"],
                   "shape_type": s["shape_type"], "flags": {}} for s in anno["shapes"]]
        out = {"text": [f"what in this picture could {stem} be?"], "is_sentence": k % 2 == 0,
               "shapes": shapes}
        (folder / f"{stem}.json").write_text(json.dumps(out))
        shutil.copy(fixtures_dir / "labelme" / f"{stem}.jpg", folder / f"{stem}.jpg")
    return folder
