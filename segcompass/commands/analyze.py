"""`segcompass analyze --checkpoint DIR --out DIR [--split val --n 48 ...]`: the interpretability
analyses of a trained checkpoint (Figures 4, 5, 8, causal faithfulness, concept naming) and, with
`--eval DIR`, how an evaluation's masks follow its chains of thought."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from analyses.run_all import AnalysesConfig
    from saekit.argparse_dataclass import add_config_args

    parser.epilog = ("Writes a PNG + CSV/JSON per analysis, names.csv and atom_names.json (the atoms' concept "
                     "names: pass the JSON to `segcompass predict --atom-names`) and summary.json with the "
                     "acceptance numbers. The training log is read from <run>/metrics.jsonl when the "
                     "checkpoint is <run>/final.")
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="SegCompass checkpoint folder (`segcompass train` output, e.g. runs/segcompass/final).")
    parser.add_argument("--out", type=Path, required=True, help="Output folder.")
    parser.add_argument("--eval", type=Path, default=None,
                        help="Also judge this evaluation's predictions (`segcompass eval` output folder) against "
                             "their chains of thought: reasoning_to_mask.* (IoU when the CoT is right / wrong, "
                             "no-target samples by what the CoT concluded).")
    parser.add_argument("--device", default="cpu", help="'auto' (cuda when available), 'cpu', 'cuda', ...")
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")
    add_config_args(parser, AnalysesConfig)


def run(args: argparse.Namespace) -> int:
    import json

    from analyses.run_all import AnalysesConfig, SUMMARY_FILE, run_analyses
    from saekit.argparse_dataclass import config_from_args
    from saekit.models import resolve_device

    summary = run_analyses(args.checkpoint, args.out, config_from_args(AnalysesConfig, args),
                           device=str(resolve_device(args.device)), progress=not args.no_progress)
    print(json.dumps(summary["acceptance"], indent=1))
    if args.eval is not None:
        from analyses.reasoning_to_mask import write_reasoning_report

        print(json.dumps(write_reasoning_report(args.eval, args.out), indent=1))
    print(f"analyze: results in {args.out} (summary: {args.out / SUMMARY_FILE})")
    return 0
