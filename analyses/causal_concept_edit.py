"""Concept edit: rewrite the colour (or shape) the chain of thought's codes carry, and watch the mask.

Naming (`analyses.concept_naming`, over the thresholded codes of every pass of the suite): an
atom belongs to the word w (a colour or a shape) when its confident best-F1 concept is the
text concept 'text:w'. Its replacement activation is its mean activation on the tokens that
spell w.

Edit, for each single-target sample whose target is the object (c, s):
    colour   pick c' != c with named atoms, preferring a c' for which the scene holds the object
             (c', s), then one for which exactly one object has colour c'; the "new object" is
             that object (none when neither exists)
    shape    the same with shapes: (c, s') first, then the only object of shape s'
At every response token (chain of thought and <REF_POS> tokens) where an atom of c (or s)
fires, those atoms are removed and the atoms of c' (s') are written with their replacement
activations. Samples where no response token carries an atom of c (s) are not edited.

A mask moves to the new object when its IoU with the new object is >= 0.5 and above its IoU
with the original target; it stays when the reverse holds; else it is elsewhere. Shares are
over edited samples that have a new object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from analyses import concept_naming as naming
from analyses.causal_inputs import concat_inputs, replace_in_rows, take_samples
from analyses.causal_pass import SplitPass, mask_ious, run_condition
from saekit.inputs import TokenType
from segcompass.world.render import COLOURS, SHAPES

KINDS = {"colour": tuple(COLOURS), "shape": tuple(SHAPES)}
MOVE_IOU = 0.5


class ConceptAtoms(NamedTuple):
    """Atoms named for each colour and shape word, with their replacement activations."""

    atoms: dict[str, np.ndarray]
    """Word -> (A,) int64 atoms whose confident name is 'text:<word>' (words without atoms absent)."""
    values: dict[str, np.ndarray]
    """Word -> (A,) float32 mean activation of each atom on the tokens that spell the word."""
    table: pd.DataFrame
    """The naming table (`concept_naming.name_atoms`)."""


def name_concept_atoms(passes: Sequence[SplitPass], *, image_processor=None, min_count: int = 20,
                       f1_threshold: float = 0.5) -> ConceptAtoms:
    """Name the atoms of every pass's thresholded codes; keep the colour and shape words' atoms."""
    from analyses.collect import policy_frame
    from segcompass.predictor import grid_region

    inputs = concat_inputs([sp.inputs for sp in passes])
    samples = [s for sp in passes for s in sp.samples]
    scenes = [[naming.SceneObject(policy_frame(o.mask, grid_region(s.image.shape[:2], image_processor)), o.concepts)
               for o in naming.world_scene_objects(s)] for s in samples]
    concepts = naming.token_concepts(np.concatenate([sp.token_types for sp in passes]),
                                     np.concatenate([sp.image_grid for sp in passes]), inputs.token_sample_index,
                                     [t for sp in passes for t in sp.token_strings], scenes,
                                     [g for sp in passes for g in sp.grid_shapes])
    names, has_concept = naming.concept_matrix(concepts)
    empty = pd.DataFrame(columns=["atom", "name", "best_concept", "f1", "confident"])
    if not names:
        return ConceptAtoms({}, {}, empty)
    table = naming.name_atoms(inputs.codes, names, has_concept, min_count=min_count, f1_threshold=f1_threshold)
    codes, rows = inputs.codes, inputs.codes.row_ids().numpy()
    atoms, values = {}, {}
    for word in (*COLOURS, *SHAPES):
        named = table[table.confident & (table.best_concept == f"text:{word}")].atom.to_numpy(np.int64)
        if not len(named):
            continue
        column = names.index(f"text:{word}") if f"text:{word}" in names else None
        on_word = has_concept[rows, column] if column is not None else np.zeros(len(rows), bool)
        means = []
        for atom in named:
            hits = codes.indices.numpy() == atom
            pick = hits & on_word if (hits & on_word).any() else hits
            means.append(float(codes.values.numpy()[pick].mean()))
        atoms[word], values[word] = named, np.asarray(means, dtype=np.float32)
    return ConceptAtoms(atoms, values, table)


def _exact_object(sample, kind: str, word: str) -> int | None:
    """The object with attribute `word` that keeps the target's other attribute, or None."""
    target = sample.objects[sample.targets[0]]
    keep = "shape" if kind == "colour" else "colour"
    exact = [o.index for o in sample.objects if getattr(o, kind) == word and getattr(o, keep) == getattr(target, keep)]
    return exact[0] if exact else None


def new_object(sample, kind: str, word: str) -> int | None:
    """Index of the object the edited referent points to (module docstring), or None."""
    if (exact := _exact_object(sample, kind, word)) is not None:
        return exact
    only = [o.index for o in sample.objects if getattr(o, kind) == word]
    return only[0] if len(only) == 1 else None


