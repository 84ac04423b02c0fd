"""SAM presets, loading a real-layout directory, preprocessing, frame transforms, embedding cache."""

import numpy as np
import pytest
import torch

from saekit.errors import UserError
from segcompass.build import build_backbone
from segcompass.postprocess import masks_to_image, targets_to_frame
from segcompass.sam import (SAM_PRESETS, ImageEmbeddingCache, build_sam, embed_images, encoder_fingerprint,
                            image_key, load_sam, preprocess_images, sam_config)


def test_real_presets_have_the_paper_embedding():
    for name, (width, depth) in {"sam-vit-b": (768, 12), "sam-vit-l": (1024, 24), "sam-vit-h": (1280, 32)}.items():
        config = sam_config(name)
        assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (width, depth)
        assert config.vision_config.output_channels == 256
        assert config.prompt_encoder_config.image_embedding_size == 64  # 256 x 64 x 64
    assert SAM_PRESETS["sam-tiny-16"].embedding_size == 16 and SAM_PRESETS["sam-tiny-32"].embedding_size == 32


def test_real_layout_directory_loads_through_the_preset(tmp_path):
    saved = build_sam("sam-tiny-16", seed=3)
    saved.save_pretrained(tmp_path / "sam-vit-base")
    assert (tmp_path / "sam-vit-base" / "model.safetensors").is_file()
    with pytest.warns(UserWarning, match="differs from preset sam-vit-b"):
        loaded = load_sam("sam-vit-b", model_path=tmp_path / "sam-vit-base")
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in loaded.vision_encoder.parameters())
    assert all(p.requires_grad for p in loaded.mask_decoder.parameters())
    assert not loaded.vision_encoder.training


def test_missing_or_incomplete_directory_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="--sam-path") as missing:
        load_sam("sam-vit-h", model_path=tmp_path / "nowhere")
    assert "\n" not in str(missing.value)
    (tmp_path / "bin-only").mkdir()
    (tmp_path / "bin-only" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="safetensors"):
        load_sam("sam-vit-h", model_path=tmp_path / "bin-only")
    with pytest.raises(UserError, match="--sam-path"):  # not in the (offline, empty) HF cache
        load_sam("sam-vit-l")
    with pytest.raises(UserError, match="no published weights"):  # world presets: no hub id
        load_sam("sam-tiny-16")
    with pytest.raises(UserError, match="sam-pretrain"):  # a folder that is not a sam-pretrain output
        load_sam("sam-tiny-16", model_path=tmp_path)
    with pytest.raises(UserError, match="unknown SAM preset"):
        load_sam("sam-vit-x", model_path=tmp_path)


def test_preprocess_resizes_longest_side_and_pads():
    image = np.full((100, 60, 3), 255, dtype=np.uint8)
    inputs = preprocess_images([image], 128)
    assert inputs.pixel_values.shape == (1, 3, 128, 128)
    assert inputs.resized_sizes.tolist() == [[128, 77]] and inputs.original_sizes.tolist() == [[100, 60]]
    assert (inputs.pixel_values[0, :, :, 77:] == 0).all()  # padding
    torch.testing.assert_close(inputs.pixel_values[0, 0, 0, 0], torch.tensor((255 - 123.675) / 58.395))


def test_frame_round_trip_keeps_the_mask():
    mask = torch.zeros(1, 100, 60, dtype=torch.bool)
    mask[0, 20:70, 10:40] = True
    framed = targets_to_frame(mask, input_size=128, out_size=32)  # (1, 32, 32) soft
    assert framed.shape == (1, 32, 32) and framed[:, :, 20:].sum() == 0  # right padding stays empty
    back = masks_to_image((framed - 0.5) * 20, input_size=128, resized=(128, 77), original=(100, 60)) > 0
    iou = (back & mask).sum() / (back | mask).sum()
    assert back.shape == (1, 100, 60) and iou > 0.9


def test_embedding_cache_hit_returns_identical_tensors(tmp_path):
    sam = build_sam("sam-tiny-16", seed=0)
    backbone = build_backbone(sam)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2)]
    cache = ImageEmbeddingCache(tmp_path, encoder_fingerprint(sam))
    calls = []

    def compute(batch):
        calls.append(len(batch))
        return backbone(preprocess_images(batch, 128).pixel_values)

    first = cache.get_or_compute([images[0], images[1], images[0]], compute)
    assert calls == [2] and first.shape == (3, 64, 16, 16)  # the duplicate is computed once
    second = cache.get_or_compute([images[1], images[0]], compute)
    assert calls == [2]  # all hits
    assert torch.equal(second[0], first[1]) and torch.equal(second[1], first[0])
    assert not list(tmp_path.rglob("*.tmp"))
    direct = embed_images(backbone, images)
    torch.testing.assert_close(embed_images(backbone, images, cache=cache), direct)
    other = ImageEmbeddingCache(tmp_path, encoder_fingerprint(build_sam("sam-tiny-16", seed=1)))
    assert other.directory != cache.directory and other.get(image_key(images[0])) is None
    assert cache.get(image_key(images[0])) is not None
