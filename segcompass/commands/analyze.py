"""`segcompass analyze --checkpoint DIR --out DIR [--split val --n 48 ...]`: the interpretability
analyses of a trained checkpoint (Figures 4, 5, 8, causal faithfulness, concept naming) and, with
`--eval DIR`, how an evaluation's masks follow its chains of thought; `--causal` adds the causal suite
(`analyses.causal`) in <out>/causal/. `--data refcoco:ROOT --split val` (any `segcompass eval` source)
runs what needs no world metadata, the causal suite's pathway ablation, dose-response and variance
explained, and records the world-only studies as skipped (one printed line says which and why)."""

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
    parser.add_argument("--data", default="world", metavar="SOURCE",
                        help="world (default) or a dataset, as `segcompass eval --data`: on a dataset --split runs "
                             "the causal suite's pathway, dose and variance only; the world-only studies are skipped.")
    parser.add_argument("--split-by", default=None, metavar="B", help="RefCOCO-family refs file (unc, umd, google).")
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
    parser.add_argument("--causal-splits", nargs="+", default=None, metavar="S",
                        help="Causal suite: splits (default: testA multi; on a dataset, --split).")
    parser.add_argument("--causal-samples", type=int, default=200, metavar="N",
                        help="Causal suite: samples per split (world seed --seed) (default: 200).")
    add_config_args(parser, AnalysesConfig)


def run(args: argparse.Namespace) -> int:
    import json

    from analyses.run_all import AnalysesConfig, SUMMARY_FILE, run_analyses
    from saekit.argparse_dataclass import config_from_args
    from saekit.models import resolve_device
    from segcompass.data.sources import parse_data

    if parse_data(args.data).kind != "world":
        return run_dataset(args)
    config = config_from_args(AnalysesConfig, args)
    if not args.causal_only:
        summary = run_analyses(args.checkpoint, args.out, config, device=str(resolve_device(args.device)),
                               progress=not args.no_progress)
        print(json.dumps(summary["acceptance"], indent=1))
    if args.causal or args.causal_only:
        from analyses.causal import CAUSAL_DIR, CAUSAL_FILE, DEFAULT_SPLITS, run_causal_suite

        splits = args.causal_splits or DEFAULT_SPLITS
        record = run_causal_suite(args.checkpoint, args.out / CAUSAL_DIR, splits=splits, n=args.causal_samples,
                                  seed=config.seed, device=str(resolve_device(args.device)),
                                  progress=not args.no_progress)
        print(json.dumps(record["acceptance"], indent=1))
        print(f"analyze: causal suite in {args.out / CAUSAL_DIR / CAUSAL_FILE}")
    if args.eval is not None:
        from analyses.reasoning_to_mask import write_reasoning_report

        print(json.dumps(write_reasoning_report(args.eval, args.out), indent=1))
    if not args.causal_only:
        print(f"analyze: results in {args.out} (summary: {args.out / SUMMARY_FILE})")
    return 0


def run_dataset(args: argparse.Namespace) -> int:
    """A dataset source: the causal suite's pathway, dose and variance on --split (or --causal-splits), the
    world-only studies skipped and recorded (summary.json unless --causal-only; causal.json)."""
    import json

    from analyses.causal import CAUSAL_DIR, CAUSAL_FILE, WORLD_ONLY_TESTS, run_causal_suite
    from analyses.run_all import SUMMARY_FILE, WORLD_ONLY_ANALYSES, AnalysesConfig, skipped_summary
    from saekit.errors import UserError
    from saekit.models import resolve_device

    if args.eval is not None:  # it judges chains of thought against the world's ground truth
        raise UserError(f"analyze: --eval needs a world evaluation; --data {args.data} has no ground-truth reasoning")
    skipped = [*([] if args.causal_only else WORLD_ONLY_ANALYSES), *(f"causal {t}" for t in WORLD_ONLY_TESTS)]
    print(f"analyze: --data {args.data}: skipped {', '.join(skipped)} (they need the world's scene metadata: "
          "objects, colours, shapes); running the causal suite's pathway ablation, dose-response and variance")
    splits = args.causal_splits or [getattr(args, "split", AnalysesConfig.split)]  # config flags default to unset
    if not args.causal_only:
        skipped_summary(args.checkpoint, args.out, data=args.data, splits=splits)
    record = run_causal_suite(args.checkpoint, args.out / CAUSAL_DIR, splits=splits, n=args.causal_samples,
                              data=args.data, split_by=args.split_by,
                              device=str(resolve_device(args.device)), progress=not args.no_progress)
    print(json.dumps(record["acceptance"], indent=1))
    print(f"analyze: causal suite in {args.out / CAUSAL_DIR / CAUSAL_FILE}")
    if not args.causal_only:
        print(f"analyze: skipped analyses recorded in {args.out / SUMMARY_FILE}")
    return 0
