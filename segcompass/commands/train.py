"""`segcompass train --policy DIR --sae DIR [--out DIR] [--mode seg]`: supervised SegCompass training."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.training.supervised import TrainConfig

    parser.epilog = ("Writes OUT/checkpoint, OUT/final, OUT/metrics.jsonl (+ grpo_curves.png for GRPO); "
                     "re-running resumes. Defaults follow the paper, but --lr (paper: 2e-6).")
    add_config_args(parser, TrainConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from segcompass.data.sources import parse_data
    from segcompass.model import checkpoint_record
    from segcompass.training.supervised import TrainConfig, train

    cfg = config_from_args(TrainConfig, args)
    final = train(cfg, progress=not args.no_progress)
    print(f"train: checkpoint -> {final}")
    counts = checkpoint_record(final).get("counts") or {}
    if counts.get("self_generated"):
        print(f"  own responses: {counts['self_generated']}, skipped without <REF_POS>: "
              f"{counts.get('skipped_no_ref', 0)}; refs without a mask skipped: {counts.get('skipped_empty_target', 0)}")
    first = parse_data(cfg.data[0])
    data = "" if first.kind == "world" else f" --data {first.kind}:{first.path} --split val"
    print(f"  next: segcompass eval --checkpoint {final}{data} --out {cfg.out}/eval")
    return 0
