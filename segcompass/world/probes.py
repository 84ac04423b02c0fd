"""The warm start's perception probe: image tokens read against the LLM's own word embeddings.

For every vision patch the world knows what lies under it: the colour, shape and size of
the object covering it (or background) and which third of the image (row, column) it is
in. The probe scores each image token's input embedding (what the LLM receives from the
vision tower) by cosine similarity with the word embeddings of 'red', 'circle', 'small',
'top', 'left', …, and is trained with cross-entropy on those labels.

Why words and not a free linear head: it pulls an image token of a red circle at the top
left towards E[red], E[circle], E[top], E[left] — the same vectors the text uses — which is
what LLaVA's first (alignment) stage does with captions. A tiny policy trained from scratch
then finds 'the red circle' among the image tokens by the similarity it already uses to
copy words, and learns to read the image far sooner. The probe holds three background
vectors and a logit scale; it is training machinery only and never part of the saved policy.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

PROBE_FIELDS: tuple[str, ...] = ("colour", "shape", "size", "row", "column")
"""What the probe predicts per patch; the first three have a background class."""
N_WITH_BACKGROUND = 3


def probe_words() -> dict[str, list[str]]:
    """Field -> the words that name its classes (background excluded)."""
    from segcompass.world.render import COLOURS, COLUMNS, ROWS, SHAPES, SIZES

    return {"colour": list(COLOURS), "shape": list(SHAPES), "size": list(SIZES), "row": list(ROWS),
            "column": list(COLUMNS)}


def patch_targets(sample, grid: int, *, object_position: bool = True, owner: np.ndarray | None = None) -> np.ndarray:
    """(5, grid, grid) int64 labels per vision patch, fields in PROBE_FIELDS order.

    colour / shape / size: 0 for background, 1 + word index for the object covering most of
    the patch. row / column (0..2): with `object_position`, the third holding the covering
    object's centre (`WorldObject.position`, the words the chain of thought writes) for
    object patches and the patch's own third for background; otherwise the patch's own
    third everywhere.

    Why the object's: a large object covers ~3×3 patches, which straddle thirds, so with
    per-patch thirds the policy had to locate the object's centre patch among them before
    it could say where the object is (most failing `direct` samples went wrong at a position
    word; docs/results.md).

    `owner`: the sample's `patch_objects(labels, grid)` when the caller already has it.
    """
    from segcompass.world.render import COLOURS, COLUMNS, ROWS, SHAPES, SIZES, patch_objects

    owner = (patch_objects(sample.labels, grid) if owner is None else owner) + 1  # (G, G), 0 = background
    colour = np.array([0] + [1 + list(COLOURS).index(o.colour) for o in sample.objects])
    shape = np.array([0] + [1 + SHAPES.index(o.shape) for o in sample.objects])
    size = np.array([0] + [1 + list(SIZES).index(o.size) for o in sample.objects])
    third = (3 * (np.arange(grid) + 0.5) / grid).astype(np.int64)  # (G,) patch centre -> 0..2
    rows = np.broadcast_to(third[:, None], (grid, grid))
    cols = np.broadcast_to(third[None, :], (grid, grid))
    if object_position:
        where = [o.position.split() for o in sample.objects]  # ['top', 'left'], ...
        object_row = np.array([0] + [ROWS.index(row) for row, _ in where])  # (1 + N,), slot 0 unused
        object_col = np.array([0] + [COLUMNS.index(col) for _, col in where])
        rows = np.where(owner > 0, object_row[owner], rows)
        cols = np.where(owner > 0, object_col[owner], cols)
    return np.stack([colour[owner], shape[owner], size[owner], rows, cols]).astype(np.int64)


def centre_cells(sample, grid: int, *, owner: np.ndarray | None = None) -> np.ndarray:
    """(2, grid, grid) int64 patch row and column holding the centre of the object that covers
    each patch (the owner of `world_render.patch_objects`, passed as `owner` when the caller
    already has it); -1 on background patches."""
    from segcompass.world.render import patch_objects

    owner = patch_objects(sample.labels, grid) if owner is None else owner  # (G, G), -1 = background
    side = sample.labels.shape[0]
    centre = np.array([[int(o.centre[1] * grid // side), int(o.centre[0] * grid // side)]
                       for o in sample.objects] + [[-1, -1]], dtype=np.int64)  # (N + 1, 2) row, col
    return np.moveaxis(centre[owner], -1, 0)  # owner -1 picks the last row: background


class WordProbe(nn.Module):
    """Cosine-similarity classifier of image tokens against word embeddings (+ background)."""

    def __init__(self, hidden_size: int, word_ids: dict[str, Sequence[int]], init_scale: float = 10.0):
        super().__init__()
        self.fields = tuple(word_ids)
        for field in self.fields:
            self.register_buffer(f"ids_{field}", torch.tensor(list(word_ids[field]), dtype=torch.long))
        self.background = nn.Parameter(torch.randn(N_WITH_BACKGROUND, hidden_size) * 0.02)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def forward(self, image_states: torch.Tensor, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, P, D) image-token states, (V, D) word embeddings -> field -> (B, P, C) logits."""
        states = nn.functional.normalize(image_states, dim=-1)
        logits = {}
        for index, field in enumerate(self.fields):
            classes = embeddings[getattr(self, f"ids_{field}")]  # (C, D)
            if index < N_WITH_BACKGROUND:
                classes = torch.cat([self.background[index:index + 1], classes])  # (1 + C, D)
            logits[field] = self.log_scale.exp() * states @ nn.functional.normalize(classes, dim=-1).T
        return logits

    def loss(self, image_states: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over fields of the cross-entropy against (B, 5, P) targets."""
        logits = self(image_states, embeddings)
        losses = [nn.functional.cross_entropy(logits[f].flatten(0, 1), targets[:, i].flatten())
                  for i, f in enumerate(self.fields)]
        return torch.stack(losses).mean()


SLOT_FIELDS: tuple[str, ...] = ("colour", "shape")
"""What the concentration-token probe predicts per <REF_POS> (both with a 'no target' class 0)."""


def slot_targets(sample, num_slots: int) -> np.ndarray:
    """(2, num_slots) int64 labels of a sample's concentration tokens, fields in SLOT_FIELDS order.

    Slot k names the k-th target in the answer line's order (left to right by centre, as
    `world_language.answer_line` writes them): 1 + colour index, 1 + shape index; 0 for a
    slot without a target (no-target samples, unused multi slots).
    """
    from segcompass.world.language import left_to_right
    from segcompass.world.render import COLOURS, SHAPES

    labels = np.zeros((len(SLOT_FIELDS), num_slots), dtype=np.int64)
    for k, obj in enumerate(left_to_right([sample.objects[i] for i in sample.targets])[:num_slots]):
        labels[:, k] = (1 + list(COLOURS).index(obj.colour), 1 + SHAPES.index(obj.shape))
    return labels


def build_slot_probe(tokenizer, hidden_size: int, seed: int) -> WordProbe:
    """A seeded probe scoring each <REF_POS> state against the colour and shape words (+ 'none').

    Why: the slot mapper reads the concentration tokens' last-layer states e_k, but plain
    teacher forcing never asks them to hold anything (they only predict the next <REF_POS>
    or the end), and without this probe e_k held its target's colour and shape only in part
    (docs/results.md). The probe makes each concentration
    token carry the target it stands for, which is what the paper's joint training
    teaches a 7B policy.
    """
    words = probe_words()
    ids = {field: tokenizer.convert_tokens_to_ids(words[field]) for field in SLOT_FIELDS}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WordProbe(hidden_size, ids)


def build_word_probe(tokenizer, hidden_size: int, seed: int) -> WordProbe:
    """A seeded probe over PROBE_FIELDS whose classes are `tokenizer`'s ids of the field words."""
    words = probe_words()
    ids = {field: tokenizer.convert_tokens_to_ids(words[field]) for field in PROBE_FIELDS}
    if any(i == tokenizer.unk_token_id for field in ids.values() for i in field):
        raise ValueError("word probe: a colour/shape/size/position word is missing from the vocabulary")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WordProbe(hidden_size, ids)


