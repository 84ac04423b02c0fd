"""Evaluation: the files it writes, and its numbers against an independent recomputation
from the RLE predictions it saved (pycocotools decode + `metrics.reference_scores`)."""

import csv
import json
import math

import numpy as np
import pytest
from segcompass_tiny import tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)

from segcompass.world.scenes import generate
from segcompass.evaluate import (FILES, decode_rle, encode_rle, evaluate, evaluate_to_dir, metrics_table,
                                 run_evaluation, write_results)
from segcompass.metrics import SplitScores, reference_scores
from segcompass.predictor import PredictorConfig

FAST = PredictorConfig(max_new_tokens=12, batch_size=4, top_atoms=2)
SPLITS = {"val": 7, "testA": 3}  # val-1 samples 0..6: single-, multi- and (index 6) no-target prompts


@pytest.fixture(scope="module")
def evaluated(tiny_model, tmp_path_factory):
    results = {split: run_evaluation(tiny_model, [split], n, seed=1, config=FAST)[split]
               for split, n in SPLITS.items()}
    out = tmp_path_factory.mktemp("eval")
    return results, write_results(out, results, {"checkpoint": "tiny"})


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_writes_all_files_and_numbers_match_rle_recomputation(evaluated):
    results, paths = evaluated
    assert set(paths) == set(FILES) and all(p.is_file() for p in paths.values())
    records = json.loads(paths["predictions.json"].read_text())
    assert len(records) == sum(SPLITS.values())
    stored = json.loads(paths["metrics.json"].read_text())["splits"]
    for split, n in SPLITS.items():
        samples = generate(split, n, seed=1)
        mine = [r for r in records if r["split"] == split]
        assert [r["sample_id"] for r in mine] == [s.sample_id for s in samples]
        preds = [decode_rle(r["rle"]) for r in mine]
        expected = reference_scores(preds, [s.target_masks for s in samples])
        got = results[split].scores
        for field in ("giou", "ciou", "n_acc", "t_acc"):
            assert _close(getattr(got, field), getattr(expected, field)), (split, field)
            value = stored[split][field]
            assert _close(math.nan if value is None else value, getattr(expected, field))
        assert (got.n_samples, got.n_no_target) == (expected.n_samples, expected.n_no_target) == (
            n, sum(len(s.targets) == 0 for s in samples))
    assert results["val"].scores.n_no_target >= 1  # no-target samples are scored, not skipped
    rows = {row["split"]: row for row in csv.DictReader(paths["metrics.csv"].open())}
    assert set(rows) == set(SPLITS)
    assert float(rows["val"]["giou"]) == pytest.approx(results["val"].scores.giou, abs=1e-6)
    record = mine[0]
    assert {"sample_id", "split", "rle", "confidences", "response"} <= set(record)


def test_metrics_table_marks_undefined_values():
    table = metrics_table({"testA": SplitScores(0.5, 0.25, math.nan, 1.0, 4, 0)})
    assert "| testA | 50.00 | 25.00 | n/a | 100.00 | 4 | 0 |" in table


@pytest.mark.parametrize("shape", [(5, 7), (128, 128)])
def test_rle_round_trip(shape):
    rng = np.random.default_rng(0)
    for mask in (np.zeros(shape, bool), rng.random(shape) > 0.5, np.ones(shape, bool)):
        rle = encode_rle(mask)
        assert rle["size"] == list(shape) and isinstance(rle["counts"], str)
        np.testing.assert_array_equal(decode_rle(json.loads(json.dumps(rle))), mask)


def test_evaluate_function_and_cli(tiny_model, tiny_checkpoint, tmp_path):  # noqa: F811
    from segcompass.cli import main

    scores = evaluate(tiny_model, ["testB"], 2, seed=1, config=FAST)
    assert set(scores) == {"testB"} and scores["testB"].n_samples == 2
    written = evaluate_to_dir(tiny_checkpoint, ["testB"], 2, tmp_path / "fn", seed=1, config=FAST, progress=False)
    assert written["testB"].giou == pytest.approx(scores["testB"].giou)
    assert all((tmp_path / "fn" / name).is_file() for name in FILES)
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--splits", "testB", "--n", "2", "--out", str(out),
                 "--max-new-tokens", "12", "--no-progress"])
    assert code == 0
    stored = json.loads((out / "metrics.json").read_text())["splits"]["testB"]
    assert stored["giou"] == pytest.approx(scores["testB"].giou)  # greedy: the same numbers every run
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--splits", "nope", "--out", str(out)]) == 2
