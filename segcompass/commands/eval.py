"""`segcompass eval --checkpoint DIR [--data SOURCE] [--split ...] [--n N] --out DIR`: greedy
predictions on world or dataset splits (RefCOCO/+/g, gRefCOCO, ReasonSeg), scored with gIoU / cIoU /
N-acc / T-acc (every sample, no-target ones included)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from segcompass.evaluate import EvalConfig
    from segcompass.predictor import PredictorConfig

    parser.epilog = ("Writes OUT/metrics.csv, OUT/metrics.md (markdown table), OUT/metrics.json and "
                     "OUT/predictions.json (COCO RLE of every final mask, with confidences and responses). "
                     "Decoding is greedy, so the same checkpoint always gives the same numbers.")
    add_config_args(parser, EvalConfig)
    parser.add_argument("--split", dest="splits", nargs="+", metavar="S", default=argparse.SUPPRESS,
                        help="Same as --splits.")
    add_config_args(parser, PredictorConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bars.")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from saekit.argparse_dataclass import config_from_args
    from saekit.models import resolve_device
    from saekit.run import apply_threads
    from segcompass.evaluate import EvalConfig, run_evaluation, write_results
    from segcompass.model import load_segcompass
    from segcompass.predictor import PredictorConfig

    cfg = config_from_args(EvalConfig, args)
    predictor_cfg = config_from_args(PredictorConfig, args)
    apply_threads(cfg.threads)
    model = load_segcompass(cfg.checkpoint, device=resolve_device(cfg.device))
    if cfg.sam_cache is not None:
        model.use_embedding_cache(cfg.sam_cache)
    results = run_evaluation(model, cfg.split_names(), cfg.n, cfg.seed, config=predictor_cfg,
                             progress=not args.no_progress, data=cfg.data, split_by=cfg.split_by)
    meta = {"eval": {k: str(v) if not isinstance(v, (int, float, tuple)) else v
                     for k, v in dataclasses.asdict(cfg).items()},
            "predictor": dataclasses.asdict(predictor_cfg)}
    meta["eval"]["splits"] = list(cfg.split_names())
    paths = write_results(cfg.out, results, meta)
    print(paths["metrics.md"].read_text(), end="")
    print(f"eval: results in {cfg.out} ({', '.join(paths)})")
    return 0
