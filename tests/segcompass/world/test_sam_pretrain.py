"""World SAM pretraining: coarse prompts, batches, a loadable result, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from saekit.errors import UserError
from segcompass.world.scenes import make_sample
from segcompass.world.sam_pretrain import (CHECKPOINT_DIR, REPORT_FILE, SamPretrainConfig, coarse_prompt,
                                     instance_masks, pretrain_sam, prompt_batch)

TINY = dict(steps=4, batch_size=2, prompts_per_image=2, eval_samples=2, threads=1, checkpoint_every=2)


def test_coarse_prompt_is_positive_on_the_object_and_negative_away_from_it():
    mask = torch.zeros(1, 64, 64)
    mask[0, 16:48, 16:48] = 1
    logits = coarse_prompt(mask, 16, torch.Generator().manual_seed(0), shift_probability=0.0)
    assert logits.shape == (1, 64, 64)
    assert logits[0, 24:40, 24:40].mean() > 1.5 and logits[0, :8].mean() < -1.5


def test_prompt_batch_pairs_each_prompt_with_a_real_instance():
    samples = [make_sample("train", i, 0) for i in range(2)]
    cfg = SamPretrainConfig(**TINY)
    from segcompass.sam import sam_config

    batch = prompt_batch(samples, cfg, sam_config("sam-tiny-16"), torch.Generator().manual_seed(0))
    assert batch.pixel_values.shape == (2, 3, 128, 128)
    assert batch.prompts.shape == batch.targets.shape == (2, 2, 64, 64)
    assert batch.identity.shape == (2, 3, 256)
    for row, sample in enumerate(samples):
        # every target is one object's visible mask, downsampled 2x (128 -> 64) by area
        truth = instance_masks(sample)[:, None]  # (N, 1, 128, 128)
        pooled = torch.nn.functional.avg_pool2d(truth, 2)[:, 0]  # (N, 64, 64)
        for target in batch.targets[row]:
            assert min(float((target - p).abs().max()) for p in pooled) < 1e-5


def test_pretrain_saves_a_loadable_sam_and_resumes_identically(tmp_path):
    from segcompass.sam import load_sam

    straight = pretrain_sam(SamPretrainConfig(out=tmp_path / "a", **TINY), progress=False)
    report = json.loads((tmp_path / "a" / REPORT_FILE).read_text())
    assert 0 <= report["val"]["mask_iou"] <= 1 and "identity_shape_accuracy" in report["val"]
    sam = load_sam("sam-tiny-16", straight)
    assert not any(p.requires_grad for p in sam.vision_encoder.parameters())
    pretrain_sam(SamPretrainConfig(out=tmp_path / "b", **TINY), progress=False, stop_after=2)
    assert json.loads((tmp_path / "b" / CHECKPOINT_DIR / "state.json").read_text())["step"] == 2
    pretrain_sam(SamPretrainConfig(out=tmp_path / "b", **TINY), progress=False)
    a = load_file(tmp_path / "a" / CHECKPOINT_DIR / "model.safetensors")
    b = load_file(tmp_path / "b" / CHECKPOINT_DIR / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(UserError, match=r"^sam-pretrain: .*checkpoint was written with other settings: "
                                        r"field 'steps' was 4, now 6; field 'lr' was 0\.001, now 0\.01; use another"):
        pretrain_sam(SamPretrainConfig(out=tmp_path / "b", **{**TINY, "steps": 6}, lr=1e-2), progress=False)


def test_world_sam_without_weights_gets_a_one_line_error(tmp_path):
    from segcompass.sam import load_sam

    with pytest.raises(UserError, match="sam-pretrain"):
        load_sam("sam-tiny-16")
    with pytest.raises(UserError, match="no such directory"):
        load_sam("sam-tiny-16", tmp_path / "missing")
