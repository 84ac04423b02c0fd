"""Concept naming: token concepts (attributes and positions) from a world scene and token strings;
planted atom <-> concept pairs recovered with hand-computed precision / recall; a concept recalled
only by the union of two atoms named as a group; parity with the dense loops."""

import numpy as np
import pytest
import torch

from analyses.concept_naming import (BACKGROUND, SceneObject, atom_labels, concept_label, concept_matrix,
                                     format_atom_names, group_labels, load_atom_labels, name_atoms,
                                     name_atoms_reference, name_concept_groups, naming_coverage, normalise_token,
                                     plot_naming, token_concepts, union_f1_reference, world_scene_objects)
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
            row, column = obj.position.split()
            assert {f"image:colour={obj.colour}", f"image:shape={obj.shape}", f"image:size={obj.size}",
                    f"image:row={row}", f"image:column={column}"} <= set(token)
    labels = sample.objects[0].labels
    thirds = ["top"] * 5 + ["middle"] * 6 + ["bottom"] * 5  # the third holding each of 16 cell centres
    for t, (r, c) in enumerate(cells):
        empty = (labels[8 * r:8 * r + 8, 8 * c:8 * c + 8] < 0).all()
        column = {"top": "left", "middle": "centre", "bottom": "right"}[thirds[c]]
        place = {f"image:token_row={thirds[r]}", f"image:token_column={column}"}
        assert place <= set(concepts[t])
        assert (BACKGROUND in concepts[t]) == bool(empty) and (len(concepts[t]) == 3) == bool(empty)
    bare = token_concepts([TokenType.IMAGE] * 256, cells, [0] * 256, [""] * 256, [scene], grid_shape,
                          token_position=False)
    assert all((c == (BACKGROUND,)) == (BACKGROUND in full) for c, full in zip(bare, concepts))


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
    assert token_concepts([TokenType.IMAGE], [(0, 0)], [0], [""], [scene], (2, 2), token_position=False) == [
        ("image:colour=red",)]
    assert token_concepts([TokenType.IMAGE], [(0, 0)], [0], [""], [scene], (2, 2)) == [
        ("image:colour=red", "image:token_column=left", "image:token_row=top")]


def split_concept():
    """100 tokens: 40 red patches, 40 blue patches, 20 'left' words. Atoms 1 and 2 each fire on
    half of the red patches (P 1, R 0.5); atom 3 on 10 red and 30 blue patches; atom 4 on every
    'left' word; atom 7 on 5 tokens (below min_count)."""
    concepts = [("image:colour=red",)] * 40 + [("image:colour=blue",)] * 40 + [("text:left",)] * 20
    dense = torch.zeros(100, 16)
    dense[0:20, 1] = 1.0
    dense[20:40, 2] = 2.0
    dense[list(range(10)) + list(range(40, 70)), 3] = 1.5
    dense[80:100, 4] = 1.0
    dense[[0, 40, 80, 81, 82], 7] = 3.0
    return SparseCodes.from_dense(dense), concepts


def test_a_concept_recalled_only_by_two_atoms_is_named_as_a_group():
    codes, concepts = split_concept()
    names, matrix = concept_matrix(concepts)
    singles = name_atoms(codes, names, matrix, min_count=20, f1_threshold=0.8).set_index("atom")
    assert not singles.loc[[1, 2], "confident"].any()  # F1 2/3 each: no single atom names red
    assert singles.loc[1, "f1"] == pytest.approx(2 / 3) and singles.loc[4, "name"] == "text:left"
    groups = name_concept_groups(codes, names, matrix, max_atoms=3, min_count=20, f1_threshold=0.8)
    rows = groups.set_index("concept")
    red = rows.loc["image:colour=red"]
    assert (red.atoms, red.n_atoms, bool(red.is_group), bool(red.confident)) == ("1 2", 2, True, True)
    assert (red.precision, red.recall, red.f1) == (1.0, 1.0, 1.0)
    assert red.single_atom == 1 and red.single_f1 == pytest.approx(2 / 3)
    left = rows.loc["text:left"]  # one atom suffices: no group
    assert (left.atoms, bool(left.is_group), left.f1) == ("4", False, 1.0)
    blue = rows.loc["image:colour=blue"]  # atom 3 alone (P 0.75, R 0.75); adding red atoms only hurts
    assert (blue.atoms, bool(blue.is_group), bool(blue.confident)) == ("3", False, False)
    assert blue.f1 == pytest.approx(0.75)
    assert groups.concept.tolist()[-1] == "image:colour=blue"  # sorted by F1
    assert union_f1_reference(codes, matrix[:, names.index("image:colour=red")], [1, 2]) == 1.0
    assert group_labels(groups) == {"image:colour=red": "red (image colour): group of atoms #1 + #2, F1 1.00"}
    one = name_concept_groups(codes, names, matrix, max_atoms=1, min_count=20, f1_threshold=0.8)
    assert not one.is_group.any() and one.set_index("concept").loc["image:colour=red", "f1"] == pytest.approx(2 / 3)


