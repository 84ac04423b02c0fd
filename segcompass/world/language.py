"""Instructions and ground-truth chains of thought of the embedded world.

Every instruction comes from a `Template`: a phrasing with slots, a family and a builder
that, given a scene, picks an unambiguous referent (or returns None when the scene has
none). The chain of thought is short, deterministic and drawn from a small vocabulary so
that a tiny policy trained from scratch can learn to write it:

    the instruction asks for the shape left of the green circle . the green circle is at
    middle right . left of it is the red square . target : red square .

Objects in a listing are always ordered left to right by centre, so the text is a
function of the image. Templates marked `held_out` appear only in the `reason` split
(phrasings and compositions the policy never sees in training).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from segcompass.world.render import (COLOURS, COLUMNS, ROWS, SHAPE_PLURALS, SHAPES, SIZE_RANK,
                                          SIZES, WorldObject)

FAMILIES: tuple[str, ...] = ("direct", "attribute", "spatial", "indirect", "multi", "no_target")

RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

SUPERLATIVES: tuple[str, ...] = ("largest", "smallest")

PROPERTIES: dict[str, str] = {
    "triangle": "the shape with three corners",
    "circle": "the shape with no corners",
    "star": "the shape with five points",
    "cross": "the shape with four arms",
}
"""Shape -> an indirect description of it (used only when that shape is unique in the scene)."""

MAX_TARGETS = 4
"""Most targets a multi-target instruction may have (= the policy's K_MULTI slots)."""

_CLEAR_ALONG = 8.0
"""A relation holds clearly when the other centre is > this many pixels along the direction…"""
_CLEAR_SLOPE = 0.8
"""…and its offset across the direction is < this fraction of the offset along it."""
_MAYBE_SLOPE = 1.25
"""Objects within this looser cone are ambiguous; a relation is used only if none are."""


class Reference(NamedTuple):
    """A built instruction."""

    instruction: str
    targets: tuple[int, ...]
    """Indices of the referred objects (painting order); () for a no-target instruction."""
    cot: str
    """Ground-truth chain of thought, space-separated words, ending with the answer line."""


Builder = Callable[[Sequence[WorldObject], np.random.Generator], "Reference | None"]


class Template(NamedTuple):
    """One instruction template."""

    template_id: str
    """Unique id, e.g. 'spatial/shape_rel'; held-out ones start with 'reason/'."""
    family: str
    """One of FAMILIES."""
    phrasing: str
    """The instruction with slots ({C} colour, {S} shape, {P} plural, {Z} size, {R} relation,
    {X} superlative, {Q} property); two templates never share a phrasing within a family."""
    build: Builder
    held_out: bool
    """True: appears only in the `reason` split."""
    bias: str = "any"
    """Scene bias that makes the template apply more often: 'colours' (few colours, so colours
    repeat), 'shapes' (few shapes) or 'any'."""


# ----------------------------------------------------------------------------- text pieces

def left_to_right(objects: Sequence[WorldObject]) -> list[WorldObject]:
    """Objects ordered by centre x (then y): the order of every listing and answer line."""
    return sorted(objects, key=lambda o: (o.centre[0], o.centre[1]))


def _listing(objects: Sequence[WorldObject], *, sizes: bool = False) -> str:
    """'the red square' / 'the small red square , the blue circle and the ...' (left to right)."""
    names = [f"the {o.size} {o.name}" if sizes else f"the {o.name}" for o in left_to_right(objects)]
    return names[0] if len(names) == 1 else " , ".join(names[:-1]) + " and " + names[-1]


def answer_line(targets: Sequence[WorldObject]) -> str:
    """The closing line every chain of thought ends with."""
    if not targets:
        return "target : none ."
    if len(targets) == 1:
        return f"target : {targets[0].name} ."
    return "targets : " + " , ".join(o.name for o in left_to_right(targets)) + " ."


def _asks(instruction: str) -> str:
    return f"the instruction asks for {instruction} ."


def _ref(instruction: str, targets: Sequence[WorldObject], *steps: str) -> Reference:
    cot = " ".join([_asks(instruction), *steps, answer_line(targets)])
    return Reference(instruction, tuple(sorted(o.index for o in targets)), cot)


def _pick(options: list, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))] if options else None


def describe_scene(objects: Sequence[WorldObject]) -> str:
    """A caption naming every object with its size and position, left to right
    ('the objects are the small red square at top left , … .')."""
    parts = [f"the {o.size} {o.name} at {o.position}" for o in left_to_right(objects)]
    listing = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    return f"the objects are {listing} ."


# ----------------------------------------------------------------------------- relations

