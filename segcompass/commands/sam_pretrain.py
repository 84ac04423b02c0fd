"""`segcompass sam-pretrain`: train a world SAM preset as a promptable segmenter (SA-1B stand-in)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.world.sam_pretrain import SamPretrainConfig

    parser.epilog = ("Writes OUT/sam (facebook/sam-vit-* layout; pass it to `segcompass train --sam-path`) "
                     "and OUT/pretrain.json. Re-running after an interruption resumes from OUT/checkpoint.")
    add_config_args(parser, SamPretrainConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    import json

    from saekit.argparse_dataclass import config_from_args
    from segcompass.world.sam_pretrain import REPORT_FILE, SamPretrainConfig, pretrain_sam

    cfg = config_from_args(SamPretrainConfig, args)
    sam_dir = pretrain_sam(cfg, progress=not args.no_progress)
    print(f"sam-pretrain: {cfg.preset} -> {sam_dir}")
    report = cfg.out / REPORT_FILE
    if report.is_file():
        print(f"  {json.loads(report.read_text())}")
    return 0
