"""Beyond the paper: name each frequently active SAE atom by the world concept it detects.

Concepts of a token:
  image tokens  the attributes of every object whose pixels fall in the token's patch
                ('image:colour=red', 'image:shape=circle', 'image:size=large', and its place
                in the image: 'image:row=top', 'image:column=left', the 3x3 cell of its centre
                from the world's render metadata), or 'image:background' when no object does
                (more than `min_fraction` of the patch, 0 = any pixel); and, object or not, the
                token's own place on the grid ('image:token_row=top', 'image:token_column=left':
                the third of the grid holding the patch centre);
  text tokens   the concept word the token itself spells ('text:red', 'text:circle'
                (plurals fold to the singular), 'text:large', 'text:left', 'text:above',
                'text:largest', 'text:top' ...); other words have no concept;
  special       none.
Image and text concepts are kept apart on purpose: an atom that fires on red patches and
on the word "red" shows up as two candidate names, each with its own recall.

For an atom a active (|h| > activation_threshold) on `count` >= min_count tokens and a
concept c: precision = P(c | a active), recall = P(a active | c), F1 their harmonic mean,
all over the tokens given. The atom's name is its best-F1 concept; it is confident when
that F1 >= f1_threshold. Text concepts match whole tokens: with a subword tokenizer
(the 7B models) a word split into pieces ('▁tri', 'angle') gets no concept.

Groups of atoms (`name_concept_groups`): a wide SAE spreads one concept over several atoms,
each recalling part of it, so no single atom reaches the threshold. Per concept, atoms are
added greedily (up to `max_atoms`, each the one whose addition gives the largest F1 of the
group's union, "any of them active"), while the F1 rises by at least `min_gain`; the first
pick is the best single atom, and a concept it already names (F1 >= f1_threshold) keeps it
alone. The result names the group, its F1 and that it is a group.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analyses.patches import as_numpy, grid_of, patch_fractions, rows_by_sample
from analyses.plotting import label_axes, new_figure
from saekit.inputs import TokenType
from saekit.sparse import SparseCodes
from segcompass.world.language import RELATIONS, SUPERLATIVES
from segcompass.world.render import COLOURS, COLUMNS, ROWS, SHAPE_PLURALS, SHAPES, SIZES

BACKGROUND = "image:background"


def _text_concepts() -> dict[str, str]:
    """Concept word -> concept key ('crosses' -> 'text:cross')."""
    words = {w: w for w in [*COLOURS, *SHAPES, *SIZES, *SUPERLATIVES, *ROWS, *COLUMNS]}
    words.update({plural: shape for shape, plural in SHAPE_PLURALS.items()})
    for relation in RELATIONS:  # 'left of' -> 'left'; 'of' alone is not a concept
        words.setdefault(relation.split()[0], relation.split()[0])
    return {word: f"text:{concept}" for word, concept in words.items()}


TEXT_CONCEPTS: dict[str, str] = _text_concepts()
"""Every word that names a text concept, mapped to its key."""


class SceneObject(NamedTuple):
    mask: np.ndarray
    """(H, W) bool visible pixels, in the frame the model saw."""
    concepts: tuple[str, ...]
    """Its image concepts, e.g. ('image:colour=red', 'image:shape=circle', 'image:size=large')."""


def world_scene_objects(sample) -> list[SceneObject]:
    """The objects of a `segcompass.world.scenes.WorldSample` with their colour, shape, size and
    position (the row and column of the 3x3 cell holding the object's centre)."""
    out = []
    for o in sample.objects:
        row, column = o.position.split()  # 'top left'
        out.append(SceneObject(o.mask, (f"image:colour={o.colour}", f"image:shape={o.shape}", f"image:size={o.size}",
                                        f"image:row={row}", f"image:column={column}")))
    return out


def token_place(index: int, cells: int) -> int:
    """Which third (0, 1, 2) of `cells` grid cells holds the centre of cell `index`."""
    return min(int(3 * (index + 0.5) / cells), 2)


def normalise_token(token: str) -> str:
    """'▁Red' / 'Ġred' / ' red,' -> 'red' (SentencePiece and byte-level BPE word markers removed)."""
    return token.replace("▁", "").replace("Ġ", "").strip().strip(".,:;!?'\"").lower()


def token_concepts(token_types, image_grid, token_sample_index, token_strings: Sequence[str],
                   scenes: Sequence[Sequence[SceneObject]], grid_shape, *, min_fraction: float = 0.0,
                   token_position: bool = True) -> list[tuple[str, ...]]:
    """The concepts of each of N tokens (see the module docstring).

    token_strings (N,) the tokens as the tokenizer spells them (`convert_ids_to_tokens`);
    scenes[b] the objects of sample b; grid_shape (rows, cols), shared or per sample;
    token_position adds each image token's own place on the grid.
    """
    types, grid = as_numpy(token_types).astype(np.int64), as_numpy(image_grid).astype(np.int64)
    samples = as_numpy(token_sample_index).astype(np.int64)
    out: list[tuple[str, ...]] = [()] * len(types)
    for t in np.flatnonzero((types == TokenType.PROMPT) | (types == TokenType.RESPONSE)):
        concept = TEXT_CONCEPTS.get(normalise_token(token_strings[t]))
        out[t] = (concept,) if concept else ()
    on_grid = (types == TokenType.IMAGE) & (grid[:, 0] >= 0)
    for sample, rows in rows_by_sample(on_grid, samples).items():
        shape = grid_of(grid_shape, sample)
        under = [patch_fractions(obj.mask, shape)[grid[rows, 0], grid[rows, 1]] > min_fraction
                 for obj in scenes[sample]]  # per object: (n_image,) bool
        for i, t in enumerate(rows):
            names = sorted({c for obj, hit in zip(scenes[sample], under) if hit[i] for c in obj.concepts})
            place = (f"image:token_row={ROWS[token_place(grid[t, 0], shape[0])]}",
                     f"image:token_column={COLUMNS[token_place(grid[t, 1], shape[1])]}") if token_position else ()
            out[t] = tuple(sorted([*(names or [BACKGROUND]), *place]))
    return out


def concept_matrix(concepts: Sequence[Sequence[str]]) -> tuple[list[str], np.ndarray]:
    """(sorted concept names, (N, C) bool token-has-concept matrix)."""
    names = sorted({c for token in concepts for c in token})
    column = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(concepts), len(names)), dtype=bool)
    for t, token in enumerate(concepts):
        matrix[t, [column[c] for c in token]] = True
    return names, matrix


