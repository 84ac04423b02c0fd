"""`segcompass world`: generate samples of the embedded world and export them."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("jsonl", "png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from segcompass.world.scenes import SPLITS

    parser.add_argument("--split", choices=list(SPLITS), default="train", help="World split (default: train).")
    parser.add_argument("--n", type=int, default=1000, help="Number of samples (default: 1000).")
    parser.add_argument("--seed", type=int, default=0, help="World seed (default: 0).")
    parser.add_argument("--start", type=int, default=0, help="Index of the first sample (default: 0).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--format", choices=FORMATS, default="jsonl",
                        help="jsonl: images + data.jsonl of {image, text} for `saekit cache/train`; "
                             "png: images + target mask PNGs + samples.jsonl with every annotation "
                             "(default: jsonl).")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from saekit.errors import UserError
    from segcompass.world.scenes import export_jsonl, export_png, iter_samples

    if args.n < 1 or args.start < 0:
        raise UserError(f"world: --n must be >= 1 and --start >= 0 (got {args.n}, {args.start})")
    samples = list(tqdm(iter_samples(args.split, args.n, args.seed, args.start), total=args.n,
                        desc=f"world {args.split}", disable=args.no_progress))
    path = (export_jsonl if args.format == "jsonl" else export_png)(samples, args.out)
    families: dict[str, int] = {}
    for sample in samples:
        families[sample.family] = families.get(sample.family, 0) + 1
    print(f"world: {len(samples)} {args.split} samples (seed {args.seed}) -> {path}")
    print("  families: " + ", ".join(f"{k} {v}" for k, v in sorted(families.items())))
    return 0
