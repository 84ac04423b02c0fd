"""Concept naming: token concepts from a world scene and token strings; planted atom <-> concept
pairs recovered with hand-computed precision / recall; parity with the dense loop."""

import numpy as np
import pytest
import torch

from analyses.concept_naming import (BACKGROUND, SceneObject, atom_labels, concept_label, concept_matrix,
                                     format_atom_names, load_atom_labels, name_atoms, name_atoms_reference,
                                     naming_coverage, normalise_token, plot_naming, token_concepts,
                                     world_scene_objects)
from analyses.plotting import save_png, write_csv
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes
from segcompass.world.scenes import make_sample


def test_text_token_concepts():
    strings = ["▁Red", "Ġcircles", "left", "of", "the", "largest", "▁top", "<s>"]
    types = [TokenType.PROMPT] * 4 + [TokenType.RESPONSE] * 3 + [TokenType.SPECIAL]
    grid = [(-1, -1)] * len(types)
    concepts = token_concepts(types, grid, [0] * len(types), strings, [[]], (4, 4))
    assert concepts == [("text:red",), ("text:circle",), ("text:left",), (), (), ("text:largest",),
                        ("text:top",), ()]
    assert normalise_token("▁Star,") == "star"


def test_image_token_concepts_on_a_world_scene():
    sample = make_sample("train", 0, seed=0)
    scene = world_scene_objects(sample)
    grid_shape = (16, 16)  # 8x8-pixel patches of the 128x128 image
    cells = [(r, c) for r in range(16) for c in range(16)]
    concepts = token_concepts([TokenType.IMAGE] * 256, cells, [0] * 256, [""] * 256, [scene], grid_shape)
    for obj in sample.objects:
        x, y = obj.centre
        if obj.mask[int(y), int(x)]:  # centre visible: its patch carries the object's attributes
            token = concepts[int(y) // 8 * 16 + int(x) // 8]
            assert {f"image:colour={obj.colour}", f"image:shape={obj.shape}", f"image:size={obj.size}"} <= set(token)
    labels = sample.objects[0].labels
    for t, (r, c) in enumerate(cells):
        empty = (labels[8 * r:8 * r + 8, 8 * c:8 * c + 8] < 0).all()
        assert (concepts[t] == (BACKGROUND,)) == bool(empty)


def planted():
    """100 tokens: 40 red patches, 20 'left' words, 40 background patches.
    atom 10: 30 red + 10 background -> P 0.75, R 0.75; atom 11: all 20 'left' words -> 1, 1;
    atom 12: 25 tokens spread evenly (unconfident); atom 13: 5 tokens (below min_count)."""
    concepts = [("image:colour=red", "image:shape=circle")] * 40 + [("text:left",)] * 20 + [(BACKGROUND,)] * 40
    dense = torch.zeros(100, 32)
    dense[list(range(30)) + list(range(60, 70)), 10] = 2.0
    dense[40:60, 11] = -1.5
    dense[::4, 12] = 0.7
    dense[[0, 41, 61, 62, 63], 13] = 3.0
    dense[:, 20] = 0.01  # everywhere but weak: gone at activation_threshold 0.05
    return SparseCodes.from_dense(dense), concepts


def test_planted_atoms_get_their_names():
    codes, concepts = planted()
    names, matrix = concept_matrix(concepts)
    assert names == ["image:background", "image:colour=red", "image:shape=circle", "text:left"]
    table = name_atoms(codes, names, matrix, min_count=20, f1_threshold=0.6, activation_threshold=0.05)
    rows = table.set_index("atom")
    assert sorted(rows.index) == [10, 11, 12]
    assert rows.loc[11, ["name", "precision", "recall", "f1", "count"]].tolist() == ["text:left", 1.0, 1.0, 1.0, 20]
    # atom 10 ties between colour=red and shape=circle; the sorted-first name wins.
    assert rows.loc[10, "name"] == "image:colour=red"
    assert rows.loc[10, ["precision", "recall", "f1"]].tolist() == pytest.approx([0.75, 0.75, 0.75])
    assert rows.loc[12, "name"] == "unnamed" and not rows.loc[12, "confident"]
    assert rows.loc[12, "best_concept"] == "image:background"  # 10 of its 25 tokens
    assert rows.loc[12, "precision"] == pytest.approx(10 / 25) and rows.loc[12, "recall"] == pytest.approx(10 / 40)
    assert table.atom.tolist()[:2] == [11, 10]  # sorted by F1
    weak = name_atoms(codes, names, matrix, min_count=20)  # threshold 0: atom 20 fires everywhere
    assert 20 in weak.atom.tolist()
    coverage = naming_coverage(table, [10, 11, 12, 13])
    assert coverage == (4, 3, 2, 0.5)


def test_parity_with_the_dense_loop():
    rng = np.random.default_rng(0)
    concepts = [tuple(c for c in ("a", "b", "c") if rng.random() < 0.3) for _ in range(200)]
    names, matrix = concept_matrix(concepts)
    dense = torch.from_numpy((rng.random((200, 40)) < 0.15) * rng.uniform(0.1, 2, (200, 40))).float()
    codes = SparseCodes.from_dense(dense)
    table = name_atoms(codes, names, matrix, min_count=25, activation_threshold=0.3)
    ref = name_atoms_reference(codes, names, matrix, min_count=25, activation_threshold=0.3)
    assert sorted(table.atom.tolist()) == sorted(ref)
    for atom, concept, f1 in zip(table.atom, table.best_concept, table.f1):
        assert (concept, f1) == (ref[atom][0], pytest.approx(ref[atom][1]))


def test_labels_for_the_predict_report(tmp_path):
    codes, concepts = planted()
    names, matrix = concept_matrix(concepts)
    table = name_atoms(codes, names, matrix, min_count=20, f1_threshold=0.6, activation_threshold=0.05)
    labels = atom_labels(table)
    assert labels == {11: '"left" (text), F1 1.00', 10: "red (image colour), F1 0.75"}
    assert format_atom_names(torch.tensor([10, 12]), labels) == ["#10 red (image colour), F1 0.75", "#12 (unnamed)"]
    assert load_atom_labels(write_csv(table, tmp_path / "names.csv")) == labels
    assert concept_label(BACKGROUND) == "background (image)"
    fig = plot_naming(table, f1_threshold=0.6)
    path = save_png(fig, tmp_path / "naming.png")
    assert path.stat().st_size > 10_000
    assert [ax.get_xlabel() for ax in fig.axes] == ["best-concept F1", "confidently named atoms"]


def test_concept_matrix_shape_is_checked():
    codes, concepts = planted()
    names, matrix = concept_matrix(concepts)
    with pytest.raises(ValueError, match="does not match"):
        name_atoms(codes, names, matrix[:50])
    scene = [SceneObject(np.ones((8, 8), bool), ("image:colour=red",))]
    assert token_concepts([TokenType.IMAGE], [(0, 0)], [0], [""], [scene], (2, 2)) == [("image:colour=red",)]
