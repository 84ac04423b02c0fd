"""Predictor on the tiny random checkpoint: shapes, the final-mask rule, determinism, provenance
against a direct SAE encoding, and `segcompass predict` end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from segcompass_tiny import tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)

from saekit.errors import UserError
from saekit.inputs import TokenType
from segcompass.world.scenes import generate
from segcompass.predictor import Predictor, PredictorConfig, Query
from segcompass.template import K_MULTI, K_SINGLE

FAST = dict(max_new_tokens=12, top_atoms=4)


@pytest.fixture(scope="module")
def samples():
    return generate("val", 2, seed=1)  # val-1: index 0 single-object prompt, index 1 multi


def test_shapes_and_single_prompt_uses_slot_zero(tiny_model, samples):
    # Threshold 1.0 can never be reached: the single prompt must ignore it and keep slot 0.
    predictor = Predictor(tiny_model, PredictorConfig(conf_threshold=1.0, **FAST))
    image = samples[0].image
    wide = np.ascontiguousarray(np.concatenate([image, image[:, :32]], axis=1))  # (128, 160, 3)
    preds = predictor.predict([image, wide], ["the red square", "the blue circle"], multi=False)
    for pred, img in zip(preds, (image, wide)):
        h, w = img.shape[:2]
        assert pred.mask.shape == (h, w) and pred.mask.dtype == bool
        assert pred.slot_masks.shape == (K_SINGLE, h, w) and pred.slot_probs.shape == (K_SINGLE, h, w)
        assert pred.confidences.shape == (K_SINGLE,) and pred.heatmaps.shape[0] == K_SINGLE
        assert pred.selected.tolist() == [True]
        np.testing.assert_array_equal(pred.mask, pred.slot_masks[0])
        # mask = logit > 0; its probability is >= 0.5 (exactly 0.5 where sigmoid rounds a tiny logit)
        assert (pred.slot_probs[pred.slot_masks] >= 0.5).all() and (pred.slot_probs[~pred.slot_masks] <= 0.5).all()
        assert pred.image_grid == (4, 4) and len(pred.provenance) == K_SINGLE
        assert 1 <= len(pred.provenance[0].atoms) <= FAST["top_atoms"]
    # LLaVA's processor centre-crops: the grid covers the central 128 x 128 of the wide image
    assert preds[1].grid_region == (0, 16, 128, 128) and preds[0].grid_region == (0, 0, 128, 128)
    assert preds[1].heatmaps.shape[2] > preds[1].heatmaps.shape[1]  # padding cropped: wider than tall


def test_multi_prompt_threshold_rule(tiny_model, samples):
    image, instruction = samples[1].image, samples[1].instruction
    none = Predictor(tiny_model, PredictorConfig(conf_threshold=1.0, **FAST)).predict(
        [image], [instruction], multi=True)[0]
    assert none.slot_masks.shape[0] == K_MULTI and (none.confidences < 1.0).all()
    assert not none.selected.any() and not none.mask.any()  # no confident slot: "no target"
    every = Predictor(tiny_model, PredictorConfig(conf_threshold=0.0, **FAST)).predict(
        [image], [instruction], multi=True)[0]
    assert every.selected.all()
    np.testing.assert_array_equal(every.mask, every.slot_masks.any(axis=0))
    cut = float(np.median(every.confidences))
    some = Predictor(tiny_model, PredictorConfig(conf_threshold=cut, **FAST)).predict(
        [image], [instruction], multi=True)[0]
    np.testing.assert_array_equal(some.selected, some.confidences >= cut)
    np.testing.assert_array_equal(some.mask, some.slot_masks[some.selected].any(axis=0))


def test_deterministic(tiny_model, samples):
    predictor = Predictor(tiny_model, PredictorConfig(**FAST))
    args = ([s.image for s in samples], [s.instruction for s in samples])
    first = predictor.predict(*args, multi=[s.multi_prompt for s in samples])
    second = predictor.predict(*args, multi=[s.multi_prompt for s in samples])
    for a, b in zip(first, second):
        assert a.response == b.response
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_array_equal(a.slot_probs, b.slot_probs)
        np.testing.assert_array_equal(a.confidences, b.confidences)
        assert [t.atom for t in a.provenance[0].atoms] == [t.atom for t in b.provenance[0].atoms]
    assert set(predictor.last_stages._fields) == {"decode", "forward", "postprocess"}


def test_provenance_matches_direct_sae_encoding(tiny_model, samples):
    """Every firing the predictor reports equals h_j of the SAE on that token's layer-L state."""
    predictor = Predictor(tiny_model, PredictorConfig(**FAST))
    sample = samples[0]
    [pred] = predictor.predict([sample.image], [sample.instruction], multi=sample.multi_prompt)
    query = Query(sample.image, sample.instruction, sample.multi_prompt)
    with torch.no_grad():
        batch, out = predictor.run_model([query], [pred.response])
        dense = tiny_model.sae.encode(out.slots.sae_tokens)  # (N, d_sae) slow reference
    position_of_cell = {tuple(batch.image_grid[0, p].tolist()): p
                        for p in range(batch.token_types.shape[1])
                        if batch.token_types[0, p] == int(TokenType.IMAGE)}
    row_of_position = {int(p): i for i, p in enumerate(out.slots.token_position.tolist())}
    threshold = tiny_model.head_cfg.threshold
    checked = 0
    for trace in pred.provenance[0].atoms:
        fired = (dense[:, trace.atom] >= threshold).sum().item()
        assert len(trace.image_cells) + len(trace.text) == fired  # every firing, nothing else
        for (r, c), value in zip(trace.image_cells, trace.image_values):
            row = row_of_position[position_of_cell[(int(r), int(c))]]
            assert value == pytest.approx(dense[row, trace.atom].item(), rel=1e-5)
            checked += 1
        for firing in trace.text:
            assert firing.activation == pytest.approx(dense[row_of_position[firing.position], trace.atom].item(),
                                                      rel=1e-5)
            kind = int(batch.token_types[0, firing.position])
            assert firing.kind == ("response" if kind == int(TokenType.RESPONSE) else "prompt")
            checked += 1
    assert checked > 0
    weights = [t.weight for t in pred.provenance[0].atoms]
    assert weights == sorted(weights, reverse=True)
    assert "".join(t.text for t in pred.response_tokens).strip() == pred.response.strip()


