"""`saekit eval`: an SAE's reconstruction, sparsity and downstream loss, as JSON + PNG."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from saekit.sae.evaluate import EvalConfig

    parser.epilog = ("Example: saekit eval runs/sae --cache runs/cache --data data.jsonl. Metrics "
                     "follow sae-lens's evals; explained variance is about the mean.")
    parser.add_argument("sae", type=Path, help="SAE folder (saekit or sae-lens format).")
    add_config_args(parser, EvalConfig, skip=("sae",))
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def _line(name: str, m: dict) -> str:
    return (f"  {name:9s} {m['n_tokens']:8d} tokens  mse {m['mse']:.4g}  explained variance "
            f"{m['explained_variance']:.4f}  l0 {m['l0']:.1f}  dead {m['dead_latents']}")


def run(args: argparse.Namespace) -> int:
    import json

    from saekit.argparse_dataclass import config_from_args
    from saekit.sae.evaluate import EVAL_FILE, EvalConfig, evaluate

    cfg = config_from_args(EvalConfig, args)
    out = evaluate(cfg, progress=not args.no_progress)
    result = json.loads((out / EVAL_FILE).read_text())
    print(f"eval: {out / EVAL_FILE}")
    recon = result.get("reconstruction")
    if recon:
        for name, metrics in recon.items():
            if name != "latents" and isinstance(metrics, dict) and metrics.get("n_tokens"):
                print(_line(name, metrics))
        lat = recon["latents"]
        print(f"  latents: {lat['dead']} dead, {lat['dense']} dense of {lat['d_sae']}")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    for name, split in (result.get("downstream") or {}).get("splits", {}).items():
        print(f"  loss recovered ({name}): {fmt(split['loss_recovered_vs_zero'])} vs zero, "
              f"{fmt(split['loss_recovered_vs_mean'])} vs mean (CE clean {fmt(split['ce_clean'])}, "
              f"sae {fmt(split['ce_sae'])})")
    return 0
