"""RefCOCO / RefCOCO+ / RefCOCOg and gRefCOCO loaders on real-format files built from the
real fixture photos and polygons; masks are checked against the pycocotools COCO API."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from loaders_fixtures import (GREFCOCO_REFS, REFCOCO_REFS, STEMS, build_grefcoco,
                              build_refcoco)
from saekit.errors import UserError
from segcompass.data.grefcoco import load_grefcoco
from segcompass.data.refcoco import load_refcoco


@pytest.fixture()
def refcoco_root(fixtures_dir, tmp_path):
    return build_refcoco(fixtures_dir, tmp_path)


def _coco_api(path):
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(path))


def test_val_split_has_its_refs_with_exact_masks_and_photos(refcoco_root, fixtures_dir):
    samples = load_refcoco(refcoco_root, "refcoco", "unc", "val")
    expected = [r for r in REFCOCO_REFS if r[3] == "val"]
    assert len(samples) == len(expected)
    api = _coco_api(refcoco_root / "refcoco" / "instances.json")
    for sample, (ref_id, ann_id, image_id, _, texts) in zip(samples, expected):
        assert sample.sample_id == str(ref_id)
        assert sample.instructions == tuple(t.lower() for t in texts)
        assert sample.meta["raw"] == texts
        assert sample.meta["ann_ids"] == [ann_id] and sample.meta["image_id"] == image_id
        photo = np.asarray(Image.open(fixtures_dir / "labelme" / f"{STEMS[image_id]}.jpg"))
        assert np.array_equal(sample.image, photo)
        assert sample.target_masks.shape == (1, *photo.shape[:2])
        assert np.array_equal(sample.target_masks[0], api.annToMask(api.anns[ann_id]) > 0)
        assert sample.ignore_mask is None and sample.dataset == "refcoco"
    assert samples[0].meta["categories"] == ["bottle"]


def test_multi_part_polygons_are_unioned(refcoco_root):
    sofa = load_refcoco(refcoco_root, "refcoco", "unc", "testB")[0]
    api = _coco_api(refcoco_root / "refcoco" / "instances.json")
    parts = api.anns[111]["segmentation"]
    assert len(parts) == 4
    assert sofa.target_masks[0].sum() == api.annToMask(api.anns[111]).sum() > 0


def test_each_official_split_loads_and_unknown_splits_are_refused(refcoco_root):
    for split in ("train", "val", "testA", "testB"):
        assert len(load_refcoco(refcoco_root, "refcoco", "unc", split)) >= 1
    with pytest.raises(UserError, match=r"refs\(unc\)\.p: unknown split 'test'; this file "
                                        r"has: testA, testB, train, val"):
        load_refcoco(refcoco_root, "refcoco", "unc", "test")


def test_refcocog_defaults_to_umd_and_missing_refs_file_lists_present(fixtures_dir, tmp_path):
    build_refcoco(fixtures_dir, tmp_path, dataset="refcocog", split_by="umd")
    assert len(load_refcoco(tmp_path, "refcocog", split="val")) == 3
    with pytest.raises(UserError, match=r"no refs\(google\)\.p; present: refs\(umd\)\.p"):
        load_refcoco(tmp_path, "refcocog", "google", "val")


def _rewrite(path, edit):
    data = pickle.loads(path.read_bytes()) if path.suffix == ".p" else json.loads(path.read_text())
    edit(data)
    if path.suffix == ".p":
        path.write_bytes(pickle.dumps(data, protocol=2))
    else:
        path.write_text(json.dumps(data))


def test_missing_annotation_id_is_named(refcoco_root):
    refs = refcoco_root / "refcoco" / "refs(unc).p"
    _rewrite(refs, lambda d: d[1].update(ann_id=999))
    with pytest.raises(UserError, match=r"refs\(unc\)\.p: ref_id 1: field 'ann_id' = 999"):
        load_refcoco(refcoco_root, "refcoco", "unc", "val")


def test_missing_image_file_is_named(refcoco_root):
    (refcoco_root / "images/mscoco/images/train2014/COCO_train2014_000000000025.jpg").unlink()
    samples = load_refcoco(refcoco_root, "refcoco", "unc", "val")
    with pytest.raises(UserError, match=r"COCO_train2014_000000000025\.jpg: image not found"):
        list(samples)


def test_polygon_with_two_points_is_named(refcoco_root):
    instances = refcoco_root / "refcoco" / "instances.json"

    def break_polygon(d):
        ann = next(a for a in d["annotations"] if a["id"] == 102)
        ann["segmentation"][0] = ann["segmentation"][0][:4]
    _rewrite(instances, break_polygon)
    samples = load_refcoco(refcoco_root, "refcoco", "unc", "val")
    with pytest.raises(UserError, match=r"instances\.json: annotation 102: field "
                                        r"'segmentation\[0\]' is a polygon with 2 points"):
        samples[0]


def test_missing_ref_field_and_malicious_pickle_are_refused(refcoco_root):
    refs = refcoco_root / "refcoco" / "refs(unc).p"
    _rewrite(refs, lambda d: d[0].pop("split"))
    with pytest.raises(UserError, match=r"ref #0 \(ref_id 0\) lacks field 'split'"):
        load_refcoco(refcoco_root, "refcoco", "unc", "val")
    refs.write_bytes(pickle.dumps([Image.new("L", (1, 1))], protocol=2))
    with pytest.raises(UserError, match="refused to unpickle"):
        load_refcoco(refcoco_root, "refcoco", "unc", "val")


# ------------------------------------------------------------------------ gRefCOCO

@pytest.fixture()
def grefcoco_root(fixtures_dir, tmp_path):
    return build_grefcoco(fixtures_dir, tmp_path)


def test_grefcoco_multi_and_no_target_samples(grefcoco_root):
    samples = load_grefcoco(grefcoco_root, "val")
    expected = [r for r in GREFCOCO_REFS if r[3] == "val"]
    assert len(samples) == len(expected)
    api = _coco_api(grefcoco_root / "grefcoco" / "instances.json")
    for sample, (ref_id, ann_ids, image_id, _, texts) in zip(samples, expected):
        assert sample.sample_id == str(ref_id)
        assert sample.instructions == tuple(t.lower() for t in texts)
        real = [a for a in ann_ids if a != -1]
        assert sample.meta["ann_ids"] == real
        assert sample.meta["no_target"] == (not real) == sample.is_no_target
        assert sample.target_masks.shape[0] == len(real)
        assert sample.target_masks.shape[1:] == sample.image.shape[:2]
        for mask, ann_id in zip(sample.target_masks, real):
            assert np.array_equal(mask, api.annToMask(api.anns[ann_id]) > 0)
    people = samples[0]
    assert len(people.target_masks) == 4 and people.meta["categories"] == ["person"] * 4
    assert not people.union_mask[0, 0] and people.union_mask.sum() > 10000


def test_grefcoco_splits_and_contradictions_are_refused(grefcoco_root):
    assert len(load_grefcoco(grefcoco_root, "train")) == 1
    with pytest.raises(UserError, match="unknown split 'testB'; this file has: testA, train, val"):
        load_grefcoco(grefcoco_root, "testB")
    grefs = grefcoco_root / "grefcoco" / "grefs(unc).json"
    _rewrite(grefs, lambda d: d[1].update(no_target=False))
    with pytest.raises(UserError, match=r"ref_id 1: field 'no_target' = False contradicts"):
        load_grefcoco(grefcoco_root, "val")
    _rewrite(grefs, lambda d: (d[1].update(no_target=True), d[0].update(ann_id=[106, 555])))
    with pytest.raises(UserError, match=r"ref_id 0: field 'ann_id' holds 555"):
        load_grefcoco(grefcoco_root, "val")
