"""`saekit train`: train a sparse autoencoder on one layer, from a cache or captured on the fly."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from saekit.sae.config import SAETrainConfig

    parser.epilog = (
        "Example: saekit train --cache runs/cache --architecture batchtopk --k 64 --out runs/sae. "
        "Writes an sae-lens folder (SAE.load_from_disk); re-running resumes.")
    add_config_args(parser, SAETrainConfig)
    parser.add_argument("--no-progress", action="store_true",
                        help="Hide the progress bar and status messages.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from saekit.sae.config import SAETrainConfig
    from saekit.sae.data import training_data
    from saekit.sae.io import read_sae_info
    from saekit.sae.training import train_sae

    cfg = config_from_args(SAETrainConfig, args)
    out = train_sae(cfg, training_data(cfg), progress=not args.no_progress)
    info = read_sae_info(out)
    final = info["training"].get("final_metrics") or {}
    metrics = ", ".join(f"{k} {final[k]:.4g}" for k in ("mse", "fvu", "l0", "dead_fraction")
                        if isinstance(final.get(k), (int, float)))
    print(f"sae: {out}")
    print(f"  {info['architecture']} d_in {info['d_in']} -> d_sae {info['d_sae']}, "
          f"{info['layer'].get('transformer_lens_hook')} of {info['model'].get('name')}, "
          f"{info['training']['tokens']} tokens")
    print(f"  final: {metrics or 'n/a'}")
    return 0
