"""`segcompass ablate --study modes|reward|group-size|backbone --policy DIR --sae DIR`: the paper's
ablations (Table 4 / Table 6 / Figure 6 / Table 5) on the embedded world at a fixed budget."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.experiments.ablate import AblateConfig

    parser.epilog = ("Writes OUT/STUDY/results.csv and results.md, and one resumable training folder per run; "
                     "re-running the same command skips finished runs and resumes an interrupted one.")
    add_config_args(parser, AblateConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from segcompass.experiments.ablate import AblateConfig, run_study

    cfg = config_from_args(AblateConfig, args)
    folder = run_study(cfg, progress=not args.no_progress)
    print((folder / "results.md").read_text())
    print(f"ablate: {folder / 'results.csv'}")
    return 0
