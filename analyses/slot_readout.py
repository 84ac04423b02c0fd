"""Beyond the paper: is the target readable from the concentration tokens' hidden states?

The slot mapper's query starts from e_k, the last-layer state of the k-th `<REF_POS>` the
policy wrote. If the target's identity is not in e_k, the head has to recover it from the
SAE pathway alone. This analysis fits, per layer, a linear probe from the state at the
first response `<REF_POS>` of single-target samples to the target's colour and shape
(train samples), and reports held-out accuracy (val samples) next to chance.

What it reads on the embedded world, with and without the warm start's concentration-token
probe (`segcompass.world.probes.build_slot_probe`), is in docs/results.md.

Note the position: the prompt names `<REF_POS>` too ("output 1 <REF_POS> token"), so the
first `<REF_POS>` of the sequence is a prompt token whose state carries no target; reading
it would under-report what e_k holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import pandas as pd
import torch
from torch import Tensor

from segcompass.world.render import COLOURS, SHAPES
from segcompass.template import REF_TOKEN, build_prompt, format_response, k_for, ref_token_mask

FIELDS = ("colour", "shape")


class SlotStates(NamedTuple):
    states: Tensor
    """(N, L+1, d) hidden states (HF hidden_states, 0 = embeddings) at the first response <REF_POS>."""
    labels: Tensor
    """(N, 2) int64 target colour index, shape index."""
    positions: Tensor
    """(N,) int64 position of that <REF_POS> in the sample's (right-padded) sequence."""


@torch.no_grad()
def slot_states(loaded, samples: Sequence, *, batch_size: int = 50) -> SlotStates:
    """Teacher-forced (ground-truth CoT) states at the first response <REF_POS> of each
    single-target sample; other samples are skipped."""
    from PIL import Image

    from saekit.inputs import build_batch

    singles = [s for s in samples if len(s.targets) == 1]
    if not singles:
        raise ValueError("slot_states: no single-target sample among the samples given")
    ref_id = loaded.tokenizer.convert_tokens_to_ids(REF_TOKEN)
    device = next(loaded.model.parameters()).device
    states, labels, positions = [], [], []
    for start in range(0, len(singles), batch_size):
        chunk = singles[start:start + batch_size]
        batch = build_batch(loaded, [Image.fromarray(s.image) for s in chunk],
                            [build_prompt(s.instruction, multi=s.multi_prompt) for s in chunk],
                            [format_response(s.cot, k_for(s.multi_prompt)) for s in chunk], padding_side="right")
        inputs = {k: v.to(device) for k, v in batch.model_inputs.items()}
        hidden = loaded.model(**inputs, output_hidden_states=True).hidden_states  # L+1 x (B, T, d)
        position = ref_token_mask(batch.model_inputs["input_ids"], batch.token_types, ref_id).int().argmax(1)  # (B,)
        positions.append(position)
        rows = torch.arange(len(chunk))
        states.append(torch.stack([h[rows, position.to(h.device)].float().cpu() for h in hidden], 1))  # (B, L+1, d)
        labels += [(list(COLOURS).index(s.objects[s.targets[0]].colour), SHAPES.index(s.objects[s.targets[0]].shape))
                   for s in chunk]
    return SlotStates(torch.cat(states), torch.tensor(labels, dtype=torch.int64), torch.cat(positions).long())


def probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *, steps: int = 300,
                   lr: float = 1e-2, seed: int = 0) -> float:
    """Held-out accuracy of a multinomial logistic probe (standardised inputs, full-batch Adam)."""
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(train_x.shape[1], n_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(probe((train_x - mean) / std), train_y).backward()
            optimizer.step()
    with torch.no_grad():
        return float((probe((test_x - mean) / std).argmax(1) == test_y).float().mean())


def slot_readout(train: SlotStates, test: SlotStates) -> pd.DataFrame:
    """One row per layer: held-out colour and shape accuracy of a linear probe, and chance."""
    rows = []
    for layer in range(train.states.shape[1]):
        row = {"layer": layer}
        for i, field in enumerate(FIELDS):
            row[f"{field}_accuracy"] = probe_accuracy(train.states[:, layer], train.labels[:, i],
                                                      test.states[:, layer], test.labels[:, i])
        rows.append(row)
    table = pd.DataFrame(rows)
    table["chance"] = 1 / len(COLOURS)
    return table


def plot_slot_readout(table: pd.DataFrame, *, title: str | None = None):
    """Held-out probe accuracy per layer for colour and shape, with chance as a dashed line."""
    from analyses.plotting import label_axes, new_figure

    figure, (ax,) = new_figure()
    for field, marker in zip(FIELDS, "os"):
        ax.plot(table["layer"], table[f"{field}_accuracy"], marker=marker, label=f"target {field}")
    ax.axhline(float(table["chance"].iloc[0]), color="grey", linestyle="--", label="chance")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(table["layer"].tolist())
    ax.legend(loc="lower right")
    label_axes(ax, "layer (HF hidden_states index; last = e_k)", "held-out linear-probe accuracy",
               title or "Is the target readable from the <REF_POS> state?")
    return figure
