"""`segcompass predict --checkpoint DIR IMAGE "instruction" [--multi] --out DIR`: one inspectable
prediction: mask.png, overlay.png, heatmap_slot{k}.png, prediction.json and a self-contained report.html.

The output folder is written as a unit (built beside it, then swapped in): it holds one
prediction's files, never a mix of two runs; a folder that already holds files is refused
unless --overwrite, and a failed prediction leaves it as it was."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.predictor import PredictorConfig

    parser.add_argument("image", type=Path, metavar="IMAGE", help="Image file (any format PIL reads).")
    parser.add_argument("instruction", metavar="INSTRUCTION", help="What to segment, in words.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="SegCompass checkpoint folder (`segcompass train` output).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace --out when it already holds files (another prediction's).")
    parser.add_argument("--multi", action="store_true",
                        help="Use the multi-object prompt (several or no targets); default: single object.")
    parser.add_argument("--atom-names", type=Path, default=None,
                        help='JSON object {"atom index": "concept name"} shown next to each atom.')
    parser.add_argument("--device", default="auto", help="'auto' (cuda when available), 'cpu', 'cuda', ...")
    add_config_args(parser, PredictorConfig, skip=("batch_size",))


MAX_ASPECT = 20
"""Longest image side over shortest: past this the model's square resize leaves a sliver."""


def read_image(path: Path):
    """(H, W, 3) uint8 RGB of an image file, or a UserError naming it (missing, a folder,
    unreadable, a decompression bomb, or too elongated to segment)."""
    import numpy as np
    from PIL import Image

    from saekit.errors import UserError

    if not path.is_file():
        raise UserError(f"{path}: {'is a folder, not an image' if path.is_dir() else 'image not found'}")
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max(width, height) > MAX_ASPECT * min(width, height):
                raise UserError(f"{path}: the image is {width}x{height}, its sides differ by more than "
                                f"{MAX_ASPECT}:1; crop it to the region of interest first")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise UserError(f"{path}: refused as a decompression bomb ({err}); downscale it first") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the image ({err})") from None


def read_atom_names(path: Path | None) -> dict[int, str]:
    """{atom: name} from a JSON object whose keys are atom indices."""
    import json

    from saekit.errors import UserError

    if path is None:
        return {}
    try:
        raw = json.loads(path.read_text())
        return {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"--atom-names {path}: expected a JSON object {{\"123\": \"name\"}} ({err})") from None


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from saekit.atomic import atomic_directory, check_output_folder
    from saekit.models import resolve_device
    from segcompass.model import load_segcompass
    from segcompass.predictor import PredictorConfig
    from segcompass.report import predict_report, top_slot

    check_output_folder(args.out, overwrite=args.overwrite)
    config = config_from_args(PredictorConfig, args, batch_size=1)
    image = read_image(args.image)
    names = read_atom_names(args.atom_names)
    model = load_segcompass(args.checkpoint, device=resolve_device(args.device))
    with atomic_directory(args.out) as tmp:
        prediction, _ = predict_report(model, image, args.instruction, tmp, multi=args.multi, atom_names=names,
                                       config=config)
    top = top_slot(prediction)
    confidences = ", ".join(f"{c:.3f}" for c in prediction.confidences)
    print(f"predict: response {prediction.response!r}")
    print(f"  mask {int(prediction.mask.sum())} px; slot confidences [{confidences}]; top slot {top} atoms "
          f"{[a.atom for a in prediction.provenance[top].atoms]}")
    print(f"  report: {args.out / 'report.html'}")
    return 0
