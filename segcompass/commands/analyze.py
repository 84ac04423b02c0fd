"""`segcompass analyze --checkpoint DIR --out DIR [--split val --n 48 ...]`: the interpretability
analyses of a trained checkpoint (Figures 4, 5, 8, causal faithfulness, concept naming) and, with
`--eval DIR`, how an evaluation's masks follow its chains of thought; `--causal` adds the causal suite
(`analyses.causal`) in <out>/causal/."""

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
    parser.add_argument("--causal", action="store_true",
                        help="Also run the causal suite (greedy responses; pathway ablation, conflict test, "
                             "dose-response, concept edit) into <out>/causal/causal.json + CSV/PNG.")
    parser.add_argument("--causal-only", action="store_true", help="Run only the causal suite.")
    parser.add_argument("--causal-splits", nargs="+", default=["testA", "multi"], metavar="S",
                        help="Causal suite: world splits (default: testA multi).")
    parser.add_argument("--causal-samples", type=int, default=200, metavar="N",
                        help="Causal suite: samples per split (world seed --seed) (default: 200).")
    add_config_args(parser, AnalysesConfig)


def run(args: argparse.Namespace) -> int:
    import json

    from analyses.run_all import AnalysesConfig, SUMMARY_FILE, run_analyses
    from saekit.argparse_dataclass import config_from_args
    from saekit.models import resolve_device

    config = config_from_args(AnalysesConfig, args)
    if not args.causal_only:
        summary = run_analyses(args.checkpoint, args.out, config, device=str(resolve_device(args.device)),
                               progress=not args.no_progress)
        print(json.dumps(summary["acceptance"], indent=1))
    if args.causal or args.causal_only:
        from analyses.causal import CAUSAL_DIR, CAUSAL_FILE, run_causal_suite

        record = run_causal_suite(args.checkpoint, args.out / CAUSAL_DIR, splits=args.causal_splits,
                                  n=args.causal_samples, seed=config.seed, device=str(resolve_device(args.device)),
                                  progress=not args.no_progress)
        print(json.dumps(record["acceptance"], indent=1))
        print(f"analyze: causal suite in {args.out / CAUSAL_DIR / CAUSAL_FILE}")
    if args.eval is not None:
        from analyses.reasoning_to_mask import write_reasoning_report

        print(json.dumps(write_reasoning_report(args.eval, args.out), indent=1))
    if not args.causal_only:
        print(f"analyze: results in {args.out} (summary: {args.out / SUMMARY_FILE})")
    return 0
