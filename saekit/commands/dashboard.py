"""`saekit dashboard`: a static HTML browser of an SAE's atoms over image-text data."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from saekit.dashboard.config import DashboardConfig

    parser.epilog = ("Example: saekit dashboard runs/sae --data runs/cache --out runs/dash; open "
                     "runs/dash/index.html. Every page is self-contained (images inline).")
    parser.add_argument("sae", type=Path, help="SAE folder (saekit or sae-lens format).")
    add_config_args(parser, DashboardConfig, skip=("sae",))
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from saekit.dashboard.build import build_dashboard
    from saekit.dashboard.config import DashboardConfig

    cfg = config_from_args(DashboardConfig, args)
    summary = build_dashboard(cfg, progress=not args.no_progress)
    print(f"dashboard: {summary.out / 'index.html'}")
    print(f"  {summary.n_atoms} atoms ({summary.n_live} fire) over {summary.n_tokens} tokens of "
          f"{summary.n_samples} samples; {summary.n_pages} atom pages")
    return 0
