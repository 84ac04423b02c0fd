"""Where samples come from: one `--data` syntax for every command, and one item shape that
training, batching and evaluation read, whatever the dataset.

A data spec names a source, optionally with a weight for training mixtures:

    world                 the embedded world (`segcompass.world.scenes`) and its splits
    refcoco:ROOT          RefCOCO   (refer API layout)  unc: train val testA testB; google: train val
    refcoco+:ROOT         RefCOCO+                      unc: train val testA testB
    refcocog:ROOT         RefCOCOg                      umd: train val test; google: train val
    grefcoco:ROOT         gRefCOCO                      train val testA testB
    reasonseg:DIR         ReasonSeg: DIR/<split>/ (train, val, test), or DIR itself when it
                          directly holds <stem>.json + image files (then it is the only split)

    SPEC@WEIGHT           e.g. `--data refcoco:/d/refer@0.7 reasonseg:/d/ReasonSeg@0.3`: each
                          training sample comes from refcoco with probability 0.7 (weights are
                          normalised; a spec without one weighs 1)

The split names are the dataset's own (`refs(<split_by>).p` says which it holds); `split_by`
picks the refs file (`--split-by umd|google|unc`; default: unc, umd for refcocog).

Items. A world sample is the world's own `WorldSample` (it carries its chain of thought);
a dataset sample becomes `Item`s with the same fields and `cot = None`. One item is one
image with ONE instruction: a RefCOCO/+/g or gRefCOCO ref gives one item per sentence (the
field's evaluation scores every expression); ReasonSeg evaluation reads each sample's first
question (LISA's ValDataset), ReasonSeg training every question. Prompt: single-object for
RefCOCO/+/g and ReasonSeg (one target), the K-slot prompt for gRefCOCO (several targets or
none), the world sample's own choice for the world.

Training reads a `TrainStream`: position g (step x batch + j, or a GRPO row) is a pure
function of (specs, seed, g), so a resumed run reads exactly what the uninterrupted one
did. Dataset sources are read in a fresh seeded permutation per epoch; a training item
whose target mask is empty (a ref without a mask) is replaced by the next one and counted
(`TrainStream.skipped_empty`); evaluation keeps such items, as LISA does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from saekit.errors import UserError
from segcompass.data.coco import LazySamples, read_json
from segcompass.data.sample import SegSample

KINDS = ("world", "refcoco", "refcoco+", "refcocog", "grefcoco", "reasonseg")
"""Source kinds a `--data` spec may name."""
SPEC_HELP = "world | refcoco[+|g]:ROOT | grefcoco:ROOT | reasonseg:DIR, each optionally @WEIGHT"


class DataSpec(NamedTuple):
    kind: str
    """One of KINDS."""
    path: Path | None
    """Dataset root (RefCOCO family, gRefCOCO) or folder (ReasonSeg); None for the world."""
    weight: float
    """Relative share of training samples (> 0)."""
    text: str
    """The spec as given (named in errors)."""


def parse_data(text: str) -> DataSpec:
    """`KIND[:PATH][@WEIGHT]` -> DataSpec; a one-line UserError for anything else."""
    body, weight = text, 1.0
    head, at, tail = text.rpartition("@")
    if at:
        try:
            weight, body = float(tail), head
        except ValueError:  # not a number: the '@' belongs to the path
            pass
    kind, colon, path = body.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise UserError(f"--data {text}: unknown source {kind!r}; expected {SPEC_HELP}")
    if kind == "world" and path:
        raise UserError(f"--data {text}: the world takes no folder; write 'world'")
    if kind != "world" and not path:
        raise UserError(f"--data {text}: {kind} needs its folder, e.g. {kind}:/data/{kind}")
    if not (weight > 0 and math.isfinite(weight)):
        raise UserError(f"--data {text}: the weight must be a positive number, got {tail}")
    return DataSpec(kind, Path(path).expanduser() if path else None, weight, text)


def parse_data_list(texts: Sequence[str]) -> list[DataSpec]:
    """Every spec of a `--data` list (at least one)."""
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise UserError(f"--data: give at least one source ({SPEC_HELP})")
    return [parse_data(t) for t in texts]


class Item(NamedTuple):
    """One image with one instruction, from a dataset (the world's `WorldSample` has the same fields)."""

    sample_id: str
    """'<dataset sample id>#<instruction index>', unique within its split."""
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    instruction: str
    multi_prompt: bool
    """Ask with the K-slot prompt (gRefCOCO) rather than the single-object one."""
    target_masks: np.ndarray
    """(N, H, W) bool, N = 0 for a no-target sample."""
    ignore_mask: np.ndarray | None
    """(H, W) bool pixels no metric counts (ReasonSeg's 'ignore' shapes), or None."""
    split: str
    family: str
    """The dataset kind (refcoco, grefcoco, reasonseg, ...)."""
    meta: dict[str, Any]
    """JSON-able source ids (ref_id, sent_id, image_id, ann_ids; or the ReasonSeg json)."""
    cot: str | None = None
    """Ground-truth reasoning: none in a real dataset."""


class SampleLike(Protocol):
    """What training and evaluation read of a sample (an `Item` or a world `WorldSample`)."""

    sample_id: str
    image: np.ndarray
    instruction: str
    multi_prompt: bool
    target_masks: np.ndarray
    split: str
    family: str
    cot: str | None


def ignore_of(sample: SampleLike) -> np.ndarray | None:
    """The sample's ignore mask (world samples have none)."""
    return getattr(sample, "ignore_mask", None)


def has_empty_target(sample: SampleLike) -> bool:
    """A target instance without a single pixel (a ref whose annotation has no mask)."""
    masks = sample.target_masks
    return len(masks) > 0 and not bool(np.asarray(masks).reshape(len(masks), -1).any(axis=1).all())


class WorldSplit:
    """A world split under a seed: an unbounded stream, sample i = `make_sample(split, i, seed)`."""

    kind = "world"
    size: int | None = None

    def __init__(self, split: str, seed: int):
        from segcompass.world.scenes import SPLITS

        if split not in SPLITS:
            raise UserError(f"unknown world split {split!r}; choose one of {', '.join(SPLITS)}")
        self.split, self.seed = split, seed

    def item(self, index: int):
        from segcompass.world.scenes import make_sample

        return make_sample(self.split, int(index), self.seed)


def _coco_meta(sample: SegSample, k: int) -> dict[str, Any]:
    sent_ids = sample.meta.get("sent_ids") or []
    return {"ref_id": sample.meta.get("ref_id"), "sent_id": sent_ids[k] if k < len(sent_ids) else None,
            "image_id": sample.meta.get("image_id"), "ann_ids": list(sample.meta.get("ann_ids", []))}


def _reasonseg_meta(sample: SegSample, k: int) -> dict[str, Any]:
    return {"json": Path(sample.meta["json_path"]).name, "is_sentence": bool(sample.meta.get("is_sentence"))}


class DatasetSplit:
    """One split of a real dataset as a list of items (sample, instruction index), built lazily."""

    def __init__(self, kind: str, samples: LazySamples, split: str, *, multi: bool,
                 counts: Sequence[int], cache_size: int = 8):
        self.kind, self.samples, self.split, self.multi = kind, samples, split, multi
        self.index = [(r, k) for r, n in enumerate(counts) for k in range(n)]
        self.size = len(self.index)
        self._cache: OrderedDict[int, SegSample] = OrderedDict()
        self._cache_size = cache_size
        self._meta = _reasonseg_meta if kind == "reasonseg" else _coco_meta

    def _sample(self, record: int) -> SegSample:
        if record in self._cache:
            self._cache.move_to_end(record)
            return self._cache[record]
        sample = self.samples[record]
        self._cache[record] = sample
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return sample

    def item(self, index: int) -> Item:
        record, k = self.index[int(index)]
        sample = self._sample(record)
        if k >= len(sample.instructions):
            where = sample.meta.get("json_path") or sample.meta.get("refs_file")
            raise UserError(f"{where}: sample {sample.sample_id} has no instruction (field 'text' / 'sentences')")
        return Item(f"{sample.sample_id}#{k}", sample.image, sample.instructions[k], self.multi,
                    sample.target_masks, sample.ignore_mask, self.split, self.kind, self._meta(sample, k))


def reasonseg_folder(root: Path, split: str) -> Path:
    """ROOT/<split> when ROOT has split folders; ROOT itself when it directly holds the jsons."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: ReasonSeg folder not found")
    if (root / split).is_dir():
        return root / split
    present = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.json")))
    if present:
        raise UserError(f"{root}: no ReasonSeg split '{split}'; present: {', '.join(present)}")
    return root


def _reasonseg_counts(records: Sequence[Path], every_question: bool) -> list[int]:
    if not every_question:
        return [1] * len(records)
    counts = []
    for path in records:
        texts = read_json(path).get("text", []) if path.is_file() else []
        counts.append(1 if isinstance(texts, str) else len(texts) if isinstance(texts, list) else 0)
    return counts


def open_split(spec: DataSpec, split: str, *, split_by: str | None = None, seed: int = 0,
               training: bool = False) -> WorldSplit | DatasetSplit:
    """The items of one split of a source. Dataset files are checked up front (refs, instances,
    every image file), so a long run fails at its start or not at all."""
    if spec.kind == "world":
        return WorldSplit(split, seed)
    if not spec.path.exists():
        raise UserError(f"--data {spec.text}: {spec.path} does not exist")
    if spec.kind == "reasonseg":
        from segcompass.data.reasonseg import load_reasonseg

        samples = load_reasonseg(reasonseg_folder(spec.path, split))
        counts = _reasonseg_counts(samples.records, every_question=training)
        return DatasetSplit("reasonseg", samples, split, multi=False, counts=counts)
    if spec.kind == "grefcoco":
        from segcompass.data.grefcoco import load_grefcoco

        samples = load_grefcoco(spec.path, split, split_by or "unc", check_images=True)
        multi = True
    else:
        from segcompass.data.refcoco import load_refcoco

        samples = load_refcoco(spec.path, spec.kind, split_by, split, check_images=True)
        multi = False
    return DatasetSplit(spec.kind, samples, split, multi=multi,
                        counts=[len(ref["sentences"]) for ref in samples.records])


def eval_items(reader: WorldSplit | DatasetSplit, n: int | None) -> Iterator[SampleLike]:
    """The first `n` items of a split (all of a dataset split when n is None)."""
    if reader.size is None and n is None:
        raise ValueError("a world split is unbounded: give n")
    total = reader.size if n is None else n if reader.size is None else min(n, reader.size)
    for index in range(total):
        yield reader.item(index)


class TrainStream:
    """The training samples of a run, position g -> sample (see the module docstring).

    With one source, source position = g (the world alone reads `make_sample('train', g, seed)`,
    as before sources existed). With several, a seeded draw over `total` positions picks the
    source of each, and a source's c-th pick reads its c-th sample.
    """

    def __init__(self, specs: Sequence[DataSpec], *, seed: int, total: int, split_by: str | None = None):
        self.specs, self.seed = list(specs), seed
        self.parts = [open_split(s, "train", split_by=split_by, seed=seed, training=True) for s in self.specs]
        for spec, part in zip(self.specs, self.parts):
            if part.size == 0:
                raise UserError(f"--data {spec.text}: its train split has no sample")
        self.skipped_empty = 0
        """Training reads replaced because a target had no mask (since this process started)."""
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self.choice = self.rank = None
        if len(self.specs) > 1:
            weights = np.array([s.weight for s in self.specs], dtype=np.float64)
            rng = np.random.default_rng([seed, 0x5EED5])
            self.choice = rng.choice(len(weights), size=total, p=weights / weights.sum())  # (total,)
            self.rank = np.empty(total, dtype=np.int64)
            for k in range(len(weights)):
                picked = self.choice == k
                self.rank[picked] = np.arange(int(picked.sum()))

    def __getitem__(self, g: int) -> SampleLike:
        g = int(g)
        k, c = (0, g) if self.choice is None else (int(self.choice[g]), int(self.rank[g]))
        part = self.parts[k]
        if part.size is None:
            return part.item(c)
        for attempt in range(part.size):
            epoch, r = divmod(c + attempt, part.size)
            item = part.item(self._permutation(k, epoch, part.size)[r])
            if not has_empty_target(item):
                return item
            self.skipped_empty += 1
        raise UserError(f"--data {self.specs[k].text}: no training sample has a non-empty target mask")

    def _permutation(self, k: int, epoch: int, n: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            self._perms[key] = np.random.default_rng([self.seed, k, epoch, 0x9E3]).permutation(n)
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return self._perms[key]


def has_chain_of_thought(specs: Sequence[DataSpec]) -> bool:
    """Whether every source's samples carry a ground-truth chain of thought (the world only)."""
    return all(s.kind == "world" for s in specs)
