"""Reasoning vs mask: hand-built prediction records with known answers and masks give the
hand-counted tables, and the report writes a readable figure."""

import json

import numpy as np
import pandas as pd
import pytest

from analyses.reasoning_to_mask import judge_predictions, no_target_table, reasoning_table, write_reasoning_report
from segcompass.world.scenes import generate, hallucinated_sample
from segcompass.evaluate import encode_rle
from segcompass.template import format_response, k_for


def _record(sample, cot: str, mask: np.ndarray) -> dict:
    return {"sample_id": sample.sample_id, "split": sample.split, "family": sample.family,
            "response": format_response(cot, k_for(sample.multi_prompt)), "rle": encode_rle(mask)}


@pytest.fixture(scope="module")
def records():
    singles = [s for s in generate("testA", 6, seed=3)][:2]
    absent = [s for s in generate("multi", 80, seed=3) if not s.targets][:3]
    right, wrong = singles
    other = next(o for i, o in enumerate(wrong.objects) if i not in wrong.targets)
    half = right.target_masks[0].copy()
    rows = np.flatnonzero(half.any(axis=1))
    half[: rows[len(rows) // 2]] = False  # keeps the target's lower rows: IoU = |kept| / |target|
    invented = hallucinated_sample(absent[1], np.random.default_rng(0)).cot
    present = absent[2].objects[0]
    empty = np.zeros(right.image.shape[:2], bool)
    return [
        _record(right, right.cot, half),
        _record(wrong, f"the instruction asks for {wrong.instruction} . target : {other.name} .", other.labels == -2),
        _record(absent[0], absent[0].cot, empty),  # "target : none", empty: IoU 1
        _record(absent[1], invented, absent[1].labels >= 0),  # names an absent object, masks everything
        _record(absent[2], f"target : {present.name} .", empty),  # names a present object, empty mask
        _record(absent[2], "no answer here", empty),
    ], half.sum() / right.target_masks[0].sum()  # in (0, 1): asserted below


def test_judged_rows_match_hand_counts(records):
    recs, half_iou = records
    assert 0.2 < half_iou < 0.8
    judged = judge_predictions(recs)
    assert judged.cot_right.tolist() == [True, False, True, False, False, False]
    assert judged.conclusion.tolist()[2:] == ["none", "named absent", "named present", "unparsed"]
    assert judged.iou.tolist() == pytest.approx([half_iou, 0.0, 1.0, 0.0, 1.0, 1.0])
    assert judged.pred_empty.tolist() == [False, True, True, False, True, True]
    table = reasoning_table(judged).set_index("split")
    assert table.loc["testA"].tolist() == pytest.approx([2, 1, half_iou, 0.0])
    assert table.loc["multi"].tolist() == pytest.approx([4, 1, 1.0, 2 / 3])
    counts = no_target_table(judged)
    assert counts["count"].sum() == 4
    assert counts[(counts.conclusion == "named absent") & ~counts.pred_empty]["count"].sum() == 1


def test_report_files(records, tmp_path):
    recs, _ = records
    (tmp_path / "predictions.json").write_text(json.dumps(recs))
    summary = write_reasoning_report(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"reasoning_to_mask.csv", "reasoning_to_mask.png",
                                                    "reasoning_to_mask.json", "reasoning_to_mask_no_target.csv"}
    assert summary["no_target"]["none"] == {"empty": 1, "mask": 0}
    assert summary["no_target"]["named absent"] == {"empty": 0, "mask": 1}
    assert len(pd.read_csv(tmp_path / "reasoning_to_mask.csv")) == 2
