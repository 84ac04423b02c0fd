"""Exporters: fixtures and world samples -> each real format -> the real loaders, exactly."""

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from loaders_fixtures import build_grefcoco, build_reasonseg, build_refcoco
from saekit.errors import UserError
from segcompass.world import scenes as world
from segcompass.data.export import (export_grefcoco, export_reasonseg, export_refcoco,
                                    mask_to_coco_polygons, mask_to_lisa_polygons)
from segcompass.data.grefcoco import load_grefcoco
from segcompass.data.rasterize import lisa_shape_mask
from segcompass.data.reasonseg import load_reasonseg
from segcompass.data.refcoco import load_refcoco

SPLITS = ("train", "val", "testA", "testB", "multi", "reason")


def _random_masks(seed, n):
    rng = np.random.default_rng(seed)
    for k in range(n):
        h, w = (int(v) for v in rng.integers(3, 30, size=2))
        if k % 2:
            yield rng.random((h, w)) < [0.2, 0.5, 0.7][k % 3]  # noise: holes, pinches
        else:
            smooth = ndimage.gaussian_filter(rng.random((h, w)), 1.5)
            yield smooth > np.quantile(smooth, 0.5)


def test_polygons_reproduce_masks_exactly_under_each_rasteriser():
    n_holes = 0
    for mask in _random_masks(0, 60):
        h, w = mask.shape
        n_holes += ndimage.label(~np.pad(mask, 1))[1] > 1
        painted = np.zeros_like(mask)
        for poly in mask_to_lisa_polygons(mask):
            assert len(poly) >= 3
            painted |= lisa_shape_mask(np.array(poly, np.int32), h, w)
        assert np.array_equal(painted, mask)
        polys = mask_to_coco_polygons(mask)
        decoded = (mask_utils.decode(mask_utils.frPyObjects(polys, h, w)).any(axis=2)
                   if polys else np.zeros_like(mask))
        assert np.array_equal(decoded, mask)
    assert n_holes > 10


def test_reasonseg_fixture_round_trip(fixtures_dir, tmp_path):
    original = list(load_reasonseg(build_reasonseg(fixtures_dir, tmp_path / "a")))
    for fmt in ("png", "jpg"):
        summary = export_reasonseg(original, tmp_path / fmt, image_format=fmt)
        assert summary.n_samples == 3
        back = list(load_reasonseg(tmp_path / fmt))
        for a, b in zip(original, back):
            assert a.sample_id == b.sample_id and a.instructions == b.instructions
            assert a.meta["is_sentence"] == b.meta["is_sentence"]
            assert np.array_equal(a.union_mask, b.union_mask)
            ignore_a = a.ignore_mask if a.ignore_mask is not None else np.zeros_like(a.union_mask)
            ignore_b = b.ignore_mask if b.ignore_mask is not None else np.zeros_like(b.union_mask)
            assert np.array_equal(ignore_a, ignore_b)
            diff = np.abs(a.image.astype(int) - b.image.astype(int))
            assert diff.max() == 0 if fmt == "png" else diff.mean() < 3.0


@pytest.mark.parametrize("segmentation", ["polygon", "rle"])
def test_refcoco_fixture_round_trip(fixtures_dir, tmp_path, segmentation):
    root = build_refcoco(fixtures_dir, tmp_path / "a")
    original = [s for split in ("train", "val", "testA", "testB")
                for s in load_refcoco(root, "refcoco", "unc", split)]
    summary = export_refcoco(original, tmp_path / "b", segmentation=segmentation)
    assert (summary.n_samples, summary.n_images, summary.n_annotations) == (6, 3, 6)
    back = {s.instructions: s for split in ("train", "val", "testA", "testB")
            for s in load_refcoco(tmp_path / "b", "refcoco", "unc", split)}
    assert len(back) == len(original)
    for a in original:
        b = back[a.instructions]
        assert b.meta["split"] == a.meta["split"]
        assert np.array_equal(a.target_masks, b.target_masks)
        assert b.meta["categories"] == a.meta["categories"]
        assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 3.0


def test_grefcoco_fixture_round_trip(fixtures_dir, tmp_path):
    root = build_grefcoco(fixtures_dir, tmp_path / "a")
    original = [s for split in ("train", "val", "testA") for s in load_grefcoco(root, split)]
    export_grefcoco(original, tmp_path / "b")
    back = [s for split in ("train", "val", "testA") for s in load_grefcoco(tmp_path / "b", split)]
    assert [b.meta["no_target"] for b in back] == [a.meta["no_target"] for a in original]
    assert sum(b.is_no_target for b in back) == 2
    for a, b in zip(original, back):
        assert b.instructions == a.instructions and b.meta["split"] == a.meta["split"]
        assert np.array_equal(a.target_masks, b.target_masks)


@pytest.fixture(scope="module")
def world_samples():
    return {s.sample_id: s for split in SPLITS
            for s in (world.make_sample(split, i).to_seg_sample() for i in range(6))}


def test_world_samples_read_back_from_every_format(world_samples, tmp_path):
    samples = list(world_samples.values())
    export_reasonseg(samples, tmp_path / "reasonseg", image_format="png")
    for b in load_reasonseg(tmp_path / "reasonseg"):
        a = world_samples[b.sample_id]
        assert b.instructions == a.instructions and np.array_equal(b.image, a.image)
        assert np.array_equal(b.union_mask, a.union_mask)
        assert b.is_no_target == a.is_no_target

    export_grefcoco(samples, tmp_path / "coco")
    by_text = {(s.meta["split"], s.instructions): s for s in samples}
    n_multi = n_none = 0
    for split in SPLITS:
        for b in load_grefcoco(tmp_path / "coco", split):
            a = by_text[(split, b.instructions)]
            assert np.array_equal(b.target_masks, a.target_masks)
            n_multi += len(b.target_masks) > 1
            n_none += b.is_no_target
    assert n_multi > 0 and n_none > 0

    single = [s for s in samples if len(s.target_masks) == 1]
    export_refcoco(single, tmp_path / "coco", segmentation="polygon")
    for split in sorted({s.meta["split"] for s in single}):
        for b in load_refcoco(tmp_path / "coco", "refcoco", "unc", split):
            a = by_text[(split, b.instructions)]
            assert np.array_equal(b.target_masks, a.target_masks)
            assert b.meta["categories"][0] == a.meta["inventory"][a.meta["targets"][0]]["shape"]


def test_refcoco_export_refuses_multi_target_samples(world_samples, tmp_path):
    multi = next(s for s in world_samples.values() if len(s.target_masks) > 1)
    with pytest.raises(UserError, match=f"sample {multi.sample_id} has {len(multi.target_masks)} "
                                        "targets; RefCOCO refs have exactly one"):
        export_refcoco([multi], tmp_path)
