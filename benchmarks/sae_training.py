"""Benchmark: SAE training throughput of saekit vs sae-lens, and early-exit capture.

One process, one environment, the same batches for every trainer (fp32, batch 4096,
d_in 256, apply_b_dec_to_input False, AdamW/Adam, grad clip 1.0, lr 5e-5):

- standard, d_sae 8192, l1 coefficient 5: sae-lens runs its own `SAETrainer.step`
  (forward, autograd backward, clip, optimiser, scheduler, dead-feature bookkeeping);
  saekit runs `SAETrainer.train_step` (hand-written backward into preallocated buffers).
  The machine's fp32 matmul throughput is measured in the same run on a matmul of the
  training shapes ((4096 × 256) @ (256 × 8192)); saekit's achieved fraction counts
  12·d_in·d_sae FLOP per token.
- BatchTopK k=32, d_sae 16384: saekit's sparse decoder path (`saekit.sae.sparse_step`)
  against saekit's standard SAE at the same shape and sae-lens's
  `BatchTopKTrainingSAE` under its `SAETrainer`.

Steps of the trainers being compared are timed round-robin (one step of each in turn),
so a background load that comes and goes weighs on all of them alike; times are medians
over steps. Prints one JSON object with a `targets` map and writes it to
benchmarks/sae_training.json (the numbers of the last run).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

D_IN, D_SAE, BATCH = 256, 8192, 4096
TOPK_D_SAE, TOPK_K = 16384, 32
WARMUP_STEPS, TIMED_STEPS, N_BATCHES = 2, 6, 4
L1, LR = 5.0, 5e-5
RESULT_FILE = Path(__file__).resolve().with_suffix(".json")


def make_batches(seed: int = 0) -> list[torch.Tensor]:
    """Activation-like batches: a sparse mix of 4096 directions plus noise, (BATCH, D_IN)."""
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(4096, D_IN, generator=gen) / D_IN ** 0.5
    batches = []
    for _ in range(N_BATCHES):
        codes = torch.rand(BATCH, 4096, generator=gen).lt_(0.01) * torch.rand(BATCH, 4096, generator=gen)
        batches.append((codes @ directions * 4 + 0.1 * torch.randn(BATCH, D_IN, generator=gen)).contiguous())
    return batches


def round_robin_tokens_per_s(steps: dict, batches: list[torch.Tensor]) -> dict[str, float]:
    """Tokens/s of each named step function, from the median of TIMED_STEPS steps timed
    in turn (one step of each, then the next round)."""
    for i in range(WARMUP_STEPS):
        for step in steps.values():
            step(batches[i % len(batches)])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(TIMED_STEPS):
        for name, step in steps.items():
            started = time.perf_counter()
            step(batches[i % len(batches)])
            times[name].append(time.perf_counter() - started)
    return {name: BATCH / statistics.median(t) for name, t in times.items()}


def matmul_gflops(reps: int = 7) -> float:
    """Median fp32 throughput of (BATCH × D_IN) @ (D_IN × D_SAE) into a preallocated output."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(BATCH, D_IN, generator=gen), torch.randn(D_IN, D_SAE, generator=gen)
    out = torch.empty(BATCH, D_SAE)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - started)
    return 2 * BATCH * D_IN * D_SAE / statistics.median(times) / 1e9


def saekit_step(d_sae: int, architecture: str = "standard"):
    from saekit.sae.config import SAETrainConfig
    from saekit.sae.training import SAETrainer

    cfg = SAETrainConfig(out=Path("unused"), cache=Path("unused"), d_sae=d_sae, batch_size=BATCH,
                         training_tokens=BATCH * 1000, warmup_steps=10, l1_coefficient=L1, lr=LR,
                         architecture=architecture, k=TOPK_K, normalize="none", device="cpu")
    return SAETrainer(cfg, D_IN, torch.device("cpu")).train_step


