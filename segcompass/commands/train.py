"""`segcompass train --policy DIR --sae DIR [--out DIR] [--mode seg]`: supervised SegCompass training."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.training.supervised import TrainConfig

    parser.epilog = ("Writes OUT/checkpoint (resumable), OUT/final (the checkpoint `segcompass eval` and "
                     "`segcompass predict` read) and OUT/metrics.jsonl. Re-running the same command after "
                     "an interruption resumes from OUT/checkpoint.")
    add_config_args(parser, TrainConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from segcompass.training.supervised import TrainConfig, train

    cfg = config_from_args(TrainConfig, args)
    final = train(cfg, progress=not args.no_progress)
    print(f"train: checkpoint -> {final}")
    print(f"  next: segcompass eval --checkpoint {final} --out {cfg.out}/eval")
    return 0
