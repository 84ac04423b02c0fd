"""Ground-truth rasterisation and scoring speed; prints one JSON object.

- LISA rasterisation of the voc-labelme fixture shapes (real photo sizes): vectorised
  numpy vs the slow per-pixel port of OpenCV's loops.
- MetricAccumulator on 512x512 masks (masks/s).
- `segcompass score` end to end on world samples exported in the ReasonSeg layout.
Best of three rounds, single thread.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from segcompass.commands.score import score_folders  # noqa: E402
from segcompass.data import rasterize as R  # noqa: E402
from segcompass.world import scenes as world  # noqa: E402
from segcompass.data.export import export_reasonseg  # noqa: E402
from segcompass.data.reasonseg import read_shapes  # noqa: E402
from segcompass.metrics import MetricAccumulator  # noqa: E402

LABELME = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "voc-labelme" / "labelme"
ROUNDS = 3


def best_of(fn) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def raster_times() -> tuple[float, float]:
    jobs = []
    for path in sorted(LABELME.glob("*.json")):
        anno = json.loads(path.read_text())
        for shape in read_shapes(anno, path):
            jobs.append((shape.vertices, anno["imageHeight"], anno["imageWidth"]))
    fast = best_of(lambda: [R.fill_poly_mask(v, h, w) for v, h, w in jobs])
    slow = best_of(lambda: [R.reference_fill_poly(v, h, w) for v, h, w in jobs])
    return fast / len(jobs), slow / len(jobs)


def metric_rate(n: int = 128, size: int = 512) -> float:
    rng = np.random.default_rng(0)
    pred = rng.random((n, size, size)) < 0.3
    gt = rng.random((n, size, size)) < 0.3
    ignore = rng.random((n, size, size)) < 0.05

    def run():
        acc = MetricAccumulator()
        for start in range(0, n, 32):
            acc.add_batch(pred[start:start + 32], gt[start:start + 32], ignore[start:start + 32])
        acc.result()
    return n / best_of(run)


def score_rate(n: int = 200) -> float:
    samples = [world.make_sample(split, i).to_seg_sample()
               for split in ("val", "multi") for i in range(n // 2)]
    with tempfile.TemporaryDirectory() as tmp:
        gt_dir, pred_dir = Path(tmp) / "gt", Path(tmp) / "pred"
        export_reasonseg(samples, gt_dir, image_format="png")
        pred_dir.mkdir()
        rng = np.random.default_rng(0)
        for s in samples:
            pred = s.union_mask ^ (rng.random(s.union_mask.shape) < 0.02)
            Image.fromarray(pred.astype(np.uint8) * 255).save(pred_dir / f"{s.sample_id}.png")
        return n / best_of(lambda: score_folders(gt_dir, pred_dir))


def main() -> None:
    fast, slow = raster_times()
    metrics = metric_rate()
    score = score_rate()
    print(json.dumps({
        "raster_ms_per_shape": {"numpy": round(1e3 * fast, 3), "reference": round(1e3 * slow, 3)},
        "raster_speedup_vs_reference": round(slow / fast, 2),
        "metric_masks_per_s_512": round(metrics, 1),
        "score_samples_per_s_128": round(score, 1),
        "load_average_1min": os.getloadavg()[0],
        "targets": {
            "metric_masks_per_s_512": {"value": round(metrics, 1), "target": 500,
                                       "higher_is_better": True},
            "score_samples_per_s_128": {"value": round(score, 1), "target": 200,
                                        "higher_is_better": True},
        },
    }))


if __name__ == "__main__":
    main()