def _offsets(anchor: WorldObject, other: WorldObject, relation: str) -> tuple[float, float]:
    """(along, across) offset of `other` from `anchor` for a relation direction."""
    dx = other.centre[0] - anchor.centre[0]
    dy = other.centre[1] - anchor.centre[1]
    return {"left of": (-dx, dy), "right of": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]


def related(objects: Sequence[WorldObject], anchor: WorldObject, relation: str) -> list[WorldObject] | None:
    """Objects clearly in `relation` to `anchor`, or None when some object is borderline."""
    clear, maybe = [], 0
    for other in objects:
        if other is anchor:
            continue
        along, across = _offsets(anchor, other, relation)
        if along > 0 and abs(across) < _MAYBE_SLOPE * along:
            maybe += 1
            if along > _CLEAR_ALONG and abs(across) < _CLEAR_SLOPE * along:
                clear.append(other)
    return clear if len(clear) == maybe else None


def _unique_shape(objects: Sequence[WorldObject], obj: WorldObject) -> bool:
    return sum(o.shape == obj.shape for o in objects) == 1


def _extreme(group: Sequence[WorldObject], superlative: str) -> WorldObject | None:
    """The strictly largest / smallest member by size label, or None on a tie."""
    sign = 1 if superlative == "largest" else -1
    ranks = [sign * SIZE_RANK[o.size] for o in group]
    best = max(ranks)
    return group[ranks.index(best)] if ranks.count(best) == 1 else None


# ----------------------------------------------------------------------------- builders

def _direct(objects, rng):
    t = _pick(list(objects), rng)
    return _ref(f"the {t.name}", [t], f"the {t.name} is at {t.position} .")


def _direct_size(objects, rng):
    t = _pick(list(objects), rng)
    return _ref(f"the {t.size} {t.name}", [t], f"the {t.name} is at {t.position} .")


def _group_options(objects, key: str) -> list[tuple[str, list[WorldObject]]]:
    """(group word, members) of the colour / shape groups present, or the whole scene ('all')."""
    if key == "all":
        return [("", list(objects))]
    values = sorted({getattr(o, key) for o in objects})
    return [(v, [o for o in objects if getattr(o, key) == v]) for v in values]


def _attribute(key: str) -> Builder:
    def build(objects, rng):
        options = []
        for value, group in _group_options(objects, key):
            for sup in SUPERLATIVES:
                t = _extreme(group, sup) if len(group) >= 2 else None
                if t is not None:
                    options.append((value, group, sup, t))
        choice = _pick(options, rng)
        if choice is None:
            return None
        value, group, sup, t = choice
        noun, plural = {"colour": (f"{value} object", f"{value} objects"),
                        "shape": (value, SHAPE_PLURALS.get(value, "")),
                        "all": ("object", "objects")}[key]
        return _ref(f"the {sup} {noun}", [t], f"the {plural} are {_listing(group, sizes=True)} .",
                    f"the {sup} is the {t.name} .")
    return build


def _spatial_options(objects, count: int) -> list[tuple[WorldObject, str, list[WorldObject]]]:
    options = []
    for anchor in objects:
        for relation in RELATIONS:
            found = related(objects, anchor, relation)
            if found is not None and len(found) == count:
                options.append((anchor, relation, found))
    return options


def _spatial(objects, rng):
    choice = _pick(_spatial_options(objects, 1), rng)
    if choice is None:
        return None
    anchor, relation, (t,) = choice
    return _ref(f"the shape {relation} the {anchor.name}", [t],
                f"the {anchor.name} is at {anchor.position} .", f"{relation} it is the {t.name} .")


def _same_colour_options(objects):
    options = []
    for anchor in objects:
        others = [o for o in objects if o is not anchor and o.colour == anchor.colour]
        if _unique_shape(objects, anchor) and len(others) == 1:
            options.append((anchor, others[0]))
    return options


def _same_colour(phrasing: str) -> Builder:
    def build(objects, rng):
        choice = _pick(_same_colour_options(objects), rng)
        if choice is None:
            return None
        anchor, t = choice
        return _ref(phrasing.format(S=anchor.shape), [t], f"the {anchor.shape} is {anchor.colour} .",
                    f"the other {t.colour} object is the {t.name} .")
    return build


def _same_shape(objects, rng):
    options = []
    for anchor in objects:
        others = [o for o in objects if o is not anchor and o.shape == anchor.shape]
        if len(others) == 1:
            options.append((anchor, others[0]))
    choice = _pick(options, rng)
    if choice is None:
        return None
    anchor, t = choice
    return _ref(f"the object with the same shape as the {anchor.name}", [t],
                f"the {anchor.name} is a {anchor.shape} .", f"the other {t.shape} is the {t.name} .")