def _best(co: np.ndarray, atom_count: np.ndarray, concept_count: np.ndarray):
    """Precision, recall, F1 of each atom's best-F1 concept: rows of co (A, C) co-occurrences."""
    precision = co / np.maximum(atom_count[:, None], 1)
    recall = co / np.maximum(concept_count[None, :], 1)
    f1 = np.where(co > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = f1.argmax(axis=1)  # first concept wins ties (names are sorted)
    pick = np.arange(len(co))
    return best, precision[pick, best], recall[pick, best], f1[pick, best]


def fired_matrix(codes: SparseCodes, activation_threshold: float = 0.0) -> scipy.sparse.csr_matrix:
    """(N, d_sae) float 0/1 sparse "atom active (|h| > threshold) at token"."""
    active = (codes.values.detach().abs() > activation_threshold).cpu().numpy()
    rows, atoms = codes.row_ids().cpu().numpy()[active], codes.indices.cpu().numpy()[active]
    # duplicates cannot occur (CSR rows are unique)
    return scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, atoms)), shape=(codes.n_tokens, codes.d_sae))


def _check_concepts(codes: SparseCodes, concept_names: Sequence[str], has_concept: np.ndarray) -> None:
    if not len(concept_names):
        raise ValueError("no concepts to name atoms by: no token carries a concept")
    if has_concept.shape != (codes.n_tokens, len(concept_names)):
        raise ValueError(f"concept matrix {has_concept.shape} does not match {codes.n_tokens} tokens "
                         f"x {len(concept_names)} concepts")


def name_atoms(codes: SparseCodes, concept_names: Sequence[str], has_concept: np.ndarray, *,
               min_count: int = 20, f1_threshold: float = 0.5, activation_threshold: float = 0.0
               ) -> pd.DataFrame:
    """Name every atom active on >= min_count of the N tokens by its best-F1 concept.

    has_concept (N, C) bool from `concept_matrix`. Returns columns atom, name ('unnamed'
    unless confident), best_concept, precision, recall, f1, count, confident; sorted by
    descending F1.
    """
    _check_concepts(codes, concept_names, has_concept)
    fired = fired_matrix(codes, activation_threshold)
    atom_count = np.asarray(fired.sum(axis=0)).ravel()  # (d_sae,)
    frequent = np.flatnonzero(atom_count >= min_count)
    co = np.asarray((fired[:, frequent].T @ has_concept.astype(np.float64)))  # (A, C) co-occurrence counts
    best, precision, recall, f1 = _best(co, atom_count[frequent], has_concept.sum(axis=0))
    names = np.asarray(concept_names, dtype=object)[best]
    confident = f1 >= f1_threshold
    table = pd.DataFrame({"atom": frequent.astype(np.int64), "name": np.where(confident, names, "unnamed"),
                          "best_concept": names, "precision": precision, "recall": recall, "f1": f1,
                          "count": atom_count[frequent].astype(np.int64), "confident": confident})
    return table.sort_values(["f1", "atom"], ascending=[False, True], ignore_index=True)


