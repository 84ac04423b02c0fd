"""Real-scale switches on CPU: bf16 autocast and activation checkpointing are no-ops here, and a
pretrained (frozen) SAM's image embeddings are computed once and read back from the disk cache,
bit-identical, keyed by image content and by the preset + encoder weights."""

import dataclasses

import torch

from segcompass.training.scale import autocast_context, prepare_model
from segcompass.training.supervised import TrainConfig, train
from segcompass.world.scenes import generate
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401 (session fixture)


def _cfg(ckpt, out, **overrides):
    return TrainConfig(policy=ckpt / "policy", sae=ckpt / "sae", out=out, sae_layer=TINY_SAE_LAYER,
                       sam_path=ckpt / "sam", steps=1, batch_size=2, threads=1, device="cpu", **overrides)


def test_frozen_sam_embeddings_are_cached_on_disk(tiny_checkpoint, tmp_path):  # noqa: F811
    from segcompass.model import build_segcompass

    cfg = _cfg(tiny_checkpoint, tmp_path)
    model = build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae, sam_path=cfg.sam_path)
    assert not model.backbone.trainable
    images = [s.image for s in generate("val", 2, seed=1)]
    with torch.no_grad():
        plain = model.image_embeddings(images)
    prepare_model(model, cfg, torch.device("cpu"), tmp_path)
    assert not model.policy.is_gradient_checkpointing  # GPU only
    first = model.image_embeddings(images)
    files = sorted((tmp_path / "sam_cache").rglob("*.safetensors"))
    assert len(files) == 2 and files[0].parent.parent.name.startswith("sam-tiny-16-")
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = model.image_embeddings(images[::-1])
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # read, not recomputed
    assert torch.equal(first, plain) and torch.equal(second, plain.flip(0))
    with autocast_context(cfg, torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")


def test_training_with_a_pretrained_sam_fills_the_cache(tiny_checkpoint, tmp_path):  # noqa: F811
    final = train(_cfg(tiny_checkpoint, tmp_path), progress=False)
    assert (final / "segcompass.json").is_file()
    assert len(list((tmp_path / "sam_cache").rglob("*.safetensors"))) == 2
    shared = tmp_path / "shared"
    train(dataclasses.replace(_cfg(tiny_checkpoint, tmp_path / "b"), sam_cache=shared), progress=False)
    assert len(list(shared.rglob("*.safetensors"))) == 2
