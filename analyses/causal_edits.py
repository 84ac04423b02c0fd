"""Interventions on the SegCompass head, applied to one batch of `HeadInputs` at a time.

A `HeadEdit` names what it changes at each of four places (None / False: untouched):

    inputs        HeadInputs -> HeadInputs before the head runs (codes, rows, e_k, images)
    concepts      r_k: the aggregator's output `AggregatorOutput.concepts` (B, K, d_c)
    queries       the slot mapper's query input, the first argument of `SlotMapper.forward`:
                  e_k (paper routing) or u_k, the concentration token's own code read by the
                  codebook (concept routing) (B, K, d_q_in)
    drop_policy_keys   the keys' policy-image term (`SlotMapper.policy_key`'s output) set to 0:
                  raw image states (paper) or image-token codes (concepts) no longer reach the keys

Edits that need other samples (a dataset mean, another sample's r_k) receive `samples`: the
(B,) global indices of the batch's samples, into tables recorded on the unedited pass
(`record_head`). Hooks are registered by module path under `model.head` and removed in
`finally` (as `segcompass.policy.recorded_states`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from segcompass.model import HeadInputs
from segcompass.modeling.segcompass_head import HeadOutput

AGGREGATOR = "aggregator"
SLOT_MAPPER = "slot_mapper"
POLICY_KEY = "slot_mapper.policy_key"

TensorEdit = Callable[[Tensor, Tensor], Tensor]
"""(value, samples (B,) int64) -> edited value of the same shape."""


class HeadEdit(NamedTuple):
    """One intervention (module docstring); the default edits nothing."""

    inputs: Callable[[HeadInputs, Tensor], HeadInputs] | None = None
    """(inputs, samples) -> edited inputs."""
    concepts: TensorEdit | None = None
    """Edit of r_k (B, K, d_c)."""
    queries: TensorEdit | None = None
    """Edit of the slot mapper's query input (B, K, d_q_in)."""
    drop_policy_keys: bool = False
    """Remove the keys' policy-image term."""


class Recorded(NamedTuple):
    """The head's output on one batch with what it computed on the way."""

    output: HeadOutput
    concepts: Tensor
    """(B, K, d_c) r_k."""
    queries: Tensor
    """(B, K, d_q_in) the slot mapper's query input."""


def reads_policy_keys(model) -> bool:
    """Whether the slot mapper adds a policy-image term to its keys (else `drop_policy_keys` is moot)."""
    return bool(model.head.slot_mapper.policy_dim)


def run_edited(model, inputs: HeadInputs, edit: HeadEdit, samples: Tensor) -> HeadOutput:
    """The head on one batch under `edit`; `samples` (B,) the batch's global sample indices."""
    head, handles = model.head, []
    try:
        if edit.concepts is not None:
            def concepts_hook(module, args, out):
                return out._replace(concepts=edit.concepts(out.concepts, samples))
            handles.append(head.get_submodule(AGGREGATOR).register_forward_hook(concepts_hook))
        if edit.queries is not None:
            def queries_hook(module, args):
                return (edit.queries(args[0], samples), *args[1:])
            handles.append(head.get_submodule(SLOT_MAPPER).register_forward_pre_hook(queries_hook))
        if edit.drop_policy_keys:
            if not reads_policy_keys(model):
                raise ValueError("drop_policy_keys: this head's keys have no policy-image term")
            handles.append(head.get_submodule(POLICY_KEY).register_forward_hook(lambda m, a, out: torch.zeros_like(out)))
        edited = inputs if edit.inputs is None else edit.inputs(inputs, samples)
        return model.run_head(edited)
    finally:
        for handle in handles:
            handle.remove()


def record_head(model, inputs: HeadInputs) -> Recorded:
    """The unedited head on one batch, recording r_k and the slot mapper's query input."""
    seen: dict[str, Tensor] = {}

    def keep_concepts(module, args, out):
        seen["concepts"] = out.concepts.detach()

    def keep_queries(module, args):
        seen["queries"] = args[0].detach()

    handles = [model.head.get_submodule(AGGREGATOR).register_forward_hook(keep_concepts),
               model.head.get_submodule(SLOT_MAPPER).register_forward_pre_hook(keep_queries)]
    try:
        output = model.run_head(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return Recorded(output, seen["concepts"], seen["queries"])


def derangement(n: int, seed: int) -> np.ndarray:
    """(n,) seeded permutation with no fixed point (one n-cycle through a random order); n >= 2."""
    if n < 2:
        raise ValueError(f"a shuffle across samples needs at least 2 samples, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)  # order[i] -> order[i + 1]
    return out


# ---------------------------------------------------------------- the three replacements

def zeroed() -> TensorEdit:
    """Replace the value by zeros."""
    return lambda value, samples: torch.zeros_like(value)


def dataset_mean(table: Tensor) -> TensorEdit:
    """Replace each sample's value (B, K, d) by the mean over all samples of `table` (n, K, d)."""
    mean = table.float().mean(0)  # (K, d)
    return lambda value, samples: mean.to(value).expand_as(value).clone()


def from_samples(table: Tensor, order: np.ndarray) -> TensorEdit:
    """Sample s gets sample order[s]'s value from `table` (n, K, d) (a shuffle across samples)."""
    order_t = torch.as_tensor(order, dtype=torch.int64)
    return lambda value, samples: table[order_t[samples.cpu()]].to(value)