def name_atoms_reference(codes: SparseCodes, concept_names: Sequence[str], has_concept: np.ndarray, *,
                         min_count: int = 20, activation_threshold: float = 0.0) -> dict[int, tuple[str, float]]:
    """Dense loop definition: atom -> (best concept, its F1), for parity tests on small inputs."""
    dense = codes.to_dense().abs().cpu().numpy() > activation_threshold  # (N, d_sae)
    out = {}
    for atom in range(codes.d_sae):
        on = dense[:, atom]
        if on.sum() < min_count:
            continue
        scores = []
        for c in range(len(concept_names)):
            both = (on & has_concept[:, c]).sum()
            p, r = both / on.sum(), both / max(has_concept[:, c].sum(), 1)
            scores.append(2 * p * r / (p + r) if both else 0.0)
        best = int(np.argmax(scores))
        out[atom] = (concept_names[best], float(scores[best]))
    return out


class ConceptGroup(NamedTuple):
    """The atoms chosen for one concept (`greedy_group`)."""

    atoms: tuple[int, ...]
    """Atom indices in the order they were added (the first is the best single atom)."""
    f1: float
    """F1 of the union ("any of the atoms active") for the concept."""
    precision: float
    recall: float
    single_f1: float
    """F1 of the first atom alone."""


def greedy_group(fired_t: scipy.sparse.csr_matrix, positives: np.ndarray, *, max_atoms: int = 3,
                 stop_at: float = 1.0, min_gain: float = 0.01) -> ConceptGroup | None:
    """Greedy union of up to `max_atoms` columns maximising F1 for one concept.

    fired_t (A, N) 0/1 sparse: candidate atoms x tokens; positives (N,) bool: the concept's
    tokens. An atom is added when it raises the union's F1 by >= min_gain; the search stops
    once the F1 reaches `stop_at`. Candidate indices are rows of fired_t. None when no
    candidate fires on a positive token.
    """
    positives = np.asarray(positives, dtype=bool)
    if fired_t.shape[0] == 0:  # no candidate atom
        return None
    n_pos = int(positives.sum())
    covered = np.zeros(len(positives), dtype=bool)
    chosen: list[int] = []
    tp = predicted = 0
    best = single = 0.0
    for _ in range(max_atoms):
        rest = (~covered).astype(np.float64)
        new_pred = fired_t @ rest  # (A,) tokens each atom adds to the union
        new_tp = fired_t @ (rest * positives)  # (A,) concept tokens among them
        f1 = 2 * (tp + new_tp) / np.maximum(predicted + new_pred + n_pos, 1)
        f1[chosen] = -1.0
        a = int(np.argmax(f1))
        if f1[a] <= 0 or (chosen and f1[a] - best < max(min_gain, 1e-12)):  # an atom must raise the F1
            break
        chosen.append(a)
        tp, predicted, best = tp + new_tp[a], predicted + new_pred[a], float(f1[a])
        covered[fired_t[a].indices] = True
        single = single or best  # the first atom's F1
        if best >= stop_at:
            break
    if not chosen:
        return None
    return ConceptGroup(tuple(chosen), best, tp / max(predicted, 1), tp / max(n_pos, 1), single)


def name_concept_groups(codes: SparseCodes, concept_names: Sequence[str], has_concept: np.ndarray, *,
                        max_atoms: int = 3, min_count: int = 20, f1_threshold: float = 0.5,
                        activation_threshold: float = 0.0, min_gain: float = 0.01) -> pd.DataFrame:
    """Per concept, the atom (or group of up to `max_atoms` atoms) that best recalls it (module docstring).

    Candidates are the atoms active on >= min_count tokens. Returns one row per concept that
    some candidate fires on: concept, atoms (space-separated, in the order added), n_atoms,
    is_group (n_atoms > 1), precision, recall, f1, single_atom, single_f1 (the best single
    atom), confident (f1 >= f1_threshold); sorted by descending F1.
    """
    _check_concepts(codes, concept_names, has_concept)
    if max_atoms < 1:
        raise ValueError(f"max_atoms must be >= 1, got {max_atoms}")
    fired = fired_matrix(codes, activation_threshold)
    frequent = np.flatnonzero(np.asarray(fired.sum(axis=0)).ravel() >= min_count)
    fired_t = fired[:, frequent].T.tocsr()  # (A, N)
    records = []
    for c, concept in enumerate(concept_names):
        group = greedy_group(fired_t, has_concept[:, c], max_atoms=max_atoms, stop_at=f1_threshold,
                             min_gain=min_gain)
        if group is None:
            continue
        atoms = frequent[list(group.atoms)]
        records.append({"concept": concept, "atoms": " ".join(str(int(a)) for a in atoms), "n_atoms": len(atoms),
                        "is_group": len(atoms) > 1, "precision": group.precision, "recall": group.recall,
                        "f1": group.f1, "single_atom": int(atoms[0]), "single_f1": group.single_f1,
                        "confident": group.f1 >= f1_threshold})
    columns = ["concept", "atoms", "n_atoms", "is_group", "precision", "recall", "f1", "single_atom", "single_f1",
               "confident"]
    table = pd.DataFrame.from_records(records, columns=columns)
    return table.sort_values(["f1", "concept"], ascending=[False, True], ignore_index=True)


