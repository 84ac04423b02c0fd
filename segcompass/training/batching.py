"""World samples -> the tensors one SegCompass step needs (prompt + response, SAM targets)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from saekit.inputs import ModelBatch, build_batch
from segcompass.world.scenes import WorldSample, iter_samples
from segcompass.postprocess import targets_to_frame
from segcompass.template import build_prompt, format_response, k_for


class SegBatch(NamedTuple):
    samples: list[WorldSample]
    """The world samples of the batch."""
    images: list[np.ndarray]
    """(H, W, 3) uint8 images."""
    model_batch: ModelBatch
    """Policy inputs: prompt + response, right-padded, with saekit token types."""
    frame_targets: list[Tensor]
    """Per sample (N, S, S) float target masks in SAM's padded square input frame."""
    active_slots: list[int]
    """Per sample, how many concentration tokens its prompt asks for (K_SINGLE or K_MULTI)."""


def seg_batch(model, split: str, n: int, *, seed: int, start: int,
              responses: Sequence[str] | None = None) -> SegBatch:
    """Samples start..start+n-1 of `split`; `responses` default to the ground-truth CoT + K tokens."""
    return batch_from_samples(model, list(iter_samples(split, n, seed, start)), responses)


def batch_from_samples(model, samples: list[WorldSample], responses: Sequence[str] | None = None) -> SegBatch:
    """Policy inputs and SAM-frame targets of `samples` (teacher-forced when `responses` is None)."""
    prompts = [build_prompt(s.instruction, multi=s.multi_prompt) for s in samples]
    if responses is None:
        responses = [format_response(s.cot, k_for(s.multi_prompt)) for s in samples]
    images = [s.image for s in samples]
    model_batch = build_batch(model.loaded, [Image.fromarray(i) for i in images], prompts, list(responses),
                              padding_side="right")
    targets = [targets_to_frame(torch.from_numpy(s.target_masks), input_size=model.sam_input_size)
               for s in samples]
    return SegBatch(samples, images, model_batch, targets, [k_for(s.multi_prompt) for s in samples])
