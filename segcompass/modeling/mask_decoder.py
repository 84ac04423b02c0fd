"""Mask decoder: each slot's heatmap as SAM's dense mask prompt -> one mask per slot.

Built from `transformers`' SAM pieces (the `segment-anything` package needs torchvision,
which cannot be imported here): `SamPromptEncoder` embeds the heatmap logits with its three
mask-embedding convolutions (2x2/s2, 2x2/s2, 1x1: the paper's "three stacked 2D
convolutional blocks" that resample the heatmap to the decoder resolution), and
`SamMaskDecoder` (two-way transformer) cross-attends its output tokens with the image
embedding plus that dense prompt. No point or box prompt is given. One mask per slot
(SAM's single-mask output, `multimask_output=False`).

The image embedding is precomputed (frozen SAM vision encoder); masks come out at 4x the
embedding side (256^2 for ViT-H). Upsampling to the image size is done outside modeling
(`segcompass.postprocess`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from transformers.models.sam.modeling_sam import (SamMaskDecoder, SamPositionalEmbedding,
                                                  SamPromptEncoder)


class MaskDecoderOutput(NamedTuple):
    mask_logits: Tensor
    """(B, K_s, 4h, 4w) mask logits, one map per slot."""
    iou_pred: Tensor
    """(B, K_s) SAM's predicted IoU of each mask."""


class SlotMaskDecoder(nn.Module):
    """SAM prompt encoder (dense mask prompt only) + two-way mask decoder, per slot."""

    def __init__(self, *, prompt_encoder: SamPromptEncoder, mask_decoder: SamMaskDecoder,
                 positional_embedding: SamPositionalEmbedding):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # SamModel.shared_image_embedding: random Fourier features for the image grid.
        self.positional_embedding = positional_embedding

    def image_positional_embedding(self, height: int, width: int) -> Tensor:
        """(1, C, h, w) positional encoding of the embedding grid (as SamModel computes it)."""
        weight = self.positional_embedding.positional_embedding
        y = (torch.arange(height, device=weight.device, dtype=weight.dtype) + 0.5) / height
        x = (torch.arange(width, device=weight.device, dtype=weight.dtype) + 0.5) / width
        grid = torch.stack(torch.broadcast_tensors(x[None, :], y[:, None]), dim=-1)  # (h, w, 2) as (x, y)
        return self.positional_embedding(grid).permute(2, 0, 1).unsqueeze(0)

    def forward(self, heatmap_logits: Tensor, image_embeddings: Tensor) -> MaskDecoderOutput:
        """heatmap_logits (B, K, 4h, 4w), image_embeddings (B, C, h, w) -> MaskDecoderOutput."""
        batch, slots, prompt_h, prompt_w = heatmap_logits.shape
        _, channels, height, width = image_embeddings.shape
        if (prompt_h, prompt_w) != (4 * height, 4 * width):
            raise ValueError(f"heatmap {prompt_h}x{prompt_w} must be 4x the image embedding "
                             f"{height}x{width} (SAM's mask-prompt size)")
        dtype = self.mask_decoder.iou_token.weight.dtype
        # Every slot becomes its own decoder batch entry: SAM adds the dense prompt to the
        # image embedding per batch entry, so slots cannot share one.
        prompts = heatmap_logits.reshape(batch * slots, 1, prompt_h, prompt_w).to(dtype)  # (B*K, 1, 4h, 4w)
        dense = self.prompt_encoder.mask_embed(prompts)  # (B*K, C, h, w)
        images = image_embeddings.to(dtype).repeat_interleave(slots, dim=0)  # (B, C, h, w) -> (B*K, C, h, w)
        position = self.image_positional_embedding(height, width).to(dtype) \
            .expand(batch * slots, -1, -1, -1)
        masks, iou = self.mask_decoder(
            image_embeddings=images, image_positional_embeddings=position,
            sparse_prompt_embeddings=None, dense_prompt_embeddings=dense,
            multimask_output=False)  # masks (B*K, 1, 1, 4h, 4w), iou (B*K, 1, 1)
        mask_logits = masks.reshape(batch, slots, masks.shape[-2], masks.shape[-1])
        return MaskDecoderOutput(mask_logits=mask_logits, iou_pred=iou.reshape(batch, slots))