def word_separation_loss(embeddings: torch.Tensor, word_ids: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over word pairs of relu(cos - margin)^2, divided by the number of words.

    (V, D) embeddings, (W,) ids of the words to keep apart, margin in [0, 1) -> scalar.

    Why: with the output head tied to the input embeddings, two words that occur in the same
    contexts ('above' / 'below', 'largest' / 'smallest', 'stars' / 'triangles') receive the
    same output-side gradient until the policy can tell them apart, which pulls them together
    before it can (without this term the policy copied 'below' from its own prompt as
    'above'; docs/results.md).
    """
    if not 0 <= margin < 1:
        raise ValueError(f"word_separation_loss: margin must lie in [0, 1), got {margin}")
    words = torch.nn.functional.normalize(embeddings[word_ids], dim=-1)  # (W, D)
    cosine = words @ words.T  # (W, W)
    above = torch.relu(torch.triu(cosine, diagonal=1) - margin)  # upper triangle: each pair once
    return above.square().sum() / len(word_ids)


def separation_word_ids(tokenizer) -> list[int]:
    """Ids of every word an instruction or chain of thought of the world can contain."""
    from segcompass.world.scenes import world_vocabulary

    ids = tokenizer.convert_tokens_to_ids(world_vocabulary())
    return sorted({i for i in ids if i != tokenizer.unk_token_id})
