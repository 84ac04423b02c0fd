"""Teacher-forced examples and batches of the world's tiny policy.

The policy task (template prompt -> '<think> CoT </think> <REF_POS>xK') and the auxiliary
caption task, with the perception labels its probes read. Shared by the warm start, which
trains on them, and the policy evaluation, which scores the policy on them.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from segcompass.template import K_MULTI, REF_TOKEN, ref_token_mask
from segcompass.world.probes import patch_targets, slot_targets

CAPTION_PROMPT = "describe the scene ."
"""Prompt of the auxiliary caption task (see `caption_example`)."""

class Example(NamedTuple):
    """One teacher-forcing example."""

    image: np.ndarray
    """(H, W, 3) uint8."""
    prompt: str
    response: str
    patches: np.ndarray
    """(5, G, G) int64 perception labels per vision patch (`word_probe.patch_targets`)."""
    slots: np.ndarray
    """(2, K_MULTI) int64 colour/shape labels of the response's <REF_POS> tokens (`word_probe.slot_targets`)."""


def reference_example(sample, grid: int, object_position: bool = True) -> Example:
    """The policy task: the template prompt and '<think> {CoT} </think> <REF_POS>×K'."""
    from segcompass.template import build_prompt, format_response, k_for

    return Example(sample.image, build_prompt(sample.instruction, multi=sample.multi_prompt),
                   format_response(sample.cot, k_for(sample.multi_prompt)),
                   patch_targets(sample, grid, object_position=object_position), slot_targets(sample, K_MULTI))


def caption_example(sample, grid: int, object_position: bool = True) -> Example:
    """The perception task: 'describe the scene .' -> every object with size and position.

    Like LLaVA's caption-alignment stage it supervises every object in the image, where
    a referring CoT grounds one to three; it shares no prompt with the policy task.
    """
    from segcompass.world.language import describe_scene

    # A caption has no <REF_POS>, so its slot labels are never read.
    return Example(sample.image, CAPTION_PROMPT, describe_scene(sample.objects),
                   patch_targets(sample, grid, object_position=object_position), np.zeros((2, K_MULTI), dtype=np.int64))


class TeacherBatch(NamedTuple):
    """Model inputs of a teacher-forced batch and the targets of its loss."""

    model_inputs: dict[str, torch.Tensor]
    """input_ids, attention_mask, pixel_values."""
    labels: torch.Tensor
    """(B, T) int64 next-token targets aligned with the inputs (label[t] is predicted at t-1);
    -100 except at response tokens and the end-of-turn token that follows them."""
    patch_targets: torch.Tensor
    """(B, 5, G*G) int64 perception labels per image token, raster order (`word_probe.PROBE_FIELDS`)."""
    slot_rows: torch.Tensor
    """(N,) int64 row of each <REF_POS> token of the batch."""
    slot_positions: torch.Tensor
    """(N,) int64 position of each <REF_POS> token in its row."""
    slot_labels: torch.Tensor
    """(N, 2) int64 colour/shape label of each <REF_POS> token (`word_probe.SLOT_FIELDS`)."""

    def to(self, device) -> "TeacherBatch":
        return TeacherBatch(*({k: v.to(device) for k, v in self.model_inputs.items()},
                              *(t.to(device) for t in self[1:])))


def teacher_batch(loaded, examples: Sequence[Example]) -> TeacherBatch:
    """Prompt + response of each example, right-padded, with response-only labels."""
    from PIL import Image

    from saekit.inputs import TokenType, build_batch

    batch = build_batch(loaded, [Image.fromarray(e.image) for e in examples], [e.prompt for e in examples],
                        [e.response for e in examples], padding_side="right")
    is_response = batch.token_types == int(TokenType.RESPONSE)  # (B, T)
    # The end-of-turn marker right after the last response token is learned too.
    last = (is_response.long() * torch.arange(is_response.shape[1])).argmax(dim=1)  # (B,)
    supervised = is_response.clone()
    supervised[torch.arange(len(examples)), (last + 1).clamp(max=is_response.shape[1] - 1)] = True
    ignore = torch.full_like(batch.model_inputs["input_ids"], -100)
    patches = torch.from_numpy(np.stack([e.patches for e in examples])).flatten(2)  # (B, 5, G, G) -> (B, 5, G*G)
    # the prompt names <REF_POS> too ("output 4 <REF_POS> tokens"): only the response's count
    is_ref = ref_token_mask(batch.model_inputs["input_ids"], batch.token_types,
                            loaded.tokenizer.convert_tokens_to_ids(REF_TOKEN))  # (B, T)
    rows, positions = is_ref.nonzero(as_tuple=True)  # (N,), (N,) row-major: slots in order
    slot_index = is_ref.long().cumsum(1)[rows, positions] - 1  # (N,) k of each <REF_POS> in its row
    slots = torch.from_numpy(np.stack([e.slots for e in examples]))  # (B, 2, K_MULTI)
    return TeacherBatch(batch.model_inputs, torch.where(supervised, batch.model_inputs["input_ids"], ignore),
                        patches, rows, positions, slots[rows, :, slot_index])  # (N, 2)