def sae_lens_step(d_sae: int, architecture: str = "standard"):
    from sae_lens import (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, SAETrainer,
                          StandardTrainingSAE, StandardTrainingSAEConfig)
    from sae_lens.config import SAETrainerConfig

    common = dict(d_in=D_IN, d_sae=d_sae, apply_b_dec_to_input=False, normalize_activations="none",
                  device="cpu", dtype="float32")
    if architecture == "standard":
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=L1, **common))
    else:
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=TOPK_K, **common))
    cfg = SAETrainerConfig(total_training_samples=BATCH * 1000, train_batch_size_samples=BATCH,
                           lr=LR, lr_end=LR * 0.1, lr_scheduler_name="cosineannealing",
                           lr_warm_up_steps=10, device="cpu")
    trainer = SAETrainer(cfg, sae, iter(()))

    def step(batch: torch.Tensor) -> None:
        trainer.step(batch)
        trainer.n_training_steps += 1  # as SAETrainer.fit does after each step

    return step


def early_exit() -> dict | None:
    """The early-exit capture benchmark of benchmarks/capture_early_exit.py, if present.
    Run last: it sets torch's thread count for its own timing."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from capture_early_exit import early_exit_benchmark
    except ImportError:
        return None
    return early_exit_benchmark()


def main() -> None:
    torch.manual_seed(0)
    batches = make_batches()
    peak_before = matmul_gflops()
    standard = round_robin_tokens_per_s({"saekit": saekit_step(D_SAE), "sae_lens": sae_lens_step(D_SAE)},
                                        batches)
    peak = max(peak_before, matmul_gflops())  # the better of two probes: a fair ceiling
    saekit_rate, sae_lens_rate = standard["saekit"], standard["sae_lens"]
    flop_per_token = 12 * D_IN * D_SAE
    fraction = saekit_rate * flop_per_token / (peak * 1e9)
    topk = round_robin_tokens_per_s({
        "batchtopk": saekit_step(TOPK_D_SAE, "batchtopk"), "standard": saekit_step(TOPK_D_SAE),
        "sae_lens_batchtopk": sae_lens_step(TOPK_D_SAE, "batchtopk")}, batches)
    result = {
        "benchmark": "sae_training", "d_in": D_IN, "d_sae": D_SAE, "batch_size": BATCH,
        "threads": torch.get_num_threads(), "timed_steps": TIMED_STEPS,
        "saekit_tokens_per_s": round(saekit_rate, 1), "sae_lens_tokens_per_s": round(sae_lens_rate, 1),
        "speedup_vs_sae_lens": round(saekit_rate / sae_lens_rate, 3),
        "matmul_gflops": round(peak, 2), "saekit_gflops": round(saekit_rate * flop_per_token / 1e9, 2),
        "matmul_fraction": round(fraction, 3),
        "batchtopk": {
            "d_sae": TOPK_D_SAE, "k": TOPK_K,
            "saekit_batchtopk_tokens_per_s": round(topk["batchtopk"], 1),
            "saekit_standard_tokens_per_s": round(topk["standard"], 1),
            "sae_lens_batchtopk_tokens_per_s": round(topk["sae_lens_batchtopk"], 1)},
    }
    targets = {
        "saekit_vs_sae_lens": {"value": result["speedup_vs_sae_lens"], "target": 1.5, "higher_is_better": True},
        "matmul_fraction": {"value": result["matmul_fraction"], "target": 0.6, "higher_is_better": True},
        "batchtopk_vs_saekit_standard": {"value": round(topk["batchtopk"] / topk["standard"], 3),
                                         "target": 2.0, "higher_is_better": True},
        "batchtopk_vs_sae_lens_batchtopk": {"value": round(topk["batchtopk"] / topk["sae_lens_batchtopk"], 3),
                                            "target": 2.0, "higher_is_better": True},
    }
    exit_result = early_exit()
    if exit_result is not None:
        result["early_exit"] = {k: v for k, v in exit_result.items() if k != "targets"}
        targets.update(exit_result.get("targets", {}))  # early_exit_speedup
    result["targets"] = targets
    text = json.dumps(result)
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
