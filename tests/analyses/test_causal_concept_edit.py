"""Concept edit: which word replaces which and which object is the new referent; on the tiny
checkpoint, with planted atom names, only the response tokens carrying the source atoms are edited."""

import numpy as np
import pandas as pd
import torch

from analyses.causal_concept_edit import (ConceptAtoms, choose_edit, concept_edit, concept_edit_summary,
                                          name_concept_atoms, new_object)
from analyses.causal_inputs import sample_ranges
from analyses.causal_pass import run_split_pass
from saekit.inputs import TokenType
from segcompass.template import format_response, k_for
from segcompass.world.render import COLOURS
from segcompass.world.scenes import generate
from segcompass_tiny import tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)


def planted(words: dict[str, list[int]], value: float = 3.0) -> ConceptAtoms:
    return ConceptAtoms({w: np.asarray(a, dtype=np.int64) for w, a in words.items()},
                        {w: np.full(len(a), value, dtype=np.float32) for w, a in words.items()}, pd.DataFrame())


def test_new_object_prefers_the_same_shape_then_a_unique_colour():
    samples = [s for s in generate("testB", 40, seed=1) if len(s.targets) == 1]
    atoms = planted({c: [i] for i, c in enumerate(COLOURS)})
    checked = 0
    for sample in samples:
        target = sample.objects[sample.targets[0]]
        source, word, obj = choose_edit(sample, "colour", atoms)
        assert source == target.colour and word != source
        same_shape = [o for o in sample.objects if o.shape == target.shape and o.colour != target.colour]
        if same_shape:  # the best edit points at an existing object of the target's shape
            assert obj is not None and sample.objects[obj].shape == target.shape
            assert sample.objects[obj].colour == word
            checked += 1
        elif obj is not None:
            assert [o.colour for o in sample.objects].count(word) == 1
    assert checked >= 3
    assert choose_edit(samples[0], "colour", planted({"nonexistent": [1]})) is None
    sample = samples[0]
    assert new_object(sample, "colour", sample.objects[sample.targets[0]].colour) == sample.targets[0]


def test_only_response_tokens_with_the_source_atoms_are_edited(tiny_model):
    samples = generate("testA", 4, seed=1)
    sp = run_split_pass(tiny_model, "testA", samples,
                        responses=[format_response(s.cot, k_for(s.multi_prompt)) for s in samples], batch_size=4)
    first = samples[0].objects[samples[0].targets[0]]
    start, stop = sample_ranges(sp.inputs)[0].tolist()
    response = np.flatnonzero(sp.token_types[start:stop] == int(TokenType.RESPONSE)) + start
    codes, rows = sp.inputs.codes, sp.inputs.codes.row_ids()
    in_response = torch.isin(rows, torch.from_numpy(response))
    source_atom = int(torch.mode(codes.indices[in_response]).values)  # fires on some of sample 0's response tokens
    other = next(c for c in COLOURS if c != first.colour)
    table = concept_edit(tiny_model, sp, planted({first.colour: [source_atom], other: [255]}), "colour", batch_size=4)
    row = table[table["sample"] == samples[0].sample_id].iloc[0]
    expected = int(torch.unique(rows[in_response & (codes.indices == source_atom)]).numel())
    assert row.source == first.colour and row.new == other and row.tokens_edited == expected > 0
    assert set(table.lands) <= {"new", "old", "elsewhere"}
    summary = concept_edit_summary(table, planted({first.colour: [source_atom], other: [255]}))
    assert summary["colour"]["n_candidates"] == len(table)
    assert summary["shape"]["n_candidates"] == 0 and "skipped" in summary["shape"]


def test_naming_runs_on_a_pass(tiny_model):
    samples = generate("val", 3, seed=1)
    sp = run_split_pass(tiny_model, "val", samples,
                        responses=[format_response(s.cot, k_for(s.multi_prompt)) for s in samples], batch_size=3)
    atoms = name_concept_atoms([sp], image_processor=tiny_model.loaded.image_processor, min_count=2, f1_threshold=0.0)
    assert {"atom", "best_concept", "confident"} <= set(atoms.table.columns)
    for word, named in atoms.atoms.items():
        assert len(named) == len(atoms.values[word]) and (atoms.values[word] >= tiny_model.head_cfg.threshold).all()
