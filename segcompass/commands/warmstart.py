"""`segcompass warmstart`: train the tiny policy on the world's chain of thought by teacher forcing."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.world.warmstart import QUICK_OVERRIDES, WarmstartConfig

    quick = ", ".join(f"{k}={v}" for k, v in QUICK_OVERRIDES.items())
    parser.epilog = (f"--quick: {quick}. Re-running after an interruption resumes, to the same "
                     "weights.")
    add_config_args(parser, WarmstartConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from segcompass.world.warmstart import WarmstartConfig, train

    cfg = config_from_args(WarmstartConfig, args)
    result = train(cfg, progress=not args.no_progress)
    print(f"warmstart: policy -> {result.model_dir} ({result.wall_s:.0f} s)")
    report = result.eval
    if report:
        print(f"  greedy on {report['split']} ({report['n']} samples): format-valid "
              f"{100 * report['format_valid']:.1f}%, single-target correct "
              f"{100 * report['single_target_correct']:.1f}%")
        for name, group in report["groups"].items():
            if name.startswith("family/"):
                print(f"    {name[7:]:<10} n={group['n']:<4} format {100 * group['format_valid']:5.1f}%  "
                      f"target {100 * group['target_correct']:5.1f}%")
    return 0
