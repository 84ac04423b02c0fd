"""Evaluation through `--data FORMAT:DIR` equals the world-native evaluation on the same samples.

World samples are exported to each real format with lossless PNG images (the exporters'
polygons redraw every mask exactly; tests/segcompass/data/test_export.py) and evaluated
back through the dataset loaders. The checkpoint is the random tiny one (`tiny_checkpoint`):
parity is a property of the data path, not of how well the model segments. With JPEG images
the input pixels change, and so may any model's masks: no tolerance is claimed for them.
"""

import json

import pytest
from segcompass_tiny import tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)

from segcompass.data.export import export_grefcoco, export_reasonseg, export_refcoco
from segcompass.evaluate import decode_rle, run_evaluation
from segcompass.predictor import PredictorConfig
from segcompass.world.scenes import generate

FAST = PredictorConfig(max_new_tokens=12, batch_size=4, top_atoms=0)
# The random model's slot confidences sit near 0.5: a 0 threshold selects every slot of the
# multi-object prompt, so its masks are not all empty either.
MULTI = PredictorConfig(max_new_tokens=12, batch_size=4, top_atoms=0, conf_threshold=0.0)


def _same(world, data):
    assert world.scores == data.scores  # every float bit-equal: same masks, same counts
    assert [r["rle"] for r in world.records] == [r["rle"] for r in data.records]
    assert [r["response"] for r in world.records] == [r["response"] for r in data.records]
    assert any(decode_rle(r["rle"]).any() for r in data.records)  # not a trivial all-empty parity
    assert 0 < world.scores.giou < 1


@pytest.mark.parametrize("fmt, split, n", [("refcoco", "testA", 4), ("reasonseg", "testA", 4), ("grefcoco", "multi", 10)])
def test_exported_world_samples_score_as_the_world(tiny_model, tmp_path, fmt, split, n):  # noqa: F811
    config = MULTI if split == "multi" else FAST
    world = run_evaluation(tiny_model, [split], n, seed=1, config=config)[split]
    samples = [s.to_seg_sample() for s in generate(split, n, seed=1)]
    if fmt == "refcoco":
        export_refcoco(samples, tmp_path, image_format="png")
    elif fmt == "grefcoco":
        export_grefcoco(samples, tmp_path, image_format="png")
    else:
        export_reasonseg(samples, tmp_path / split, image_format="png")
    data = run_evaluation(tiny_model, [split], None, config=config, data=f"{fmt}:{tmp_path}")[split]
    assert data.scores.n_samples == n
    _same(world, data)
    if fmt == "grefcoco":  # GRES's four numbers, no-target samples included
        assert data.scores.n_no_target >= 1 and data.records[0]["source"]["ann_ids"] is not None


def test_eval_cli_on_a_dataset_split(tiny_checkpoint, tmp_path):  # noqa: F811
    from segcompass.cli import main

    samples = [s.to_seg_sample() for s in generate("testA", 2, seed=1)]
    export_refcoco(samples, tmp_path / "refer", image_format="png")
    out = tmp_path / "eval"
    code = main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", f"refcoco:{tmp_path / 'refer'}",
                 "--split", "testA", "--out", str(out), "--max-new-tokens", "8", "--no-progress"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"testA"} and metrics["splits"]["testA"]["n_samples"] == 2
    assert metrics["meta"]["eval"]["splits"] == ["testA"]
    records = json.loads((out / "predictions.json").read_text())
    assert [r["source"]["ref_id"] for r in records] == [0, 1] and records[0]["family"] == "refcoco"
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", f"refcoco:{tmp_path / 'refer'}",
                 "--split", "testC", "--out", str(out)]) == 2  # unknown split: one line, exit 2
    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", "coco:/x", "--out", str(out)]) == 2
