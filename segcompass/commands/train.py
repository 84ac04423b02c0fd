"""`segcompass train --policy DIR --sae DIR [--out DIR] [--mode seg]`: supervised SegCompass training."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.training.supervised import TrainConfig

    parser.epilog = ("Writes OUT/checkpoint, OUT/final (for eval, predict) and OUT/metrics.jsonl; "
                     "re-running resumes. The paper: lr 2e-6 (7B), lr multipliers x25 codebook, x80 slot "
                     "mapper, x10 decoder; G 8, beta 0.2, clip 0.2, w_format 0.3, w_mask 0.7.")
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
