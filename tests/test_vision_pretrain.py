"""Stage 0 of the warm start: per-patch labels, a training run that changes only the tower."""

import torch

from segcompass.data.world import make_sample
from segcompass.vision_pretrain import FIELDS, patch_batch, pretrain_vision_tower
from segcompass.warmstart import WarmstartConfig, build_policy

TINY = dict(hidden_size=32, n_layers=1, n_heads=2, vision_hidden_size=16, vision_layers=2, image_size=32,
            patch_size=8)


def test_patch_batch_labels_follow_the_world_label_map():
    loaded = build_policy(WarmstartConfig(**TINY))
    samples = [make_sample("train", i, 0) for i in range(3)]
    pixels, labels = patch_batch(loaded.image_processor, samples, 4)
    assert pixels.shape == (3, 3, 32, 32) and labels.shape == (3, len(FIELDS), 16)
    # a patch is background in every field or in none
    assert ((labels[:, 0] == 0) == (labels[:, 1] == 0)).all() and ((labels[:, 1] == 0) == (labels[:, 2] == 0)).all()
    assert (labels[:, 0] > 0).any()


def test_pretraining_moves_the_tower_only_and_leaves_no_gradients():
    loaded = build_policy(WarmstartConfig(**TINY))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = pretrain_vision_tower(loaded, steps=3, batch_size=2, lr=1e-3, grid=4, seed=0,
                                   device=torch.device("cpu"), progress=False)
    assert set(result.accuracy) == set(FIELDS) and all(0 <= a <= 1 for a in result.accuracy.values())
    after = loaded.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("vision_tower" in k for k in changed)
    assert all(p.grad is None for p in loaded.model.parameters())
