"""The embedded reasoning-segmentation world: procedurally generated scenes, instructions,
ground-truth chains of thought and instance masks, in splits that mirror the paper's data.

    train / val   2-7 objects, every family of trained templates (RefCOCO-like + gRefCOCO-like)
    testA         sparse scenes (2-4 objects, no overlap), single-target families
    testB         cluttered scenes (5-7 objects, heavy overlap), single-target families
    multi         gRefCOCO-like: multi-target + no-target + single-target, all with the K-slot prompt
    reason        zero-shot (ReasonSeg analogue): only held-out phrasings and compositions

A sample is a pure function of (seed, split, index): `np.random.default_rng([seed, split, index])`
drives everything, so the same seed gives identical bytes on every machine, and any
sample can be regenerated alone. Within a scene no two objects share colour AND shape, so
"red square" names exactly one object and a chain of thought can be checked by its words.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np

from saekit.atomic import atomic_file
from saekit.errors import UserError
from segcompass.data.sample import SegSample
from segcompass.world.language import (FAMILIES, HALLUCINATIONS, TEMPLATES, Template, answer_line, phrasing_of,
                                            vocabulary)
from segcompass.world.render import (COLOURS, IMAGE_SIZE, SHAPES, SIZES, Placement, WorldObject,
                                          instance_masks, layout, render, scene_objects)

__all__ = ["SPLITS", "SplitSpec", "WorldObject", "WorldSample", "answer_line", "export_jsonl", "export_png",
           "generate", "hallucinated_sample", "iter_samples", "make_sample", "phrasing_of", "sample_from_id",
           "sample_text", "world_vocabulary"]

Split = Literal["train", "val", "testA", "testB", "multi", "reason", "train_absence"]


@dataclass(frozen=True)
class SplitSpec:
    """How one split's scenes and instructions are drawn."""

    code: int
    """Stable integer mixed into the seed (never reuse one: it would alias two splits)."""
    n_objects: tuple[int, int]
    """Inclusive range of objects per scene."""
    size_weights: tuple[float, float, float]
    """Probability of small / medium / large objects."""
    spacing: float
    """Minimum centre distance as a fraction of the two radii's sum (< 1 allows overlap)."""
    min_visible: float
    """Reject a scene in which any object keeps less than this fraction of its pixels."""
    family_weights: dict[str, float]
    """Family -> probability of drawing it (templates within a family are equally likely)."""
    held_out: bool = False
    """Draw only held-out ('reason/') templates instead of trained ones."""
    always_multi_prompt: bool = False
    """Every sample uses the K-slot prompt (gRefCOCO-like); otherwise multi and no-target do, and
    single-target samples with probability `multi_prompt_share`."""
    multi_prompt_share: float = 0.0
    """Probability that a single-target sample gets the K-slot prompt. Above 0, the prompt no
    longer tells the policy whether a target exists, so the policy must learn to look for
    absence rather than learn the prompt (docs/results.md)."""
    template_weights: dict[str, float] = field(default_factory=dict)
    """Template id -> relative weight within its family (absent: 1). Unweighted families keep
    the plain uniform draw, so adding a weight changes no other split's samples."""

    def __post_init__(self) -> None:
        lo, hi = self.n_objects
        if not 2 <= lo <= hi <= 7:
            raise ValueError(f"n_objects must lie in [2, 7], got {self.n_objects}")
        if not 0 <= self.multi_prompt_share <= 1:
            raise ValueError(f"multi_prompt_share must lie in [0, 1], got {self.multi_prompt_share}")
        if abs(sum(self.size_weights) - 1) > 1e-6 or abs(sum(self.family_weights.values()) - 1) > 1e-6:
            raise ValueError("size_weights and family_weights must each sum to 1")
        if unknown := set(self.family_weights) - set(FAMILIES):
            raise ValueError(f"unknown families {sorted(unknown)}; known: {FAMILIES}")
        if unknown := set(self.template_weights) - {t.template_id for t in TEMPLATES}:
            raise ValueError(f"unknown template ids in template_weights: {sorted(unknown)}")
        if any(w <= 0 for w in self.template_weights.values()):
            raise ValueError(f"template_weights must be > 0, got {self.template_weights}")


