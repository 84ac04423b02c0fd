"""World generation throughput (samples/s) per split; prints one JSON object.

Single thread, best of three rounds per split, timed two ways: wall clock, and this
process's CPU time. On a shared machine other processes only ever slow a round down, and
CPU time is what one core delivers when it is not taken away, so the target is judged
on CPU time and the wall-clock numbers and the load average are reported beside it.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

from segcompass.world.scenes import SPLITS, generate  # noqa: E402

N_SAMPLES = 1000
ROUNDS = 3


def throughput(split: str) -> tuple[float, float]:
    """(samples per wall second, samples per CPU second), best of ROUNDS."""
    best_wall = best_cpu = float("inf")
    for round_index in range(ROUNDS):
        wall, cpu = time.perf_counter(), time.process_time()
        generate(split, N_SAMPLES, seed=round_index)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return N_SAMPLES / best_wall, N_SAMPLES / best_cpu


def main() -> None:
    load_before = os.getloadavg()[0]
    rates = {split: throughput(split) for split in SPLITS}
    slowest = min(cpu for _, cpu in rates.values())
    print(json.dumps({
        "samples_per_wall_s": {k: round(v[0], 1) for k, v in rates.items()},
        "samples_per_cpu_s": {k: round(v[1], 1) for k, v in rates.items()},
        "load_average_1min": [load_before, os.getloadavg()[0]],
        "targets": {"world_samples_per_cpu_s_slowest_split": {"value": round(slowest, 1), "target": 1000,
                                                               "higher_is_better": True}},
    }))


if __name__ == "__main__":
    main()
