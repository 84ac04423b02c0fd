"""Stage 0 of the warm start: per-patch labels, a training run that changes only the tower."""

import torch

from segcompass.world.scenes import make_sample
from segcompass.world.vision_pretrain import (CENTRE_FIELDS, FIELDS, POSITION_FIELDS, build_position_heads, patch_batch,
                                         patch_loss, position_loss, position_targets, pretrain_vision_tower)
from segcompass.world.warmstart import WarmstartConfig, build_policy

TINY = dict(hidden_size=32, n_layers=1, n_heads=2, vision_hidden_size=16, vision_layers=2, image_size=32,
            patch_size=8)


def test_patch_batch_labels_follow_the_world_label_map():
    loaded = build_policy(WarmstartConfig(**TINY))
    samples = [make_sample("train", i, 0) for i in range(3)]
    pixels, labels, centres = patch_batch(loaded.image_processor, samples, 4)
    assert pixels.shape == (3, 3, 32, 32) and labels.shape == (3, len(FIELDS), 16)
    # a patch is background in every field or in none, centre cells included
    assert ((labels[:, 0] == 0) == (labels[:, 1] == 0)).all() and ((labels[:, 1] == 0) == (labels[:, 2] == 0)).all()
    assert (labels[:, 0] > 0).any()
    assert centres.shape == (3, len(CENTRE_FIELDS), 16) and ((centres[:, 0] == -1) == (labels[:, 0] == 0)).all()
    assert ((centres >= -1) & (centres < 4)).all()


def test_pretraining_moves_the_tower_only_and_leaves_no_gradients():
    loaded = build_policy(WarmstartConfig(**TINY))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = pretrain_vision_tower(loaded, steps=3, batch_size=2, lr=1e-3, grid=4, seed=0,
                                   device=torch.device("cpu"), progress=False)
    assert set(result.accuracy) == {*FIELDS, *POSITION_FIELDS} and all(0 <= a <= 1 for a in result.accuracy.values())
    after = loaded.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("vision_tower" in k for k in changed)
    assert all(p.grad is None for p in loaded.model.parameters())


def test_position_targets_are_raster_order_rows_and_columns():
    targets = position_targets(4)  # patch 5 = row 1, col 1; patch 7 = row 1, col 3; patch 12 = row 3, col 0
    assert targets.shape == (2, 16)
    assert targets[:, 5].tolist() == [1, 1] and targets[:, 7].tolist() == [1, 3] and targets[:, 12].tolist() == [3, 0]


def test_position_loss_is_low_only_for_features_that_encode_the_position():
    torch.manual_seed(0)
    heads = build_position_heads(32, 4)
    with torch.no_grad():  # a one-hot code of (row, column) and heads that read it exactly
        for i, head in enumerate(heads):
            head.weight.zero_(), head.bias.zero_()
            head.weight[:, 16 * i:16 * i + 4] = 20 * torch.eye(4)
    coded = torch.zeros(2, 16, 32)
    rows, cols = position_targets(4)
    coded[:, torch.arange(16), rows] = 1.0
    coded[:, torch.arange(16), 16 + cols] = 1.0
    assert position_loss(heads, coded, 4) < 1e-3
    assert position_loss(heads, coded.flip(1), 4) > 1.0  # the same codes on the wrong patches


def test_centre_loss_ignores_background_patches():
    torch.manual_seed(0)
    heads = build_position_heads(8, 4)
    features = torch.randn(2, 16, 8)
    centres = torch.full((2, 2, 16), -1)
    centres[:, :, 3] = 2
    alone = patch_loss(heads, features[:, 3:4], centres[:, :, 3:4])
    assert torch.allclose(patch_loss(heads, features, centres), alone)  # only patch 3 counts


def test_centre_pretraining_reports_the_centre_fields():
    loaded = build_policy(WarmstartConfig(**TINY))
    result = pretrain_vision_tower(loaded, steps=1, batch_size=2, lr=1e-3, grid=4, seed=0,
                                   device=torch.device("cpu"), progress=False, centre_weight=1.0)
    assert set(result.accuracy) == {*FIELDS, *POSITION_FIELDS, *CENTRE_FIELDS}


def test_content_only_pretraining_reports_no_position_fields():
    loaded = build_policy(WarmstartConfig(**TINY))
    result = pretrain_vision_tower(loaded, steps=1, batch_size=2, lr=1e-3, grid=4, seed=0,
                                   device=torch.device("cpu"), progress=False, position_weight=0.0)
    assert set(result.accuracy) == set(FIELDS)