def union_f1_reference(codes: SparseCodes, has_concept_column: np.ndarray, atoms: Sequence[int], *,
                       activation_threshold: float = 0.0) -> float:
    """Dense definition: F1 of "any of `atoms` active" for one concept column (parity tests)."""
    dense = codes.to_dense().abs().cpu().numpy() > activation_threshold  # (N, d_sae)
    union = dense[:, list(atoms)].any(axis=1)
    both = (union & has_concept_column).sum()
    return float(2 * both / (union.sum() + has_concept_column.sum())) if both else 0.0


def group_labels(groups: pd.DataFrame) -> dict[str, str]:
    """concept -> 'red (image colour): group of atoms #12 + #40, F1 0.81' for confident groups."""
    named = groups[groups.confident & groups.is_group]
    return {c: f"{concept_label(c)}: group of atoms {' + '.join('#' + a for a in atoms.split())}, F1 {f:.2f}"
            for c, atoms, f in zip(named.concept, named.atoms, named.f1)}


class NamingCoverage(NamedTuple):
    n_atoms: int
    """Atoms used by the codebook (the denominator)."""
    n_frequent: int
    """Of those, atoms active often enough to be judged (>= min_count tokens)."""
    n_named: int
    """Of those, atoms with a confident name."""
    fraction: float
    """n_named / n_atoms: atoms below min_count count as unnamed."""


def naming_coverage(table: pd.DataFrame, codebook_atoms) -> NamingCoverage:
    """What fraction of the codebook's atoms (e.g. those surviving its threshold) got a confident name."""
    atoms = np.unique(as_numpy(codebook_atoms).astype(np.int64))
    judged = table[table.atom.isin(atoms)]
    n_named = int(judged.confident.sum())
    return NamingCoverage(len(atoms), len(judged), n_named, n_named / len(atoms) if len(atoms) else float("nan"))


def concept_label(concept: str) -> str:
    """Readable concept: 'image:colour=red' -> 'red (image colour)', 'text:left' -> '"left" (text)'."""
    if concept == BACKGROUND:
        return "background (image)"
    if concept.startswith("image:"):
        kind, _, value = concept.removeprefix("image:").partition("=")
        return f"{value} (image {kind.replace('_', ' ')})"
    if concept.startswith("text:"):
        return f'"{concept.removeprefix("text:")}" (text)'
    return concept


def atom_labels(table: pd.DataFrame) -> dict[int, str]:
    """atom -> 'red (image colour), F1 0.82' for every confidently named atom."""
    named = table[table.confident]
    return {int(a): f"{concept_label(c)}, F1 {f:.2f}" for a, c, f in zip(named.atom, named.best_concept, named.f1)}


def format_atom_names(atoms, labels: dict[int, str]) -> list[str]:
    """One line per atom for the predict report: '#123 red (image colour), F1 0.82' or '#123 (unnamed)'."""
    return [f"#{int(a)} {labels.get(int(a), '(unnamed)')}" for a in as_numpy(atoms).reshape(-1)]


def load_atom_labels(csv_path: str | Path) -> dict[int, str]:
    """`atom_labels` of a naming table written as CSV (`analyses.plotting.write_csv`)."""
    table = pd.read_csv(csv_path)
    table["confident"] = table["confident"].astype(str).str.lower() == "true"
    return atom_labels(table)


def plot_naming(table: pd.DataFrame, *, f1_threshold: float = 0.5, top: int = 20,
                title: str = "SAE atoms named by world concepts") -> Figure:
    """Left: best-F1 histogram of the frequent atoms with the threshold; right: named atoms per concept."""
    fig, (left, right) = new_figure(2, width=5.4, height=4.6)
    left.hist(table.f1, bins=np.linspace(0, 1, 21), color="#1f77b4", alpha=0.8,
              label=f"frequent atoms (n={len(table)})")
    left.axvline(f1_threshold, color="#d62728", linestyle="--", label=f"confident: F1 >= {f1_threshold}")
    label_axes(left, "best-concept F1", "number of atoms", "How well each atom matches a concept")
    left.legend(fontsize="small")
    counts = table[table.confident].best_concept.value_counts().head(top)[::-1]
    right.barh([concept_label(c) for c in counts.index], counts.values, color="#2ca02c")
    label_axes(right, "confidently named atoms", "concept", f"Top {len(counts)} concepts")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return fig