_TRAIN_FAMILIES = {"direct": 0.14, "attribute": 0.2, "spatial": 0.2, "indirect": 0.22, "multi": 0.12,
                   "no_target": 0.12}
NO_TARGET_RELATION_MIX = ({"direct": 0.13, "attribute": 0.19, "spatial": 0.19, "indirect": 0.21, "multi": 0.12,
                           "no_target": 0.16}, {"no_target/shape_rel": 2.0})
"""(family_weights, template_weights) of a training mix tried against the default and not
adopted: 'the shape {R} the {C} {S}' with nothing there at 8% of training samples instead of
4%. It fixed the absence decision but made the masks worse, even where the reasoning was
right; the `train_absence` split uses it for a short last phase instead (docs/results.md)."""
_SINGLE_FAMILIES = {"direct": 0.2, "attribute": 0.25, "spatial": 0.25, "indirect": 0.3}

SPLITS: dict[str, SplitSpec] = {
    "train": SplitSpec(0, (2, 7), (0.3, 0.4, 0.3), 0.8, 0.5, _TRAIN_FAMILIES, multi_prompt_share=0.25),
    "val": SplitSpec(1, (2, 7), (0.3, 0.4, 0.3), 0.8, 0.5, _TRAIN_FAMILIES, multi_prompt_share=0.25),
    "testA": SplitSpec(2, (2, 4), (0.2, 0.4, 0.4), 1.15, 1.0, _SINGLE_FAMILIES),
    "testB": SplitSpec(3, (5, 7), (0.45, 0.4, 0.15), 0.6, 0.45, _SINGLE_FAMILIES),
    "multi": SplitSpec(4, (3, 7), (0.3, 0.4, 0.3), 0.8, 0.5,
                       {"multi": 0.4, "no_target": 0.3, "direct": 0.06, "attribute": 0.08, "spatial": 0.08,
                        "indirect": 0.08}, always_multi_prompt=True),
    "reason": SplitSpec(5, (3, 7), (0.3, 0.4, 0.3), 0.8, 0.5,
                        {"attribute": 0.2, "spatial": 0.25, "indirect": 0.4, "multi": 0.15}, held_out=True),
    # train's scenes and templates under NO_TARGET_RELATION_MIX, for a short last phase of the
    # warm start (`WarmstartConfig.split`, `init_from`); a code of its own, so no sample aliases train's
    "train_absence": SplitSpec(6, (2, 7), (0.3, 0.4, 0.3), 0.8, 0.5, NO_TARGET_RELATION_MIX[0],
                               multi_prompt_share=0.25, template_weights=NO_TARGET_RELATION_MIX[1]),
}

_MAX_ATTEMPTS = 200


