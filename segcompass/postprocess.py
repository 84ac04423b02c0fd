"""Moving masks between the image frame and SAM's padded square input frame.

SAM resizes an image so its longest side is S (1024, or 128 in the world), pads it
bottom/right to S x S, and predicts masks at S/4 (256). Masks go back to the image by
upsampling to S, cropping the padding and resizing to the original size (as
segment-anything's `postprocess_masks`); ground truth goes the other way for the losses.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(h, w) after scaling the longest side to `side` (segment-anything ResizeLongestSide)."""
    scale = side / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def masks_to_image(mask_logits: Tensor, *, input_size: int, resized: tuple[int, int],
                   original: tuple[int, int]) -> Tensor:
    """(..., m, m) logits in the padded S x S frame -> (..., H, W) logits for the image.

    `resized` is the (h, w) of the image inside the square, `original` its (H, W).
    """
    lead = mask_logits.shape[:-2]
    x = mask_logits.reshape(-1, 1, *mask_logits.shape[-2:]).float()  # (..., m, m) -> (N, 1, m, m)
    x = F.interpolate(x, size=(input_size, input_size), mode="bilinear", align_corners=False)
    x = x[..., :resized[0], :resized[1]]  # drop the padding
    x = F.interpolate(x, size=tuple(original), mode="bilinear", align_corners=False)
    return x.reshape(*lead, *original)


def targets_to_frame(masks: Tensor, *, input_size: int, out_size: int | None = None) -> Tensor:
    """(N, H, W) bool/float target masks -> (N, s, s) float in the padded square frame.

    Resized (area-averaged when shrinking, so borders become soft targets) so the longest
    side is `input_size`, zero-padded, then area-resized to `out_size` (default input_size).
    """
    n, height, width = masks.shape
    h, w = resized_size(height, width, input_size)
    x = masks.float()[:, None]  # (N, H, W) -> (N, 1, H, W)
    if (h, w) != (height, width):
        x = F.interpolate(x, size=(h, w), mode="area" if h <= height else "bilinear")
    x = F.pad(x, (0, input_size - w, 0, input_size - h))
    side = out_size or input_size
    if side != input_size:
        x = F.interpolate(x, size=(side, side), mode="area" if side < input_size else "bilinear")
    return x[:, 0].clamp(0, 1)


def resize_targets(targets: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, H, W) float targets in the model frame -> (N, h, w), area-averaged when shrinking."""
    if targets.shape[0] == 0:  # a no-target sample: interpolate rejects an empty batch
        return targets.float().new_zeros(0, *size)
    if tuple(targets.shape[-2:]) == tuple(size):
        return targets.float()
    shrink = size[0] <= targets.shape[-2] and size[1] <= targets.shape[-1]
    x = F.interpolate(targets.float()[:, None], size=size, mode="area" if shrink else "bilinear",
                      align_corners=None if shrink else False)
    return x[:, 0].clamp(0, 1)

