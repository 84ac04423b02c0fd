"""`segcompass score` against an independent numpy computation on random masks."""

import json

import numpy as np
import pytest
from PIL import Image

from segcompass.cli import main


def _make_split(root, rng, n=24):
    """GT rectangles (integer corners: LISA paints exactly the closed box) with overlapping
    target / ignore shapes, no-target samples, and random predictions, some missing."""
    gt_dir, pred_dir = root / "gt", root / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    truth = []
    for k in range(n):
        h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
        shapes, boxes = [], []
        n_shapes = 0 if k % 6 == 0 else int(rng.integers(1, 4))
        for j in range(n_shapes + int(k % 4 == 1)):  # every 4th sample also has an ignore box
            x0, y0 = int(rng.integers(0, w - 5)), int(rng.integers(0, h - 5))
            x1, y1 = int(rng.integers(x0 + 1, w)), int(rng.integers(y0 + 1, h))
            label = "ignore" if j == n_shapes else "target"
            shapes.append({"label": label, "points": [[x0 + 0.7, y0 + 0.2], [x1 + 0.9, y0],
                                                      [x1, y1 + 0.5], [x0, y1]]})
            boxes.append((label, x0, y0, x1, y1))
        photo = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(photo).save(gt_dir / f"s{k}.png")
        (gt_dir / f"s{k}.json").write_text(json.dumps(
            {"text": [f"query {k}"], "is_sentence": True, "shapes": shapes}))
        pred = rng.random((h, w)) < rng.uniform(0.1, 0.6)
        if k % 5 == 0:
            pred[:] = False
        if k % 7 != 3:  # k % 7 == 3: no prediction file at all (= empty)
            level = int(rng.integers(1, 256))  # any non-zero grey is foreground
            Image.fromarray((pred * level).astype(np.uint8)).save(pred_dir / f"s{k}.png")
        else:
            pred[:] = False
        truth.append((boxes, pred, h, w))
    return gt_dir, pred_dir, truth


def _independent_scores(truth):
    ious, inter_sum, union_sum = [], 0, 0
    nt = nt_empty = t = t_found = 0
    for boxes, pred, h, w in truth:
        label = np.zeros((h, w), np.uint8)
        areas = [(x1 - x0 + 1) * (y1 - y0 + 1) for _, x0, y0, x1, y1 in boxes]
        for i in sorted(range(len(boxes)), key=lambda i: -areas[i]):  # largest drawn first
            name, x0, y0, x1, y1 = boxes[i]
            label[y0:y1 + 1, x0:x1 + 1] = 255 if name == "ignore" else 1
        valid = label != 255
        g, p = (label == 1) & valid, pred & valid
        inter, union = np.sum(g & p), np.sum(g | p)
        ious.append(1.0 if union == 0 else inter / union)
        inter_sum, union_sum = inter_sum + inter, union_sum + union
        if g.any():
            t, t_found = t + 1, t_found + int(p.any())
        else:
            nt, nt_empty = nt + 1, nt_empty + int(not p.any())
    return {"giou": np.mean(ious), "ciou": inter_sum / union_sum, "n_acc": nt_empty / nt,
            "t_acc": t_found / t, "n_samples": len(truth), "n_no_target": nt}


def test_score_json_agrees_with_independent_numpy(tmp_path, capsys):
    gt_dir, pred_dir, truth = _make_split(tmp_path, np.random.default_rng(0))
    assert main(["score", str(gt_dir), str(pred_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    expected = _independent_scores(truth)
    # the split exercises both outcomes of no-target and of target samples
    assert expected["n_no_target"] == 4 and 0 < expected["n_acc"] < 1 and 0 < expected["t_acc"] < 1
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-6), key
    assert out["missing_predictions"] == sum(1 for k in range(24) if k % 7 == 3)


def test_score_table_and_size_mismatch(tmp_path, capsys):
    gt_dir, pred_dir, _ = _make_split(tmp_path, np.random.default_rng(1), n=8)
    assert main(["score", str(gt_dir), str(pred_dir)]) == 0
    table = capsys.readouterr().out
    for name in ("gIoU (%)", "cIoU (%)", "N-acc (%)", "T-acc (%)", "samples", "no-target"):
        assert name in table
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(pred_dir / "s1.png")
    assert main(["score", str(gt_dir), str(pred_dir)]) == 2
    err = capsys.readouterr().err
    assert "s1.png: mask is 3x3 but its image is" in err and "Traceback" not in err
