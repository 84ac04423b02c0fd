"""Slot mask decoder (parity with SamModel's own mask-prompt path) and the SAM backbone."""

import pytest
import torch

from segcompass.build import build_backbone, build_mask_decoder
from segcompass.sam import build_sam


@pytest.fixture(scope="module")
def sam():
    return build_sam("sam-tiny-16", seed=0)


def test_each_slot_equals_sam_with_that_heatmap_as_mask_prompt(sam):
    decoder = build_mask_decoder(sam)
    torch.manual_seed(1)
    image = torch.randn(2, 64, 16, 16)
    heat = torch.randn(2, 3, 64, 64)
    out = decoder(heat, image)
    assert out.mask_logits.shape == (2, 3, 64, 64) and out.iou_pred.shape == (2, 3)
    with torch.no_grad():
        for b in range(2):
            for k in range(3):
                ref = sam(image_embeddings=image[b:b + 1], input_masks=heat[b:b + 1, k:k + 1],
                          multimask_output=False)
                torch.testing.assert_close(out.mask_logits[b, k], ref.pred_masks[0, 0, 0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(out.iou_pred[b, k], ref.iou_scores[0, 0, 0], atol=1e-5, rtol=1e-5)


def test_heatmap_must_be_four_times_the_embedding(sam):
    with pytest.raises(ValueError, match="4x"):
        build_mask_decoder(sam)(torch.randn(1, 2, 32, 32), torch.randn(1, 64, 16, 16))


def test_gradients_reach_heatmap_and_decoder(sam):
    decoder = build_mask_decoder(sam)
    heat = torch.randn(1, 2, 64, 64, requires_grad=True)
    decoder(heat, torch.randn(1, 64, 16, 16)).mask_logits.sum().backward()
    assert heat.grad.abs().sum() > 0
    assert decoder.mask_decoder.iou_token.weight.grad is not None
    decoder.zero_grad()


def test_frozen_backbone_stays_frozen(sam):
    backbone = build_backbone(sam, trainable=False)
    backbone.train()
    assert not backbone.vision_encoder.training
    assert not any(p.requires_grad for p in backbone.parameters())
    pixels = torch.randn(2, 3, 128, 128)
    embedding = backbone(pixels)
    assert embedding.shape == (2, 64, 16, 16) and not embedding.requires_grad
    torch.testing.assert_close(embedding, sam.get_image_embeddings(pixels))


def test_trainable_backbone_gets_gradients():
    sam = build_sam("sam-tiny-32", seed=0)
    backbone = build_backbone(sam, trainable=True).train()
    embedding = backbone(torch.randn(1, 3, 128, 128))
    assert embedding.shape == (1, 64, 32, 32)
    embedding.sum().backward()
    assert backbone.vision_encoder.patch_embed.projection.weight.grad.abs().sum() > 0