def choose_edit(sample, kind: str, atoms: ConceptAtoms) -> tuple[str, str, int | None] | None:
    """(source word, new word, new object or None) for one single-target sample, or None when either
    side has no named atoms."""
    source = getattr(sample.objects[sample.targets[0]], kind)
    candidates = [w for w in KINDS[kind] if w != source and w in atoms.atoms]
    if source not in atoms.atoms or not candidates:
        return None
    exact = [w for w in candidates if _exact_object(sample, kind, w) is not None]
    unique = [w for w in candidates if new_object(sample, kind, w) is not None]
    word = (exact or unique or candidates)[0]
    return source, word, new_object(sample, kind, word)


def concept_edit(model, sp: SplitPass, atoms: ConceptAtoms, kind: str, *, batch_size: int = 16,
                 conf_threshold: float = 0.5) -> pd.DataFrame:
    """One row per single-target sample with an edit: split, sample, kind, source, new, has_new_object,
    tokens_edited, iou_new, iou_old, unedited_iou_new, unedited_iou_old, lands."""
    edited_parts, chosen = [], []
    response = sp.token_types == int(TokenType.RESPONSE)  # (N,)
    for b, sample in enumerate(sp.samples):
        choice = choose_edit(sample, kind, atoms) if len(sample.targets) == 1 else None
        if choice is None:
            continue
        source, word, obj = choice
        one = take_samples(sp.inputs, [b])
        start = int(torch.searchsorted(sp.inputs.token_sample_index, torch.tensor(b)))
        local_response = torch.from_numpy(np.flatnonzero(response[start:start + one.codes.n_tokens]))
        fires = torch.isin(one.codes.indices, torch.from_numpy(atoms.atoms[source]))
        edit_rows = local_response[torch.isin(local_response, one.codes.row_ids()[fires])]
        codes = replace_in_rows(one.codes, edit_rows, torch.from_numpy(atoms.atoms[source]),
                                torch.from_numpy(atoms.atoms[word]), torch.from_numpy(atoms.values[word]))
        edited_parts.append(one._replace(codes=codes))
        chosen.append((b, source, word, obj, len(edit_rows)))
    if not chosen:
        return pd.DataFrame(columns=["split", "sample", "kind", "source", "new", "has_new_object", "tokens_edited",
                                     "iou_new", "iou_old", "unedited_iou_new", "unedited_iou_old", "lands"])
    samples = [sp.samples[c[0]] for c in chosen]
    run = {"batch_size": batch_size, "conf_threshold": conf_threshold}
    edited = run_condition(model, concat_inputs(edited_parts), samples, **run)
    unedited = run_condition(model, sp.inputs, samples, index=np.array([c[0] for c in chosen]), **run)
    old = [s.target_masks[0] for s in samples]
    new = [s.objects[c[3]].mask if c[3] is not None else np.zeros_like(s.target_masks[0])
           for s, c in zip(samples, chosen)]
    iou_new, iou_old = mask_ious(edited, new), mask_ious(edited, old)
    lands = np.where((iou_new >= MOVE_IOU) & (iou_new > iou_old), "new",
                     np.where((iou_old >= MOVE_IOU) & (iou_old > iou_new), "old", "elsewhere"))
    return pd.DataFrame({"split": sp.split, "sample": [s.sample_id for s in samples], "kind": kind,
                         "source": [c[1] for c in chosen], "new": [c[2] for c in chosen],
                         "has_new_object": [c[3] is not None for c in chosen],
                         "tokens_edited": [c[4] for c in chosen], "iou_new": iou_new, "iou_old": iou_old,
                         "unedited_iou_new": mask_ious(unedited, new), "unedited_iou_old": mask_ious(unedited, old),
                         "lands": lands})


def _shares(scored: pd.DataFrame) -> dict[str, float]:
    n = len(scored)
    nan = float("nan")
    return {"moved_to_new_object": float((scored.lands == "new").mean()) if n else nan,
            "stayed_on_target": float((scored.lands == "old").mean()) if n else nan,
            "elsewhere": float((scored.lands == "elsewhere").mean()) if n else nan,
            "unedited_on_new_object": float((scored.unedited_iou_new >= MOVE_IOU).mean()) if n else nan}


def concept_edit_summary(table: pd.DataFrame, atoms: ConceptAtoms) -> dict:
    """Per kind: counts and the shares of masks that moved / stayed / went elsewhere."""
    out = {"move_iou": MOVE_IOU, "named_words": {w: len(a) for w, a in atoms.atoms.items()}}
    for kind in KINDS:
        part = table[table.kind == kind] if len(table) else table
        edited = part[part.tokens_edited > 0] if len(part) else part
        scored = edited[edited.has_new_object.astype(bool)] if len(edited) else edited
        out[kind] = {"n_candidates": len(part), "n_edited": len(edited), "n_scored": len(scored), **_shares(scored)}
        if not len(scored):
            out[kind]["skipped"] = ("no named atoms for these words" if not len(part) else
                                    "no edited sample has an object with the new attribute")
    return out
