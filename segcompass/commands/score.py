"""`segcompass score GT_DIR PRED_DIR [--json]`: score any model's masks on a ReasonSeg-layout split.

GT_DIR holds `<stem>.json` (LabelMe-style, ReasonSeg) + `<stem>.jpg|png`; its ground truth
is drawn exactly as LISA draws it. PRED_DIR holds `<stem>.png` masks, any non-zero pixel
foreground (RGB: any channel; the alpha of RGBA/LA is not read); a missing prediction
is an empty mask, but a PRED_DIR with no prediction for any sample is refused (a wrong
folder, most likely) unless --allow-empty. Prints gIoU, cIoU, N-acc, T-acc and the sample counts.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from saekit.errors import UserError
from segcompass.metrics import SplitScores


class FolderScores(NamedTuple):
    scores: SplitScores
    n_missing: int
    """GT samples with no `<stem>.png` in PRED_DIR (scored as empty predictions)."""
    unmatched: list[str]
    """Prediction stems with no ground truth (not scored)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gt_dir", type=Path, metavar="GT_DIR",
                        help="ReasonSeg-layout folder: <stem>.json + <stem>.jpg|png.")
    parser.add_argument("pred_dir", type=Path, metavar="PRED_DIR",
                        help="Folder of <stem>.png predicted masks (non-zero = foreground).")
    parser.add_argument("--json", action="store_true",
                        help="Print one JSON object (fractions, null where undefined) "
                             "instead of a table.")
    parser.add_argument("--allow-empty", action="store_true",
                        help="Score even when PRED_DIR holds no prediction at all (all empty masks).")


def read_prediction(path: Path) -> np.ndarray:
    """(H, W) bool foreground of a predicted mask image."""
    try:
        with Image.open(path) as im:
            if im.mode == "RGBA":
                im = im.convert("RGB")
            elif im.mode in ("LA", "PA"):  # the grey level / palette index, not the alpha
                im = im.getchannel(0)
            arr = np.asarray(im)
    except (OSError, Image.DecompressionBombError) as err:
        raise UserError(f"{path}: cannot read the predicted mask ({err})") from None
    return arr.any(axis=2) if arr.ndim == 3 else arr != 0


def score_folders(gt_dir: Path, pred_dir: Path, *, allow_empty: bool = True) -> FolderScores:
    """Score PRED_DIR against GT_DIR; `allow_empty` False refuses a PRED_DIR that holds no
    prediction for any sample."""
    from tqdm import tqdm

    from segcompass.data.reasonseg import find_image, image_size, list_samples, read_truth
    from segcompass.metrics import MetricAccumulator

    if not pred_dir.is_dir():
        what = "is a file, not a folder" if pred_dir.exists() else "prediction folder not found"
        raise UserError(f"{pred_dir}: {what}")
    json_paths = list_samples(gt_dir)
    if not allow_empty and not any((pred_dir / f"{p.stem}.png").is_file() for p in json_paths):
        raise UserError(f"{pred_dir}: holds no prediction for any of the {len(json_paths)} sample(s) of "
                        f"{gt_dir} (e.g. {json_paths[0].stem}.png); check the folder, or pass "
                        "--allow-empty to score every sample as an empty mask")
    acc, n_missing = MetricAccumulator(), 0
    for json_path in tqdm(json_paths, desc="scoring", unit="sample", disable=None):
        height, width = image_size(find_image(json_path))
        truth = read_truth(json_path, height, width)
        pred_path = pred_dir / f"{json_path.stem}.png"
        if pred_path.is_file():
            pred = read_prediction(pred_path)
            if pred.shape != (height, width):
                raise UserError(f"{pred_path}: mask is {pred.shape[1]}x{pred.shape[0]} but its "
                                f"image is {width}x{height}")
        else:
            n_missing += 1
            pred = np.zeros((height, width), dtype=bool)
        acc.add(pred, truth.target, truth.ignore)
    stems = {p.stem for p in json_paths}
    unmatched = sorted(p.stem for p in pred_dir.glob("*.png") if p.stem not in stems)
    return FolderScores(acc.result(), n_missing, unmatched)


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.2f}"


def run(args: argparse.Namespace) -> int:
    result = score_folders(Path(args.gt_dir), Path(args.pred_dir), allow_empty=args.allow_empty)
    s = result.scores
    if args.json:
        out = dict(s.as_dict(), missing_predictions=result.n_missing,
                   unmatched_predictions=len(result.unmatched))
        print(json.dumps(out))
        return 0
    rows = [("gIoU (%)", _pct(s.giou)), ("cIoU (%)", _pct(s.ciou)),
            ("N-acc (%)", _pct(s.n_acc)), ("T-acc (%)", _pct(s.t_acc)),
            ("samples", str(s.n_samples)), ("no-target", str(s.n_no_target)),
            ("missing predictions", str(result.n_missing))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>8}")
    if result.unmatched:
        print(f"note: {len(result.unmatched)} prediction(s) without ground truth were not "
              f"scored (e.g. {result.unmatched[0]}.png)")
    return 0
