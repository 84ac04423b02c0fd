"""The policy MLLM as segcompass uses it: one forward pass that supplies everything.

The authors run the LLM three times per sample (generate, a forward for the concentration
tokens, another full forward only to feed the SAE). Here, after the response is written,
ONE forward pass over prompt + response gives at once
  - the logits (for GRPO's log-probabilities),
  - the output of block L (saekit's layer numbering) for the SAE, and
  - the final normed hidden states, whose rows at the concentration tokens are the slot
    embeddings e_k.
Both hidden states are recorded by forward hooks that are removed in `finally`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from saekit.capture import check_layers, decoder_layers
from saekit.inputs import PAD_TYPE, ModelBatch, TokenType
from saekit.models import LoadedModel
from segcompass.template import REF_TOKEN, ref_token_mask

# Token types whose layer-L states go through the SAE: image, question and CoT tokens alike.
SAE_TOKEN_TYPES = (int(TokenType.IMAGE), int(TokenType.PROMPT), int(TokenType.RESPONSE))
_FINAL_NORM_PATHS = ("model.language_model.norm", "language_model.norm", "model.norm")


class PolicyForward(NamedTuple):
    """Everything segcompass reads from one policy forward pass over prompt + response."""

    logits: Tensor
    """(B, T, V) next-token logits."""
    sae_hidden: Tensor
    """(B, T, d) output of block `sae_layer` (HF hidden_states[sae_layer])."""
    last_hidden: Tensor
    """(B, T, d) final normed hidden states (HF hidden_states[-1])."""


class SlotInputs(NamedTuple):
    """The SAE tokens of a batch, flattened, and the slot embeddings."""

    sae_tokens: Tensor
    """(N, d) layer-L states of the image, prompt and response tokens of all samples."""
    token_sample_index: Tensor
    """(N,) int64 sample of each SAE token."""
    token_position: Tensor
    """(N,) int64 position of each SAE token in the padded sequence."""
    slot_embeddings: Tensor
    """(B, K, d) last-layer states at the first K concentration tokens of each response."""
    slots_written: Tensor
    """(B,) int64 how many concentration tokens the response actually contains (capped at K)."""
    slot_positions: Tensor
    """(B, K) int64 position of each slot's concentration token (the last token where missing)."""

    def token_rows(self, positions: Tensor) -> Tensor:
        """Rows of `sae_tokens` at (B, n) positions of each sample; -1 where a position is no SAE token."""
        batch = positions.shape[0]
        length = int(max(int(self.token_position.max()) + 1 if len(self.token_position) else 0,
                         int(positions.max()) + 1 if positions.numel() else 0))
        lookup = torch.full((batch, length), -1, dtype=torch.int64, device=positions.device)
        lookup[self.token_sample_index, self.token_position] = torch.arange(
            len(self.token_position), device=positions.device)  # (B, T): row of each SAE token
        return lookup.gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -1)  # (B, n)


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The language model's final norm, whose output is HF `hidden_states[-1]`."""
    for path in _FINAL_NORM_PATHS:
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise ValueError(f"{type(model).__name__}: no final norm at any of {', '.join(_FINAL_NORM_PATHS)}")


@contextmanager
def recorded_states(policy: torch.nn.Module, sae_layer: int) -> Iterator[dict[str, Tensor]]:
    """Record block `sae_layer`'s output ("sae") and the final norm's ("last") during the
    forward passes run inside the block (TRL's own pass, in GRPO). Hooks removed in `finally`."""
    blocks = decoder_layers(policy)
    check_layers(len(blocks), [sae_layer], type(policy).__name__)
    recorded: dict[str, Tensor] = {}

    def record(name: str):
        def hook(module, args, output):
            recorded[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [blocks[sae_layer - 1].register_forward_hook(record("sae")),
               final_norm(policy).register_forward_hook(record("last"))]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def policy_forward(model: torch.nn.Module, batch: ModelBatch, sae_layer: int) -> PolicyForward:
    """One forward pass (gradients on) recording block `sae_layer`'s output and the final norm's."""
    with recorded_states(model, sae_layer) as recorded:
        device = next(model.parameters()).device
        inputs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.model_inputs.items()}
        logits = model(**inputs, use_cache=False).logits
    return PolicyForward(logits, recorded["sae"], recorded["last"])


def slot_inputs(forward: PolicyForward, batch: ModelBatch, ref_token_id: int, num_slots: int) -> SlotInputs:
    """Split one forward pass into the SAE's tokens and the K slot embeddings per sample.

    A response with fewer than K concentration tokens (a malformed generation) fills the
    missing slots with the state of its last token, so every sample still gets K slots;
    `slots_written` records how many were real (the format reward penalises the rest).
    """
    types = batch.token_types.to(forward.sae_hidden.device)
    keep = torch.zeros_like(types, dtype=torch.bool)
    for token_type in SAE_TOKEN_TYPES:
        keep |= types == token_type
    sample_index, position = keep.nonzero(as_tuple=True)  # (N,), (N,) in (sample, position) order
    sae_tokens = forward.sae_hidden[sample_index, position]  # (B, T, d) -> (N, d)
    input_ids = batch.model_inputs["input_ids"].to(types.device)
    is_ref = ref_token_mask(input_ids, types, ref_token_id)  # (B, T)
    last_position = (types != PAD_TYPE).long().cumsum(1).argmax(1)  # (B,) last non-pad position
    batch_size = types.shape[0]
    positions = last_position[:, None].repeat(1, num_slots)  # (B, K)
    written = torch.zeros(batch_size, dtype=torch.int64, device=types.device)
    for row in range(batch_size):
        refs = is_ref[row].nonzero().flatten()[:num_slots]
        positions[row, :len(refs)] = refs
        written[row] = len(refs)
    rows = torch.arange(batch_size, device=types.device)[:, None]
    slot_embeddings = forward.last_hidden[rows, positions]  # (B, K, d)
    return SlotInputs(sae_tokens, sample_index, position, slot_embeddings, written, positions)


def ref_token_id(loaded: LoadedModel) -> int:
    """The tokenizer id of the concentration token; a clear error if the policy lacks it."""
    token_id = loaded.tokenizer.convert_tokens_to_ids(REF_TOKEN)
    if token_id is None or token_id == loaded.tokenizer.unk_token_id:
        raise ValueError(f"the policy's tokenizer has no {REF_TOKEN} token; warm-start or add it first")
    return int(token_id)
