"""SAM vision encoder as the image-key backbone: pixels -> image embedding (B, C, h, w).

The paper's vision branch is SAM ViT-H, frozen, its embeddings precomputed (256 x 64 x 64
for a 1024^2 input). Frozen here means no gradients and eval mode even when the
surrounding model is put in training mode. The embedded world's small SAM-architecture
encoder is trained instead (`trainable=True`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.models.sam.modeling_sam import SamVisionEncoder


class SamBackbone(nn.Module):
    def __init__(self, *, vision_encoder: SamVisionEncoder, trainable: bool = False):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.trainable = trainable
        vision_encoder.requires_grad_(trainable)
        if not trainable:
            vision_encoder.eval()

    @property
    def image_size(self) -> int:
        """Side of the square, padded input the encoder expects (1024 for SAM ViT-*)."""
        return int(self.vision_encoder.config.image_size)

    def train(self, mode: bool = True) -> "SamBackbone":
        super().train(mode)
        if not self.trainable:
            self.vision_encoder.eval()  # a frozen encoder never switches to training mode
        return self

    def forward(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (B, 3, S, S) normalised -> image embedding (B, C, S/p, S/p)."""
        pixel_values = pixel_values.to(self.vision_encoder.patch_embed.projection.weight.dtype)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.vision_encoder(pixel_values).last_hidden_state