def _property(objects, rng):
    t = _pick([o for o in objects if o.shape in PROPERTIES and _unique_shape(objects, o)], rng)
    if t is None:
        return None
    phrase = PROPERTIES[t.shape]
    return _ref(phrase, [t], f"{phrase} is a {t.shape} .", f"the {t.shape} is {t.colour} .")


def _all_of(key: str, phrasing: str) -> Builder:
    def build(objects, rng):
        options = [(v, g) for v, g in _group_options(objects, key) if 2 <= len(g) <= MAX_TARGETS]
        choice = _pick(options, rng)
        if choice is None:
            return None
        value, group = choice
        plural = f"{value} objects" if key == "colour" else SHAPE_PLURALS[value]
        instruction = phrasing.format(C=value, P=plural)
        return _ref(instruction, group, f"the {plural} are {_listing(group)} .")
    return build


def _absent_pair(objects, rng):
    present = {(o.colour, o.shape) for o in objects}
    colours, shapes = {o.colour for o in objects}, {o.shape for o in objects}
    # Near misses (a present colour or a present shape) make no-target cases hard, as in gRefCOCO.
    options = [(c, s) for c in COLOURS for s in SHAPES
               if (c, s) not in present and (c in colours or s in shapes)]
    choice = _pick(options, rng)
    if choice is None:
        return None
    c, s = choice
    return _ref(f"the {c} {s}", [], f"there is no {c} {s} .")


def _absent_colour(objects, rng):
    colour = _pick([c for c in COLOURS if all(o.colour != c for o in objects)], rng)
    if colour is None:
        return None
    return _ref(f"all the {colour} objects", [], f"there are no {colour} objects .")


def _absent_relation(objects, rng):
    choice = _pick(_spatial_options(objects, 0), rng)
    if choice is None:
        return None
    anchor, relation, _ = choice
    return _ref(f"the shape {relation} the {anchor.name}", [],
                f"the {anchor.name} is at {anchor.position} .", f"there is no shape {relation} it .")


# ----------------------------------------------------------------------------- hallucinations
# Training data for the head, never instructions of a split: a no-target instruction paired
# with the chain of thought of a policy that wrongly finds its referent. The targets stay
# empty (the truth), so a head trained on these learns to check the object a chain of
# thought names against the image rather than trust the text.

def _hallucinated_pair(objects, rng):
    """'the C S' (absent, a near miss) with 'the C S is at P . target : C S .'"""
    ref = _absent_pair(objects, rng)
    if ref is None:
        return None
    name = ref.instruction.removeprefix("the ")
    position = f"{_pick(list(ROWS), rng)} {_pick(list(COLUMNS), rng)}"
    cot = " ".join([_asks(ref.instruction), f"the {name} is at {position} .", f"target : {name} ."])
    return Reference(ref.instruction, (), cot)


def _hallucinated_colour(objects, rng):
    """'all the C objects' (none present) listing one or two C objects of shapes in the scene."""
    colour = _pick([c for c in COLOURS if all(o.colour != c for o in objects)], rng)
    if colour is None:
        return None
    # near misses: shapes that are in the scene, in another colour
    present = sorted({o.shape for o in objects}, key=SHAPES.index)
    picked = sorted(rng.permutation(len(present))[:int(rng.integers(1, 3))])
    names = [f"{colour} {present[i]}" for i in picked]
    instruction = f"all the {colour} objects"
    listing = " and ".join(f"the {n}" for n in names)
    answer = f"target : {names[0]} ." if len(names) == 1 else "targets : " + " , ".join(names) + " ."
    return Reference(instruction, (), " ".join([_asks(instruction), f"the {colour} objects are {listing} .", answer]))


HALLUCINATIONS: dict[str, Builder] = {"hallucinated/colour_shape": _hallucinated_pair,
                                      "hallucinated/all_colour": _hallucinated_colour}
"""Template id -> builder of a hallucinated chain of thought (`world.hallucinated_sample`)."""


# ----------------------------------------------------------------------------- held-out builders

def _colour_spatial(objects, rng):
    options = []
    for anchor, relation, found in _spatial_options(objects, 2) + _spatial_options(objects, 3):
        for t in found:
            if sum(o.colour == t.colour for o in found) == 1:
                options.append((anchor, relation, t))
    choice = _pick(options, rng)
    if choice is None:
        return None
    anchor, relation, t = choice
    return _ref(f"the {t.colour} object {relation} the {anchor.name}", [t],
                f"the {anchor.name} is at {anchor.position} .",
                f"the {t.colour} object {relation} it is the {t.name} .")