@dataclass(frozen=True, eq=False)
class WorldSample:
    """One image, one instruction, its targets and the reasoning that finds them."""

    sample_id: str
    """'<split>-<seed>-<index>', unique per (split, seed, index)."""
    split: str
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    instruction: str
    family: str
    """One of FAMILIES."""
    template_id: str
    """Which template made the instruction (held-out ones start with 'reason/')."""
    targets: tuple[int, ...]
    """Indices into `objects` of the referred instances; () for a no-target sample."""
    objects: tuple[WorldObject, ...]
    """The full inventory, in painting order."""
    cot: str
    """Ground-truth chain of thought; ends with 'target : <colour> <shape> .' (or 'targets : …',
    or 'target : none .')."""
    multi_prompt: bool
    """Whether the policy is asked for K_MULTI slots (multi/no-target families, `multi` split)."""
    target_masks: np.ndarray = field(repr=False)
    """(N, H, W) bool visible masks of the targets, N = len(targets)."""

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int16 index of the object visible at each pixel, -1 for background."""
        return self.objects[0].labels

    @property
    def inventory(self) -> list[dict]:
        """JSON-able attributes of every object."""
        return [o.attributes() for o in self.objects]

    @property
    def target_names(self) -> list[str]:
        """'colour shape' of each target."""
        return [self.objects[i].name for i in self.targets]

    def to_seg_sample(self) -> SegSample:
        """The loader-agnostic sample (dataset 'world'); world-specific fields go into meta."""
        meta = {"split": self.split, "family": self.family, "template_id": self.template_id,
                "targets": list(self.targets), "cot": self.cot, "multi_prompt": self.multi_prompt,
                "inventory": self.inventory}
        return SegSample(self.sample_id, self.image, (self.instruction,), self.target_masks,
                         None, "world", meta)


def _weighted(rng: np.random.Generator, weights: tuple[float, ...], n: int) -> np.ndarray:
    """(n,) indices drawn with probabilities `weights` (inverse CDF: ~10x cheaper than choice(p=))."""
    cumulative = np.cumsum(weights)
    return np.minimum(np.searchsorted(cumulative / cumulative[-1], rng.random(n), side="right"), len(weights) - 1)


def _pairs(n: int, bias: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n distinct (colour, shape) pairs from a random sub-grid of colours × shapes.

    Sub-grids make scenes hold objects that share a colour or a shape (the distractors that
    make reasoning necessary). A template's bias narrows one axis to about two objects per
    colour (or shape), which makes 'the other red object' apply most often, and widens the
    other so the anchor stays unique ('the star' must be one object).
    """
    few = (max(2, -(-n // 3)), max(2, -(-n // 2)))
    many = (max(2, min(n, 6) - 1), 6)
    lo_colours, hi_colours = {"colours": few, "shapes": many}.get(bias, (2, len(COLOURS)))
    lo_shapes, hi_shapes = {"shapes": few, "colours": many}.get(bias, (2, len(SHAPES)))
    n_colours = int(rng.integers(lo_colours, hi_colours + 1))
    n_shapes = min(max(int(rng.integers(lo_shapes, hi_shapes + 1)), -(-n // n_colours)), len(SHAPES))
    n_colours = max(n_colours, -(-n // n_shapes))  # ceil: room for n distinct pairs
    colour_ids = rng.permutation(len(COLOURS))[:n_colours]  # permutation: ~4x cheaper than choice
    shape_ids = rng.permutation(len(SHAPES))[:n_shapes]
    cells = rng.permutation(n_colours * n_shapes)[:n]
    colours = list(COLOURS)
    return [(colours[colour_ids[c // n_shapes]], SHAPES[shape_ids[c % n_shapes]]) for c in cells]


LATTICE = 16
"""Object centres sit on the centres of a LATTICE-pixel grid (± LATTICE_JITTER): the 8×8 patch
grid of the tiny policy's vision tower (128 px / 16, or 64 px / 8). A from-scratch tiny ViT
then sees each (shape, size) as nearly the same pixel pattern in its patches and learns shapes
in minutes; at free positions it stays near chance for thousands of steps (docs/results.md)."""
LATTICE_JITTER = 2
"""Pixels of random offset around a lattice point (so no two scenes align perfectly)."""


def _candidate_centres(radius_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, 24, 2) int candidate (x, y) centres per object: lattice points whose stencil fits
    in the image, plus jitter. Drawn in one call for all objects."""
    cells = np.arange(LATTICE // 2, IMAGE_SIZE, LATTICE)  # lattice coordinates, e.g. 8, 24, …, 120
    # A stencil of radius r fits when r + jitter <= c <= S - 1 - r - jitter.
    lo = np.searchsorted(cells, radius_of + LATTICE_JITTER)  # (n,) first usable cell
    hi = np.searchsorted(cells, IMAGE_SIZE - 1 - radius_of - LATTICE_JITTER, side="right")  # (n,) past last
    raw = rng.random((len(radius_of), 24, 2))
    index = lo[:, None, None] + (raw * (hi - lo)[:, None, None]).astype(int)  # (n, 24, 2)
    jitter = rng.integers(-LATTICE_JITTER, LATTICE_JITTER + 1, size=index.shape)
    return cells[index] + jitter


def _place(spec: SplitSpec, rng: np.random.Generator, bias: str = "any") -> list[Placement] | None:
    """Objects with distinct (colour, shape) at non-crowding positions, or None if they don't fit."""
    n = int(rng.integers(spec.n_objects[0], spec.n_objects[1] + 1))
    pairs = _pairs(n, bias, rng)
    size_names = list(SIZES)
    sizes = _weighted(rng, spec.size_weights, n)
    radius_of = np.array([SIZES[size_names[i]] for i in sizes])  # (n,)
    candidates = _candidate_centres(radius_of, rng)  # (n, 24, 2) x, y
    centres = np.zeros((n, 2))  # (n, 2) x, y of the placed objects (first `k` rows valid)
    placements = []
    for k in range(n):
        gap = candidates[k][:, None, :] - centres[None, :k, :]  # (24, k, 2)
        ok = ((gap**2).sum(-1) >= (spec.spacing * (radius_of[k] + radius_of[None, :k])) ** 2).all(axis=1)
        if not ok.any():
            return None
        x, y = candidates[k, int(ok.argmax())]
        colour, shape = pairs[k]
        placements.append(Placement(shape, colour, size_names[sizes[k]], int(y), int(x)))
        centres[k] = x, y
    return placements


def _draw_template(spec: SplitSpec, rng: np.random.Generator) -> Template:
    families = list(spec.family_weights)
    family = families[int(_weighted(rng, tuple(spec.family_weights.values()), 1)[0])]
    choices = [t for t in TEMPLATES if t.family == family and t.held_out == spec.held_out]
    weights = tuple(spec.template_weights.get(t.template_id, 1.0) for t in choices)
    if all(w == 1.0 for w in weights):
        return choices[int(rng.integers(len(choices)))]
    return choices[int(_weighted(rng, weights, 1)[0])]


def template_of(split: str, index: int, seed: int = 0) -> Template:
    """The template `make_sample(split, index, seed)` uses: its first draw, so no scene is built."""
    spec = _spec(split)
    return _draw_template(spec, np.random.default_rng([seed, spec.code, index]))


def make_sample(split: str, index: int, seed: int = 0) -> WorldSample:
    """Sample `index` of `split` under `seed` (a pure function of the three)."""
    spec = _spec(split)
    rng = np.random.default_rng([seed, spec.code, index])
    # The template is drawn once and scenes are redrawn until it applies, so the family
    # mix matches `family_weights` whatever each template's success rate.
    template = _draw_template(spec, rng)
    for _ in range(_MAX_ATTEMPTS):
        placements = _place(spec, rng, template.bias)
        if placements is None:
            continue
        scene = layout(placements)
        if np.any(scene.areas < spec.min_visible * scene.full_areas):
            continue
        objects = scene_objects(placements, scene)
        ref = template.build(objects, rng)
        if ref is None:
            continue
        image = render(placements, scene, rng)  # drawn once, for the accepted scene only
        masks = instance_masks(scene.labels, len(objects))[list(ref.targets)]  # (N_targets, H, W)
        multi = _uses_multi_prompt(spec, template.family, seed, index)
        return WorldSample(f"{split}-{seed}-{index:07d}", split, image, ref.instruction, template.family,
                           template.template_id, ref.targets, tuple(objects), ref.cot, multi, masks)
    raise RuntimeError(f"world: no valid scene for {split} #{index} (seed {seed}) in {_MAX_ATTEMPTS} attempts")


def _uses_multi_prompt(spec: SplitSpec, family: str, seed: int, index: int) -> bool:
    """Whether a sample is asked with the K-slot prompt. The coin has its own generator keyed
    like the sample's, so changing `multi_prompt_share` leaves every image and instruction as it was."""
    if spec.always_multi_prompt or family in ("multi", "no_target"):
        return True
    return bool(np.random.default_rng([seed, spec.code, index, 1]).random() < spec.multi_prompt_share)


def _spec(split: str) -> SplitSpec:
    if split not in SPLITS:
        raise UserError(f"unknown world split {split!r}; choose one of {', '.join(SPLITS)}")
    return SPLITS[split]


def hallucinated_sample(sample: WorldSample, rng: np.random.Generator) -> WorldSample | None:
    """`sample`'s image under a no-target instruction whose chain of thought names an absent
    object as if it were there (`world_language.HALLUCINATIONS`), with no targets: what a
    policy writes when it misses an absence, paired with the truth. For training the head
    to check the named object against the image; None when no builder applies to the scene."""
    ids = list(HALLUCINATIONS)
    first = int(rng.integers(len(ids)))
    for template_id in ids[first:] + ids[:first]:
        ref = HALLUCINATIONS[template_id](sample.objects, rng)
        if ref is not None:
            height, width = sample.image.shape[:2]
            return dataclasses.replace(sample, sample_id=f"{sample.sample_id}-hallucinated",
                                       instruction=ref.instruction, family="no_target", template_id=template_id,
                                       targets=(), cot=ref.cot, multi_prompt=True,
                                       target_masks=np.zeros((0, height, width), dtype=bool))
    return None


def sample_from_id(sample_id: str) -> WorldSample:
    """The sample whose `sample_id` ('<split>-<seed>-<index>') is given, regenerated."""
    try:
        split, seed, index = sample_id.rsplit("-", 2)
        return make_sample(split, int(index), int(seed))
    except ValueError as error:
        raise UserError(f"world: {sample_id!r} is not a world sample id ('<split>-<seed>-<index>'): {error}") from None


def iter_samples(split: str, n: int, seed: int = 0, start: int = 0) -> Iterator[WorldSample]:
    """Samples start .. start+n-1 of `split`, lazily."""
    _spec(split)
    for index in range(start, start + n):
        yield make_sample(split, index, seed)


def generate(split: str, n: int, seed: int = 0) -> list[WorldSample]:
    """The first `n` samples of `split` under `seed`."""
    return list(iter_samples(split, n, seed))


def world_vocabulary() -> list[str]:
    """Every word any instruction or chain of thought of any split can contain, sorted."""
    return vocabulary()


def sample_text(sample: WorldSample) -> str:
    """Instruction followed by the chain of thought: the text `saekit cache` reads per image."""
    return f"{sample.instruction} . {sample.cot}"


def export_jsonl(samples: Sequence[WorldSample], out_dir: str | Path, *, name: str = "data.jsonl") -> Path:
    """Write `images/<sample_id>.png` and a JSONL of {"image", "text", ...} lines for saekit.

    "image" is relative to the JSONL's folder; extra keys (sample_id, split, family,
    instruction, cot) ride along for analyses and are ignored by saekit. The JSONL is
    written to a temporary name and moved into place, so a reader never sees half a file.
    """
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            rel = f"images/{s.sample_id}.png"
            Image.fromarray(s.image).save(out_dir / rel)
            f.write(json.dumps({"image": rel, "text": sample_text(s), "sample_id": s.sample_id,
                                "split": s.split, "family": s.family, "instruction": s.instruction,
                                "cot": s.cot}) + "\n")
    return path


def export_png(samples: Sequence[WorldSample], out_dir: str | Path) -> Path:
    """Write images, one PNG per target mask (`masks/<id>_<k>.png`, 0/255) and `samples.jsonl`
    holding everything else (instruction, family, template, targets, CoT, inventory)."""
    from PIL import Image

    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(exist_ok=True)
    path = out_dir / "samples.jsonl"
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for s in samples:
            Image.fromarray(s.image).save(out_dir / "images" / f"{s.sample_id}.png")
            masks = []
            for k, mask in enumerate(s.target_masks):
                masks.append(f"masks/{s.sample_id}_{k}.png")
                Image.fromarray(mask.astype(np.uint8) * 255).save(out_dir / masks[-1])
            record = s.to_seg_sample().meta | {"sample_id": s.sample_id, "image": f"images/{s.sample_id}.png",
                                               "instruction": s.instruction, "masks": masks}
            f.write(json.dumps(record) + "\n")
    return path
