"""Predict latency per image (`segcompass.predictor.Predictor`, batch 1), split into greedy
decoding, the one SegCompass forward pass and post-processing; prints one JSON object.

    python benchmarks/predict.py [--checkpoint runs/segcompass/final]

Without --checkpoint it times a random-weight checkpoint with the embedded world's default
sizes (tiny-llava d_model 128 x 4 blocks, 64 image tokens, SAE 4096 atoms at layer 2, the
world head and sam-tiny-16). A random policy never stops early, so every response runs to
--max-new-tokens: an upper bound on a trained model's decode time. The JSON says which was timed.
Latency = median over repeats x images of the per-image total; the stage medians are listed too.
Single-threaded by default (--threads): on this 2-core machine, shared with other jobs, two
threads made the same calls 3-4x slower (thread hand-offs on ~0.1 ms kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 1.0
"""Predict latency per image on this 2-core CPU, embedded model."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="Trained SegCompass checkpoint folder.")
    parser.add_argument("--images", type=int, default=6, help="World `val` images timed per repeat.")
    parser.add_argument("--repeats", type=int, default=3, help="Timed passes over the images (after a warm-up).")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="Longest response (greedy).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: the embedded model's per-token ops are too small to "
                             "gain from a second thread, and lose badly when the cores are shared); "
                             "0 = torch's default.")
    return parser.parse_args(argv)


def load(checkpoint: Path | None, workdir: Path):
    """(model, description): the given checkpoint, or a random one of the embedded sizes."""
    from segcompass.model import load_segcompass

    if checkpoint is not None:
        return load_segcompass(checkpoint), f"trained checkpoint {checkpoint}"
    sys.path.insert(0, str(REPO / "tests"))
    from segcompass_tiny import build_tiny_checkpoint

    directory = build_tiny_checkpoint(workdir / "checkpoint", policy={}, d_sae=4096, sae_layer=2)
    return load_segcompass(directory), "random-weight checkpoint, embedded world default sizes (untrained)"


def time_images(predictor, samples, repeats: int) -> dict[str, list[float]]:
    """Per-image stage seconds over `repeats` passes (batch 1), after one warm-up image."""
    predictor.predict([samples[0].image], [samples[0].instruction], multi=samples[0].multi_prompt)
    stages = {"total": [], "decode": [], "forward": [], "postprocess": [], "response_tokens": []}
    tokenizer = predictor.model.loaded.tokenizer
    for _ in range(repeats):
        for sample in samples:
            start = time.perf_counter()
            [pred] = predictor.predict([sample.image], [sample.instruction], multi=sample.multi_prompt)
            stages["total"].append(time.perf_counter() - start)
            for name in ("decode", "forward", "postprocess"):
                stages[name].append(getattr(predictor.last_stages, name))
            stages["response_tokens"].append(len(tokenizer(pred.response, add_special_tokens=False)["input_ids"]))
    return stages


def report_seconds(predictor, sample, out: Path) -> float:
    """Time to write the HTML report of one prediction (not part of the predict latency)."""
    from segcompass.report import write_report

    [pred] = predictor.predict([sample.image], [sample.instruction], multi=sample.multi_prompt)
    start = time.perf_counter()
    write_report(out, sample.image, sample.instruction, pred)
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    from segcompass.world.scenes import generate
    from segcompass.predictor import Predictor, PredictorConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, description = load(args.checkpoint, Path(tmp))
        predictor = Predictor(model, PredictorConfig(max_new_tokens=args.max_new_tokens, batch_size=1))
        samples = generate("val", args.images, seed=1)
        stages = time_images(predictor, samples, args.repeats)
        report_s = report_seconds(predictor, samples[0], Path(tmp) / "report")
    median = {k: round(statistics.median(v), 4) for k, v in stages.items()}
    print(json.dumps({
        "checkpoint": description, "device": "cpu", "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2), "images": args.images, "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "median_s": median,
        "p90_total_s": round(sorted(stages["total"])[int(0.9 * (len(stages["total"]) - 1))], 4),
        "report_write_s": round(report_s, 3),
        "targets": {"predict_latency_s_per_image": {"value": median["total"], "target": TARGET_S,
                                                    "higher_is_better": False}},
    }))


if __name__ == "__main__":
    main()
