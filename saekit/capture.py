"""Hooked capture of decoder-layer outputs, stopping the forward pass after the deepest layer.

Layer numbering (one convention everywhere in saekit): layer L is
  HF `hidden_states[L]` (index 0 = embeddings)
  = output of decoder block L counted from 1
  = module `model.language_model.layers[L-1]`
  = TransformerLens `blocks.{L-1}.hook_resid_post`.
Valid L: 1..n_layers. One caveat of HF's numbering: `hidden_states[n_layers]` (the last
entry) is returned *after* the final norm, while saekit (like TransformerLens) captures the
block's output before it, at every L including n_layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from saekit.errors import UserError
from saekit.inputs import PAD_TYPE, ModelBatch
from saekit.models import LoadedModel, ModelPreset

# Where the decoder blocks sit, tried in order: a *ForConditionalGeneration VLM, its bare
# *Model, and a text-only *ForCausalLM.
_DECODER_PATHS = ("model.language_model.layers", "language_model.layers", "model.layers")


class Capture(NamedTuple):
    """Hidden states at every non-padding position, flattened in (sample, position) order."""

    activations: dict[int, torch.Tensor]
    """layer L -> (N, d_model) in the model's dtype, on the model's device."""
    token_types: torch.Tensor
    """(N,) int8 `TokenType` of each row."""
    sample_index: torch.Tensor
    """(N,) int64 row of the batch each row came from."""
    position: torch.Tensor
    """(N,) int64 index of each row in the padded sequence."""
    image_grid: torch.Tensor
    """(N, 2) int16 (row, col) on the LLM's image-token grid; -1 for non-image rows."""


class _StopForward(Exception):
    """Raised by the deepest layer's hook: everything after it is not needed."""


def layer_metadata(preset: ModelPreset, layer: int) -> dict:
    """The names of hooked layer `layer` in every convention (saved with caches and SAEs)."""
    check_layers(preset.n_layers, [layer], preset.name)
    return {
        "layer": layer,
        "hf_hidden_states_index": layer,
        "transformer_lens_hook": f"blocks.{layer - 1}.hook_resid_post",
        "module_path": f"{_DECODER_PATHS[0]}.{layer - 1}",
        "meaning": f"output of decoder block {layer} of {preset.n_layers} (counted from 1)",
        # HF applies the final norm to its last hidden_states entry; the capture is pre-norm.
        "hf_hidden_states_is_final_normed": layer == preset.n_layers,
    }


def check_layers(n_layers: int, layers: Sequence[int], model_name: str) -> list[int]:
    """Sorted unique layers, or a UserError naming the bad layer, the model and the range."""
    if len(layers) == 0:
        raise UserError(f"model {model_name}: no layer requested; give --layer L with L in 1..{n_layers}")
    for layer in layers:
        if isinstance(layer, bool) or int(layer) != layer or not 1 <= layer <= n_layers:
            raise UserError(f"layer {layer} is out of range for model {model_name}: valid layers are "
                            f"1..{n_layers} (L = HF hidden_states[L], output of block L counted from 1)")
    return sorted({int(layer) for layer in layers})


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The language model's decoder blocks (`model.language_model.layers` for HF VLMs)."""
    for path in _DECODER_PATHS:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise UserError(f"{type(model).__name__}: no decoder blocks at any of {', '.join(_DECODER_PATHS)}")


def capture_padded(loaded_or_model: LoadedModel | torch.nn.Module, batch: ModelBatch,
                   layers: Sequence[int], *, early_exit: bool = True) -> dict[int, torch.Tensor]:
    """Layer L -> (B, T, d_model) output of block L at every padded position.

    Forward hooks on the decoder blocks record their outputs; with `early_exit` the hook
    of the deepest requested block stops the forward pass. Hooks are removed in `finally`.
    """
    model, name = _unwrap(loaded_or_model)
    blocks = decoder_layers(model)
    wanted = check_layers(len(blocks), layers, name)
    recorded: dict[int, torch.Tensor] = {}
    deepest = wanted[-1]

    def make_hook(layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            recorded[layer] = hidden.detach()
            if early_exit and layer == deepest:
                raise _StopForward
        return hook

    handles = []
    try:
        for layer in wanted:
            handles.append(blocks[layer - 1].register_forward_hook(make_hook(layer)))
        with torch.no_grad():
            try:
                model(**_to_model(model, batch.model_inputs), use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return {layer: recorded[layer] for layer in wanted}


def capture(loaded_or_model: LoadedModel | torch.nn.Module, batch: ModelBatch,
            layers: Sequence[int], *, early_exit: bool = True) -> Capture:
    """Hidden states of `layers` at every non-padding position of `batch` (see `Capture`)."""
    padded = capture_padded(loaded_or_model, batch, layers, early_exit=early_exit)
    valid = batch.token_types != PAD_TYPE  # (B, T) bool, on the CPU
    sample_index, position = valid.nonzero(as_tuple=True)  # row-major: (sample, position) order
    activations = {}
    for layer, hidden in padded.items():
        mask = valid.to(hidden.device)
        activations[layer] = hidden[mask]  # (B, T, D) -> (N, D)
    return Capture(activations, batch.token_types[valid], sample_index, position,
                   batch.image_grid[valid])  # (B, T, 2) -> (N, 2)


def _unwrap(loaded_or_model: LoadedModel | torch.nn.Module) -> tuple[torch.nn.Module, str]:
    if isinstance(loaded_or_model, LoadedModel):
        return loaded_or_model.model, loaded_or_model.preset.name
    return loaded_or_model, type(loaded_or_model).__name__


def _to_model(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs on the model's device; pixel values in its dtype (ids and masks keep theirs)."""
    param = next(model.parameters())
    moved = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            dtype = param.dtype if value.is_floating_point() else value.dtype
            value = value.to(device=param.device, dtype=dtype)
        moved[key] = value
    return moved
