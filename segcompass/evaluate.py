"""`segcompass eval`: greedy predictions on world or dataset splits, scored with gIoU / cIoU /
N-acc / T-acc.

Samples come from `segcompass.data.sources` (`--data world`, `refcoco:ROOT`, `grefcoco:ROOT`,
`reasonseg:DIR`, ...): every expression of a RefCOCO/+/g or gRefCOCO split and the first
question of each ReasonSeg sample is one scored sample, as LISA and GRES count them;
ReasonSeg's ignore pixels are left out of every metric. The field's headline numbers:
ReasonSeg gIoU + cIoU, RefCOCO/+/g cIoU, gRefCOCO gIoU + cIoU + N-acc + T-acc; all four are
always written. Every sample is scored, no-target ones included (upstream skipped them and
never computed gIoU or cIoU). Output folder:

    metrics.csv        one row per split: split, giou, ciou, n_acc, t_acc, n_samples, n_no_target
    metrics.md         the same as a markdown table, in percent
    metrics.json       {"splits": {split: SplitScores.as_dict()}, "meta": {...}}
    predictions.json   one record per sample: sample_id, split, family, rle (COCO RLE of the
                       final mask, counts as str), confidences, selected slots, response
                       (+ source: ref_id / sent_id / image_id / ann_ids, or the ReasonSeg json)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saekit.atomic import atomic_write_text
from saekit.errors import UserError
from segcompass.metrics import MetricAccumulator, SplitScores

DEFAULT_SPLITS = ("testA", "testB", "multi", "reason", "val")
DEFAULT_SEED = 1
"""World seed of evaluation samples (training draws `train` samples; every split has its own
stream, so any seed is held out; 1 matches `policy_eval`)."""
DEFAULT_WORLD_N = 200
"""Samples per world split when `n` is not given (a dataset split is read whole)."""
METRIC_COLUMNS = ("giou", "ciou", "n_acc", "t_acc")
FILES = ("metrics.csv", "metrics.md", "metrics.json", "predictions.json")


@dataclass(frozen=True)
class EvalConfig:
    """Which checkpoint is evaluated on which splits of which source, and where the results go."""

    checkpoint: Path
    """SegCompass checkpoint folder (`segcompass train` output, e.g. runs/segcompass/final)."""
    data: str = "world"
    """Source: world, refcoco[+|g]:ROOT, grefcoco:ROOT or reasonseg:DIR (docs/real-data.md)."""
    splits: tuple[str, ...] = ()
    """Splits (also --split), the world's or the dataset's own; default: testA testB multi reason val / val."""
    split_by: str | None = None
    """RefCOCO-family refs file: unc, umd or google (default: unc; umd for refcocog)."""
    n: int | None = None
    """Samples per split, the first n (default: 200 of a world split, all of a dataset's)."""
    seed: int = DEFAULT_SEED
    """World seed of the evaluation samples."""
    out: Path = Path("runs/eval")
    """Output folder: metrics.csv, metrics.md, metrics.json, predictions.json."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', ..."""
    threads: int = 0
    """torch CPU threads; 0 = all cores."""
    sam_cache: Path | None = None
    """Folder caching a frozen SAM encoder's image embeddings (computed once per image)."""

    def __post_init__(self) -> None:
        from segcompass.data.sources import parse_data
        from segcompass.world.scenes import SPLITS

        spec = parse_data(self.data)
        if spec.weight != 1.0:
            raise UserError(f"eval: --data {self.data}: a weight is for training mixtures")
        if spec.kind == "world" and (unknown := [s for s in self.splits if s not in SPLITS]):
            raise UserError(f"eval: unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
        if self.n is not None and self.n < 1:
            raise UserError(f"eval: --n must be >= 1, got {self.n}")

    def split_names(self) -> tuple[str, ...]:
        """The splits to evaluate: as given, else the world's five test splits or a dataset's val."""
        if self.splits:
            return self.splits
        return DEFAULT_SPLITS if self.data.strip().lower() == "world" else ("val",)


class SplitResult(NamedTuple):
    scores: SplitScores
    """gIoU, cIoU, N-acc, T-acc and counts of the split."""
    records: list[dict[str, Any]]
    """One prediction record per sample (see `prediction_record`)."""


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) bool -> COCO RLE {"size": [H, W], "counts": str} (pycocotools, JSON-able)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (counts as str or bytes) -> (H, W) bool."""
    from pycocotools import mask as mask_utils

    counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
    with warnings.catch_warnings():  # pycocotools' own numpy-2 `__array__(copy=...)` deprecation
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode({"size": list(rle["size"]), "counts": counts}).astype(bool)


def prediction_record(sample, prediction) -> dict[str, Any]:
    """The JSON record of one sample's prediction (a world sample or a dataset item)."""
    record = {"sample_id": sample.sample_id, "split": sample.split, "family": sample.family,
              "instruction": sample.instruction, "n_targets": len(sample.target_masks),
              "rle": encode_rle(prediction.mask),
              "confidences": [round(float(c), 6) for c in prediction.confidences],
              "selected": [int(k) for k in np.flatnonzero(prediction.selected)],
              "format_valid": bool(prediction.parsed.is_valid), "response": prediction.response}
    if getattr(sample, "meta", None) is not None and sample.family in ("refcoco", "refcoco+", "refcocog",
                                                                        "grefcoco", "reasonseg"):
        record["source"] = sample.meta
    return record


def evaluate_split(predictor, split: str, n: int | None = None, seed: int = DEFAULT_SEED, *,
                   progress: bool = False, data: str = "world", split_by: str | None = None) -> SplitResult:
    """Predict the first `n` samples of `split` of source `data` (all of a dataset split when n is
    None, 200 of a world split) and score them; world samples are drawn under `seed`."""
    from tqdm.auto import tqdm

    from segcompass.data.sources import eval_items, ignore_of, open_split, parse_data

    reader = open_split(parse_data(data), split, split_by=split_by, seed=seed)
    if reader.size is None and n is None:
        n = DEFAULT_WORLD_N
    total = reader.size if n is None else n if reader.size is None else min(n, reader.size)
    accumulator, records = MetricAccumulator(), []
    samples = eval_items(reader, total)
    with tqdm(total=total, desc=f"eval {split}", unit="sample", disable=not progress) as bar:
        while chunk := [s for _, s in zip(range(predictor.batch_size), samples)]:
            predictions = predictor.predict([s.image for s in chunk], [s.instruction for s in chunk],
                                            multi=[s.multi_prompt for s in chunk])
            for sample, prediction in zip(chunk, predictions):
                accumulator.add(prediction.mask, sample.target_masks, ignore_of(sample))
                records.append(prediction_record(sample, prediction))
            bar.update(len(chunk))
    return SplitResult(accumulator.result(), records)


def run_evaluation(model, splits: Sequence[str] = DEFAULT_SPLITS, n: int | None = DEFAULT_WORLD_N,
                   seed: int = DEFAULT_SEED, *, config=None, progress: bool = False, data: str = "world",
                   split_by: str | None = None) -> dict[str, SplitResult]:
    """Scores and prediction records of every split of source `data` (`config`: a `PredictorConfig`)."""
    from segcompass.predictor import Predictor

    predictor = Predictor(model, config)
    return {split: evaluate_split(predictor, split, n, seed, progress=progress, data=data, split_by=split_by)
            for split in splits}


def evaluate(model, splits: Sequence[str] = DEFAULT_SPLITS, n: int = 200, seed: int = DEFAULT_SEED, *,
             config=None, progress: bool = False) -> dict[str, SplitScores]:
    """gIoU / cIoU / N-acc / T-acc of greedy predictions on `n` samples of each world split
    (`config`: a `segcompass.predictor.PredictorConfig`, default thresholds and lengths)."""
    results = run_evaluation(model, splits, n, seed, config=config, progress=progress)
    return {split: result.scores for split, result in results.items()}


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def metrics_table(scores: dict[str, SplitScores]) -> str:
    """Markdown table, metrics in percent (n/a where a split has no sample of the kind)."""
    lines = ["| split | gIoU | cIoU | N-acc | T-acc | samples | no-target |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for split, s in scores.items():
        lines.append(f"| {split} | {_percent(s.giou)} | {_percent(s.ciou)} | {_percent(s.n_acc)} | "
                     f"{_percent(s.t_acc)} | {s.n_samples} | {s.n_no_target} |")
    return "\n".join(lines) + "\n"


def metrics_csv(scores: dict[str, SplitScores]) -> str:
    """CSV with one row per split; undefined metrics are empty cells."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["split", *METRIC_COLUMNS, "n_samples", "n_no_target"])
    for split, s in scores.items():
        writer.writerow([split, *("" if math.isnan(getattr(s, c)) else f"{getattr(s, c):.6f}"
                                  for c in METRIC_COLUMNS), s.n_samples, s.n_no_target])
    return buffer.getvalue()


def write_results(out: str | Path, results: dict[str, SplitResult], meta: dict[str, Any] | None = None
                  ) -> dict[str, Path]:
    """Write the four files of the module docstring to `out`; returns name -> path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores = {split: r.scores for split, r in results.items()}
    texts = {
        "metrics.csv": metrics_csv(scores),
        "metrics.md": metrics_table(scores),
        "metrics.json": json.dumps({"splits": {k: s.as_dict() for k, s in scores.items()}, "meta": meta or {}},
                                   indent=2) + "\n",
        "predictions.json": json.dumps([rec for r in results.values() for rec in r.records]) + "\n",
    }
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    return {name: out / name for name in FILES}


def evaluate_to_dir(checkpoint, splits: Sequence[str] = DEFAULT_SPLITS, n: int = 200, out: str | Path = "runs/eval",
                    *, seed: int = DEFAULT_SEED, config=None, progress: bool = True) -> dict[str, SplitScores]:
    """Evaluate `checkpoint` (a folder or a loaded SegCompass) and write the four result files to `out`."""
    from segcompass.model import load_segcompass

    model = load_segcompass(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    results = run_evaluation(model, splits, n, seed, config=config, progress=progress)
    meta = {"checkpoint": str(checkpoint) if isinstance(checkpoint, (str, Path)) else None, "n": n, "seed": seed,
            "splits": list(splits), "predictor": dataclasses.asdict(config) if config is not None else None}
    write_results(out, results, meta)
    return {split: result.scores for split, result in results.items()}
