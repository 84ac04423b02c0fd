"""gIoU / cIoU / N-acc / T-acc: against pycocotools, hand-computed cases, the slow
reference, and masks of the real fixture photos' sizes."""

import json
import math

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from segcompass.metrics import (MetricAccumulator, SplitScores, batch_counts,
                                reference_scores, sample_iou)


def _rle(mask):
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def test_per_sample_iou_matches_pycocotools_on_random_masks():
    rng = np.random.default_rng(0)
    preds, gts = [], []
    for _ in range(40):
        h, w = rng.integers(5, 90, size=2)
        preds.append(rng.random((h, w)) < rng.uniform(0.05, 0.9))
        gts.append(rng.random((h, w)) < rng.uniform(0.05, 0.9))
    for pred, gt in zip(preds, gts):
        c = batch_counts(pred[None], gt[None])
        ours = sample_iou(c.intersection, c.union)[0]
        theirs = mask_utils.iou([_rle(pred)], [_rle(gt)], [0])[0, 0]
        assert ours == pytest.approx(theirs, abs=1e-12)


def test_hand_computed_split_with_ignore_and_no_target():
    acc = MetricAccumulator()
    gt = np.zeros((4, 4), bool)
    gt[0, :] = True                                  # 4 target pixels
    pred = np.zeros((4, 4), bool)
    pred[0, :2] = True
    pred[1, 0] = True                                # I = 2, U = 5
    acc.add(pred, gt)
    ignore = np.zeros((4, 4), bool)
    ignore[1, :] = True                              # the extra predicted pixel is ignored
    acc.add(pred, gt[None], ignore)                  # I = 2, U = 4
    acc.add(np.zeros((4, 4)), np.zeros((0, 4, 4)))   # no target, predicted empty: IoU 1, 0/0
    acc.add(pred, np.zeros((0, 4, 4)))               # no target, 3 pixels predicted: IoU 0
    acc.add(np.zeros((4, 4)), gt)                    # target missed: IoU 0, U = 4
    s = acc.result()
    assert s == SplitScores(giou=(2 / 5 + 2 / 4 + 1 + 0 + 0) / 5,
                            ciou=(2 + 2 + 0 + 0 + 0) / (5 + 4 + 0 + 3 + 4),
                            n_acc=1 / 2, t_acc=2 / 3, n_samples=5, n_no_target=2)


def test_target_inside_ignore_counts_as_no_target_and_instances_union():
    gt = np.zeros((2, 3, 3), bool)
    gt[0, 0, 0] = gt[1, 2, 2] = True                 # two instances -> union of 2 pixels
    acc = MetricAccumulator()
    acc.add(gt[0] | gt[1], gt)
    ignore = np.zeros((3, 3), bool)
    ignore[0, 0] = True
    acc.add(np.zeros((3, 3)), gt[:1], ignore)        # the only target pixel is ignored
    s = acc.result()
    assert (s.giou, s.ciou, s.n_no_target, s.n_acc, s.t_acc) == (1.0, 1.0, 1, 1.0, 1.0)


def test_undefined_accuracies_are_nan_and_json_null():
    acc = MetricAccumulator()
    acc.add(np.ones((2, 2)), np.ones((2, 2)))
    s = acc.result()
    assert math.isnan(s.n_acc) and s.t_acc == 1.0
    assert json.loads(json.dumps(s.as_dict()))["n_acc"] is None
    assert math.isnan(MetricAccumulator().result().giou)
    only_empty = MetricAccumulator()
    only_empty.add(np.zeros((2, 2)), np.zeros((2, 2)))
    e = only_empty.result()
    assert (e.giou, e.ciou, e.n_acc, e.n_no_target) == (1.0, 1.0, 1.0, 1) and math.isnan(e.t_acc)


def test_streaming_batches_match_the_slow_reference():
    rng = np.random.default_rng(1)
    preds, gts, ignores = [], [], []
    for k in range(60):
        pred = rng.random((16, 20)) < 0.3
        gt = rng.random((16, 20)) < 0.3
        if k % 5 == 0:
            gt[:] = False                            # no-target samples
        if k % 7 == 0:
            pred[:] = False                          # empty predictions
        ignore = rng.random((16, 20)) < 0.1 if k % 3 else None
        preds.append(pred), gts.append(gt), ignores.append(ignore)
    acc = MetricAccumulator()
    for start in range(0, 60, 12):                   # batches of 12, one ignore mask each
        batch = slice(start, start + 12)
        ign = np.stack([np.zeros((16, 20), bool) if i is None else i for i in ignores[batch]])
        acc.add_batch(np.stack(preds[batch]), np.stack(gts[batch]), ign)
    fast, slow = acc.result(), reference_scores(preds, gts, ignores)
    assert fast.n_samples == slow.n_samples == 60 and fast.n_no_target == slow.n_no_target == 12
    for a, b in zip(fast[:4], slow[:4]):
        assert a == pytest.approx(b, abs=1e-12)


def test_real_photo_sizes_against_pycocotools(fixtures_dir):
    coco = json.loads((fixtures_dir / "coco" / "annotations.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    by_image: dict[int, list[np.ndarray]] = {}
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        parts = mask_utils.frPyObjects(ann["segmentation"], im["height"], im["width"])
        rle = mask_utils.merge(parts)
        by_image.setdefault(ann["image_id"], []).append(mask_utils.decode(rle).astype(bool))
    acc, inters, unions, ious = MetricAccumulator(), 0, 0, []
    for masks in by_image.values():                  # predict instance 0 for the union of 0 and 1
        pred, gt = masks[0], np.stack(masks[:2])
        acc.add(pred, gt)
        union_rle = _rle(gt.any(axis=0))
        ious.append(mask_utils.iou([_rle(pred)], [union_rle], [0])[0, 0])
        inters += int(mask_utils.area(mask_utils.merge([_rle(pred), union_rle], intersect=True)))
        unions += int(mask_utils.area(mask_utils.merge([_rle(pred), union_rle])))
    s = acc.result()
    assert s.giou == pytest.approx(np.mean(ious), abs=1e-12)
    assert s.ciou == pytest.approx(inters / unions, abs=1e-12)
    assert s.n_samples == 3 and s.t_acc == 1.0