def _extreme_spatial(objects, rng):
    options = []
    for anchor, relation, found in _spatial_options(objects, 2) + _spatial_options(objects, 3):
        for sup in SUPERLATIVES:
            t = _extreme(found, sup)
            if t is not None:
                options.append((anchor, relation, found, sup, t))
    choice = _pick(options, rng)
    if choice is None:
        return None
    anchor, relation, found, sup, t = choice
    return _ref(f"the {sup} shape {relation} the {anchor.name}", [t],
                f"the {anchor.name} is at {anchor.position} .",
                f"{relation} it are {_listing(found, sizes=True)} .", f"the {sup} is the {t.name} .")


def _two_hop(objects, rng):
    options = []
    for anchor, t in _same_colour_options(objects):
        if anchor.shape in PROPERTIES:
            options.append((anchor, t))
    choice = _pick(options, rng)
    if choice is None:
        return None
    anchor, t = choice
    phrase = PROPERTIES[anchor.shape]
    return _ref(f"the object with the same colour as {phrase}", [t], f"{phrase} is a {anchor.shape} .",
                f"the {anchor.shape} is {anchor.colour} .", f"the other {t.colour} object is the {t.name} .")


# ----------------------------------------------------------------------------- the templates

TEMPLATES: tuple[Template, ...] = (
    Template("direct/colour_shape", "direct", "the {C} {S}", _direct, False),
    Template("direct/size_colour_shape", "direct", "the {Z} {C} {S}", _direct_size, False),
    Template("attribute/colour", "attribute", "the {X} {C} object", _attribute("colour"), False, "colours"),
    Template("attribute/shape", "attribute", "the {X} {S}", _attribute("shape"), False, "shapes"),
    Template("attribute/all", "attribute", "the {X} object", _attribute("all"), False),
    Template("spatial/shape_rel", "spatial", "the shape {R} the {C} {S}", _spatial, False),
    Template("indirect/same_colour", "indirect", "the object with the same colour as the {S}",
             _same_colour("the object with the same colour as the {S}"), False, "colours"),
    Template("indirect/same_shape", "indirect", "the object with the same shape as the {C} {S}",
             _same_shape, False, "shapes"),
    Template("indirect/property", "indirect", "{Q}", _property, False),
    Template("multi/all_colour", "multi", "all the {C} objects", _all_of("colour", "all the {C} objects"), False,
             "colours"),
    Template("multi/all_shape", "multi", "all the {P}", _all_of("shape", "all the {P}"), False, "shapes"),
    Template("no_target/colour_shape", "no_target", "the {C} {S}", _absent_pair, False),
    Template("no_target/all_colour", "no_target", "all the {C} objects", _absent_colour, False),
    Template("no_target/shape_rel", "no_target", "the shape {R} the {C} {S}", _absent_relation, False),
    # Held out: new phrasings of trained reasoning, and compositions never trained.
    Template("reason/shares_colour", "indirect", "the thing that shares its colour with the {S}",
             _same_colour("the thing that shares its colour with the {S}"), True, "colours"),
    Template("reason/colour_rel", "spatial", "the {C} object {R} the {C} {S}", _colour_spatial, True),
    Template("reason/extreme_rel", "attribute", "the {X} shape {R} the {C} {S}", _extreme_spatial, True),
    Template("reason/same_colour_as_property", "indirect", "the object with the same colour as {Q}",
             _two_hop, True, "colours"),
    Template("reason/every_colour", "multi", "every {C} shape", _all_of("colour", "every {C} shape"), True,
             "colours"),
)

TEMPLATES_BY_ID: dict[str, Template] = {t.template_id: t for t in TEMPLATES}


def phrasing_of(instruction: str) -> str:
    """The slot skeleton of an instruction ('the shape left of the green circle' ->
    'the shape {R} the {C} {S}'), for proving held-out phrasings never occur in training."""
    text = f" {instruction} "
    for phrase in PROPERTIES.values():
        text = text.replace(f" {phrase} ", " {Q} ")
    for relation in RELATIONS:
        text = text.replace(f" {relation} ", " {R} ")
    words = []
    for word in text.split():
        slot = ("{C}" if word in COLOURS else "{S}" if word in SHAPES else
                "{P}" if word in SHAPE_PLURALS.values() else "{Z}" if word in SIZES else
                "{X}" if word in SUPERLATIVES else None)
        words.append(slot or word)
    return " ".join(words)


_FIXED_WORDS = """
the instruction asks for is at it are a and , . : target targets none other object objects shape
with same as colour there no thing that shares its every all of
"""


def vocabulary() -> list[str]:
    """Every word an instruction or chain of thought can contain, sorted."""
    words = set(_FIXED_WORDS.split())
    words.update(COLOURS, SHAPES, SHAPE_PLURALS.values(), SIZES, ROWS, COLUMNS, SUPERLATIVES)
    for phrase in [*RELATIONS, *PROPERTIES.values()]:
        words.update(phrase.split())
    return sorted(words)
