"""Model inputs for image + prompt (+ response) samples, with a token type per position.

Each sample is written in its model's own conversation format (the chat template is
always applied, LLaVA included), tokenized once as a whole, and every token is tagged
IMAGE / PROMPT / RESPONSE / SPECIAL from the character span it came from. Image
placeholder positions also get their (row, col) on the LLM's image-token grid.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

import torch

from saekit.errors import UserError
from saekit.models import LoadedModel

PAD_TYPE = -1  # token_types / image_grid value at padding (never a TokenType)
_SENTINEL = "\ue000"  # private-use character: marks where the prompt goes in the template


class TokenType(IntEnum):
    """What a position of the LLM's input holds."""

    IMAGE = 0
    """An image placeholder position (its hidden state comes from an image feature)."""
    PROMPT = 1
    """A token of the user's prompt text."""
    RESPONSE = 2
    """A token of the assistant's response text (after the assistant prefix)."""
    SPECIAL = 3
    """BOS/EOS, chat markers (USER:, <|im_start|>assistant, ...), vision start/end."""


# Names used in configs and manifests; index = `TokenType` value.
TOKEN_TYPE_NAMES: tuple[str, ...] = tuple(t.name.lower() for t in sorted(TokenType))


def token_type_codes(names: Iterable[str] | None) -> tuple[int, ...]:
    """Token type names -> sorted `TokenType` codes (None -> all)."""
    if names is None:
        return tuple(range(len(TOKEN_TYPE_NAMES)))
    names = tuple(names)
    unknown = [n for n in names if n not in TOKEN_TYPE_NAMES]
    if unknown or not names:
        raise UserError(f"token types must be a non-empty selection of {list(TOKEN_TYPE_NAMES)}, "
                        f"got {list(names)}")
    return tuple(sorted({TOKEN_TYPE_NAMES.index(n) for n in names}))


class ModelBatch(NamedTuple):
    """A padded batch ready for `model(**batch.model_inputs)`; all tensors on the CPU."""

    model_inputs: dict[str, torch.Tensor]
    """input_ids, attention_mask, pixel_values (+ image_grid_thw, mm_token_type_ids for Qwen)."""
    token_types: torch.Tensor
    """(B, T) int8 `TokenType` values; -1 at padding."""
    image_grid: torch.Tensor
    """(B, T, 2) int16 (row, col) of the image patch on the LLM's image-token grid; -1 elsewhere."""
    attention_mask: torch.Tensor
    """(B, T) int64, 1 at real tokens, 0 at padding."""


class _Encoded(NamedTuple):
    """One tokenized sample before padding."""

    input_ids: list[int]
    token_types: list[int]
    image_grid: list[tuple[int, int]]


def format_prompt(loaded: LoadedModel, prompt: str) -> str:
    """The user turn + assistant prefix in the model's chat format, with one image placeholder.

    Uses the tokenizer's chat template when it has one, else the family's reference
    template (`saekit.tiny.CHAT_TEMPLATES`): LLaVA-1.5 gives
    "USER: <image>\\n{prompt} ASSISTANT:"; Qwen2.5-VL gives "<|im_start|>system\\n...
    <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n".
    """
    from saekit.tiny import CHAT_TEMPLATES

    tokenizer = loaded.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    template = getattr(tokenizer, "chat_template", None) or CHAT_TEMPLATES[loaded.preset.family]
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=True)


def build_batch(loaded: LoadedModel, images: Sequence[Any], prompts: Sequence[str],
                responses: Sequence[str | None] | None = None, *, padding_side: str = "left",
                max_tokens: int | None = None) -> ModelBatch:
    """Tokenize and pad B samples (one PIL image + prompt [+ response] each).

    A response is appended as a finished assistant turn (LLaVA: " {response}</s>";
    Qwen: "{response}<|im_end|>"); its tokens are tagged RESPONSE, the end marker SPECIAL.
    `max_tokens` cuts longer samples from the right (never inside the image positions).
    """
    n = len(prompts)
    responses = [None] * n if responses is None else list(responses)
    if len(images) != n or len(responses) != n:
        raise UserError(f"build_batch: {len(images)} images, {n} prompts and {len(responses)} "
                        f"responses; give one of each per sample")
    if padding_side not in ("left", "right"):
        raise UserError(f"build_batch: padding_side {padding_side!r}; use 'left' or 'right'")
    if n == 0:
        raise UserError("build_batch: empty batch")
    rgb = [image.convert("RGB") for image in images]
    vision_inputs, grids = _vision_inputs(loaded, rgb)
    encoded = [_encode_sample(loaded, grid, prompt, response, max_tokens)
               for grid, prompt, response in zip(grids, prompts, responses)]
    return _pad(loaded, encoded, vision_inputs, padding_side)