def test_bad_inputs(tiny_model):
    predictor = Predictor(tiny_model, PredictorConfig(**FAST))
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(UserError, match="one of each"):
        predictor.predict([image, image], ["a"], multi=False)
    with pytest.raises(UserError, match="uint8"):
        predictor.predict([image.astype(np.float32)], ["a"], multi=False)
    with pytest.raises(UserError, match="conf-threshold"):
        PredictorConfig(conf_threshold=1.5)


def test_predict_cli_end_to_end(tiny_checkpoint, tmp_path):  # noqa: F811
    from segcompass.cli import main

    sample = generate("val", 1, seed=3)[0]
    image_path = tmp_path / "val.png"
    Image.fromarray(sample.image).save(image_path)
    out = tmp_path / "report"
    code = main(["predict", "--checkpoint", str(tiny_checkpoint), str(image_path), sample.instruction,
                 "--multi", "--out", str(out), "--max-new-tokens", "12", "--top-atoms", "3"])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"mask.png", "overlay.png", "prediction.json", "report.html"} <= names
    assert {f"heatmap_slot{k}.png" for k in range(K_MULTI)} <= names
    record = json.loads((out / "prediction.json").read_text())
    assert record["instruction"] == sample.instruction and record["multi"] is True
    assert len(record["slots"]) == K_MULTI and all(len(s["top_atoms"]) <= 3 for s in record["slots"])
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == sample.image.shape[:2] and int((mask > 0).sum()) == record["mask_area"]
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "missing.png"), "x",
                 "--out", str(out)]) == 2
