"""Model presets: every number about a backbone saekit knows (LLaVA-1.5, Qwen2.5-VL, tiny twins).

Kept apart from loading (`saekit.models`) so the tiny builders (`saekit.tiny`) can use the
presets without importing the loader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch

from saekit.errors import UserError

ModelFamily = Literal["llava", "qwen2_5_vl"]


@dataclass(frozen=True)
class ModelPreset:
    """A backbone saekit knows how to load, hook and feed."""

    name: str
    """Preset key in `PRESETS` (the `--model` value)."""
    family: ModelFamily
    """Architecture family; equals the checkpoint's `config.model_type`."""
    hf_class: str
    """Name of the `transformers` class that loads the checkpoint."""
    hub_id: str | None
    """Hugging Face Hub id of the weights (None for tiny twins built in-process)."""
    d_model: int
    """Width of the language model's residual stream (the hooked activations)."""
    n_layers: int
    """Number of decoder blocks of the language model."""
    default_layer: int
    """Hooked layer L (HF `hidden_states[L]`, output of block L counted from 1)."""
    image_token: str
    """Placeholder token repeated once per image feature in the LLM's input ids."""
    notes: str = ""
    """Where the numbers come from and anything a user should know."""

    def __post_init__(self) -> None:
        if self.family not in ("llava", "qwen2_5_vl"):
            raise ValueError(f"preset {self.name}: unknown family {self.family!r}")
        if not 1 <= self.default_layer <= self.n_layers:
            raise ValueError(f"preset {self.name}: default_layer {self.default_layer} "
                             f"outside 1..{self.n_layers}")

    @property
    def is_tiny(self) -> bool:
        """Tiny twins have no hub weights: they are built in-process or loaded from a saved dir."""
        return self.hub_id is None


_LLAVA_NOTES = ("LLaVA-1.5: CLIP ViT-L/14-336 + Vicuna; 576 inline <image> positions "
                "(24x24 patch grid, CLS dropped); conversation 'USER: <image>\\n{prompt} ASSISTANT:'.")
_QWEN_NOTES = ("Qwen2.5-VL: <|vision_start|><|image_pad|>xN<|vision_end|>, N = (h/2)(w/2) merged "
               "14px patches; 3-D rope positions need mm_token_type_ids.")

PRESETS: dict[str, ModelPreset] = {
    "llava-1.5-7b": ModelPreset(
        name="llava-1.5-7b", family="llava", hf_class="LlavaForConditionalGeneration",
        hub_id="llava-hf/llava-1.5-7b-hf", d_model=4096, n_layers=32, default_layer=16,
        image_token="<image>", notes=_LLAVA_NOTES),
    "llava-1.5-13b": ModelPreset(
        name="llava-1.5-13b", family="llava", hf_class="LlavaForConditionalGeneration",
        hub_id="llava-hf/llava-1.5-13b-hf", d_model=5120, n_layers=40, default_layer=16,
        image_token="<image>", notes=_LLAVA_NOTES),
    "qwen2.5-vl-7b": ModelPreset(
        name="qwen2.5-vl-7b", family="qwen2_5_vl", hf_class="Qwen2_5_VLForConditionalGeneration",
        hub_id="Qwen/Qwen2.5-VL-7B-Instruct", d_model=3584, n_layers=28, default_layer=13,
        image_token="<|image_pad|>", notes=_QWEN_NOTES),
    "tiny-llava": ModelPreset(
        name="tiny-llava", family="llava", hf_class="LlavaForConditionalGeneration",
        hub_id=None, d_model=128, n_layers=4, default_layer=2, image_token="<image>",
        notes="Random-init LLaVA twin: tiny CLIP vision tower (64px, 8px patches -> 8x8 grid) "
              "+ tiny Llama; word-level tokenizer built in-process. " + _LLAVA_NOTES),
    "tiny-qwen2.5-vl": ModelPreset(
        name="tiny-qwen2.5-vl", family="qwen2_5_vl", hf_class="Qwen2_5_VLForConditionalGeneration",
        hub_id=None, d_model=128, n_layers=4, default_layer=2, image_token="<|image_pad|>",
        notes="Random-init Qwen2.5-VL twin: 8px patches, 2x2 merge (64px image -> 4x4 grid); "
              "word-level tokenizer built in-process. " + _QWEN_NOTES),
}


class LoadedModel(NamedTuple):
    """A model ready for `saekit.inputs.build_batch` and `saekit.capture.capture`."""

    model: torch.nn.Module
    """The `transformers` model (eval mode), e.g. `LlavaForConditionalGeneration`."""
    tokenizer: Any
    """Its tokenizer (`PreTrainedTokenizerFast` or the checkpoint's own)."""
    image_processor: Any
    """Its image processor (CLIP-style for LLaVA, Qwen2-VL-style for Qwen2.5-VL)."""
    preset: ModelPreset
    """The preset, with d_model / n_layers of what was actually loaded."""


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`, or a UserError listing the known names."""
    if name not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