def _vision_inputs(loaded: LoadedModel, images: list) -> tuple[dict[str, torch.Tensor], list]:
    """Pixel inputs for the batch and, per image, its LLM token grid (rows, cols, extra)."""
    config = loaded.model.config
    if loaded.preset.family == "llava":
        pixel_values = loaded.image_processor(images=images, return_tensors="pt")["pixel_values"]
        side = config.vision_config.image_size // config.vision_config.patch_size
        # "full" keeps CLIP's CLS feature as one extra leading image position
        extra = 1 if config.vision_feature_select_strategy == "full" else 0
        return {"pixel_values": pixel_values}, [(side, side, extra)] * len(images)
    out = loaded.image_processor(images=images, return_tensors="pt")
    merge = config.vision_config.spatial_merge_size
    grids = [(int(h) // merge, int(w) // merge, 0) for t, h, w in out["image_grid_thw"].tolist()]
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}, grids


def _encode_sample(loaded: LoadedModel, grid: tuple[int, int, int], prompt: str,
                   response: str | None, max_tokens: int | None) -> _Encoded:
    """Tokenize one conversation; tag each token by the character span it ends in."""
    image_token = loaded.preset.image_token
    for name, text in (("prompt", prompt), ("response", response or "")):
        if image_token in text:
            raise UserError(f"build_batch: {name} {text[:40]!r} contains the image token "
                            f"{image_token!r}; the image placeholder is added by saekit")
    rows, cols, extra = grid
    n_image = rows * cols + extra
    prefix, suffix = _template_parts(loaded)
    prefix = prefix.replace(image_token, image_token * n_image)  # as the HF processors expand it
    text = prefix + prompt + suffix
    prompt_span = (len(prefix), len(prefix) + len(prompt))
    response_span = (len(text), len(text))
    if response is not None:
        lead, end = _response_markers(loaded)
        response_span = (len(text) + len(lead), len(text) + len(lead) + len(response))
        text = text + lead + response + end
    enc = loaded.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    image_id = loaded.model.config.image_token_id
    types = [_token_type(i, s, e, image_id, prompt_span, response_span)
             for i, (s, e) in zip(ids, offsets)]
    image_grid = [(-1, -1)] * len(ids)
    positions = [p for p, i in enumerate(ids) if i == image_id]
    if len(positions) != n_image:
        raise RuntimeError(f"tokenizer made {len(positions)} image tokens, expected {n_image}")
    cells = [(-1, -1)] * extra + [(r, c) for r in range(rows) for c in range(cols)]
    for p, cell in zip(positions, cells):
        image_grid[p] = cell
    if max_tokens is not None and len(ids) > max_tokens:
        if positions[-1] >= max_tokens:
            raise UserError(f"build_batch: max_tokens {max_tokens} cuts into the {n_image} image "
                            f"positions (last at {positions[-1]}); raise max_tokens")
        ids, types, image_grid = ids[:max_tokens], types[:max_tokens], image_grid[:max_tokens]
    return _Encoded(ids, types, image_grid)


def _token_type(token_id: int, start: int, end: int, image_id: int,
                prompt_span: tuple[int, int], response_span: tuple[int, int]) -> int:
    if token_id == image_id:
        return TokenType.IMAGE
    if end <= start:  # added by the tokenizer (BOS), no characters of its own
        return TokenType.SPECIAL
    last = end - 1  # a token belongs to the span holding its last character ("▁word")
    if prompt_span[0] <= last < prompt_span[1]:
        return TokenType.PROMPT
    if response_span[0] <= last < response_span[1]:
        return TokenType.RESPONSE
    return TokenType.SPECIAL


def _template_parts(loaded: LoadedModel) -> tuple[str, str]:
    """(text before the prompt, text after it) of `format_prompt`."""
    parts = format_prompt(loaded, _SENTINEL).split(_SENTINEL)
    if len(parts) != 2 or parts[0].count(loaded.preset.image_token) != 1:
        raise UserError(f"model {loaded.preset.name}: its chat template does not put one "
                        f"{loaded.preset.image_token!r} before the prompt; cannot tag tokens")
    return parts[0], parts[1]


def _response_markers(loaded: LoadedModel) -> tuple[str, str]:
    """(text between assistant prefix and response, end-of-turn marker) per family."""
    if loaded.preset.family == "llava":
        return " ", loaded.tokenizer.eos_token or "</s>"  # Vicuna v1: "ASSISTANT: {a}</s>"
    return "", "<|im_end|>"


def _pad(loaded: LoadedModel, encoded: list[_Encoded], vision_inputs: dict[str, torch.Tensor],
         padding_side: str) -> ModelBatch:
    """Stack samples into (B, T) tensors, padding on `padding_side`."""
    batch, length = len(encoded), max(len(e.input_ids) for e in encoded)
    pad_id = loaded.tokenizer.pad_token_id
    pad_id = loaded.tokenizer.eos_token_id if pad_id is None else pad_id
    input_ids = torch.full((batch, length), pad_id if pad_id is not None else 0, dtype=torch.long)
    token_types = torch.full((batch, length), PAD_TYPE, dtype=torch.int8)
    image_grid = torch.full((batch, length, 2), PAD_TYPE, dtype=torch.int16)
    for row, enc in enumerate(encoded):
        n = len(enc.input_ids)
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = torch.tensor(enc.input_ids)
        token_types[row, cols] = torch.tensor(enc.token_types, dtype=torch.int8)
        image_grid[row, cols] = torch.tensor(enc.image_grid, dtype=torch.int16)
    attention_mask = (token_types != PAD_TYPE).long()
    model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **vision_inputs}
    if loaded.preset.family == "qwen2_5_vl" and _accepts(loaded.model, "mm_token_type_ids"):
        # 3-D rope positions: text 0, image 1 (transformers >= 5 needs them to place images)
        model_inputs["mm_token_type_ids"] = (token_types == TokenType.IMAGE).int()
    return ModelBatch(model_inputs, token_types, image_grid, attention_mask)


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    import inspect

    return argument in inspect.signature(model.forward).parameters