def test_group_search_matches_a_dense_greedy_loop():
    rng = np.random.default_rng(3)
    concepts = [tuple(c for c in ("a", "b", "c") if rng.random() < 0.3) or ("d",) for _ in range(300)]
    names, matrix = concept_matrix(concepts)
    dense = torch.from_numpy((rng.random((300, 30)) < 0.12) * rng.uniform(0.1, 2, (300, 30))).float()
    codes = SparseCodes.from_dense(dense)
    groups = name_concept_groups(codes, names, matrix, max_atoms=3, min_count=25, f1_threshold=0.95,
                                 activation_threshold=0.3, min_gain=0.0)
    counts = (dense.abs() > 0.3).sum(0).numpy()
    candidates = [a for a in range(30) if counts[a] >= 25]
    for row in groups.itertuples():
        column = matrix[:, names.index(row.concept)]
        chosen, best = [], 0.0
        for _ in range(3):
            scores = {a: union_f1_reference(codes, column, chosen + [a], activation_threshold=0.3)
                      for a in candidates if a not in chosen}
            a = max(scores, key=lambda k: (scores[k], -k))  # first index wins ties, as argmax
            if scores[a] <= best and chosen:
                break
            chosen.append(a)
            best = scores[a]
        assert row.atoms == " ".join(map(str, chosen)) and row.f1 == pytest.approx(best)


def position_scene():
    """A 12x12 image on a 6x6 grid: A red circle top left, B blue square bottom left, C red square
    middle right, D blue circle bottom right (2x2 patches each). 'left' is A and B: no other
    concept has that set of tokens."""
    objects = []
    for (rows, cols), colour, shape, row, column in [((slice(0, 4), slice(0, 4)), "red", "circle", "top", "left"),
                                                     ((slice(8, 12), slice(0, 4)), "blue", "square", "bottom", "left"),
                                                     ((slice(4, 8), slice(8, 12)), "red", "square", "middle", "right"),
                                                     ((slice(8, 12), slice(8, 12)), "blue", "circle", "bottom",
                                                      "right")]:
        mask = np.zeros((12, 12), bool)
        mask[rows, cols] = True
        objects.append(SceneObject(mask, (f"image:colour={colour}", f"image:shape={shape}", f"image:row={row}",
                                          f"image:column={column}")))
    return objects


def test_position_concepts_name_their_atoms():
    cells = [(r, c) for r in range(6) for c in range(6)]
    n = 5 * 36  # five images of the same scene
    concepts = token_concepts([TokenType.IMAGE] * n, cells * 5, np.repeat(np.arange(5), 36), [""] * n,
                              [position_scene()] * 5, (6, 6))
    assert concepts[0] == ("image:colour=red", "image:column=left", "image:row=top", "image:shape=circle",
                           "image:token_column=left", "image:token_row=top")
    assert concepts[2 * 6 + 2] == (BACKGROUND, "image:token_column=centre", "image:token_row=middle")
    names, matrix = concept_matrix(concepts)
    dense = torch.zeros(n, 8)
    dense[torch.from_numpy(matrix[:, names.index("image:column=left")]), 5] = 1.0  # the objects on the left
    dense[torch.from_numpy(matrix[:, names.index("image:token_row=top")]), 6] = 1.0  # the top third of the grid
    table = name_atoms(SparseCodes.from_dense(dense), names, matrix, min_count=20, f1_threshold=0.6).set_index("atom")
    assert table.loc[5, ["name", "f1", "count"]].tolist() == ["image:column=left", 1.0, 5 * 8]
    assert table.loc[6, ["name", "f1", "count"]].tolist() == ["image:token_row=top", 1.0, 5 * 12]
    assert concept_label("image:token_row=top") == "top (image token row)"
    assert concept_label("image:column=left") == "left (image column)"


def test_no_candidate_atoms_give_an_empty_group_table():
    codes, concepts = split_concept()
    names, matrix = concept_matrix(concepts)
    assert name_concept_groups(codes, names, matrix, min_count=1000).empty
