"""`segcompass demo`: the embedded pipeline end to end (see segcompass.experiments.demo)."""

from __future__ import annotations

import argparse

from saekit.argparse_dataclass import add_config_args, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from segcompass.experiments.demo import DemoConfig

    add_config_args(parser, DemoConfig)


def run(args: argparse.Namespace) -> int:
    from segcompass.experiments.demo import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0
