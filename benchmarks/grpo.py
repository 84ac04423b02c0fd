"""GRPO + segmentation step cost on the embedded world (mode rl+seg, default sizes); prints one JSON object.

    python benchmarks/grpo.py [POLICY_DIR SAE_DIR]

Without arguments a random policy of the warm start's default size and a random SAE are
built in-process; a random policy never writes an end token, so every rollout runs to
max_new_tokens (a pessimistic bound). Pass a warm-started policy and its SAE for the real
cost. Single thread; the target is judged on this process's CPU time per optimizer step
(other processes on a shared machine only stretch the wall clock), projected to the default
number of steps; wall clock and the load average are reported beside it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

WARMUP_STEPS, TIMED_STEPS = 1, 4
TARGET_MINUTES = 20.0


def random_parts(root: Path) -> tuple[Path, Path]:
    """A random default-size tiny-llava policy and a random SAE (d_sae 4096) on its layer 2."""
    from saekit.models import save_pretrained
    from saekit.sae.io import save_sae
    from saekit.sae.model import SparseAutoencoder
    from segcompass.world.warmstart import WarmstartConfig, build_policy

    loaded = build_policy(WarmstartConfig())
    save_pretrained(loaded, root / "policy")
    sae = SparseAutoencoder(d_in=loaded.preset.d_model, d_sae=4096)
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.3)
        sae.W_dec.copy_(torch.nn.functional.normalize(sae.W_enc.T, dim=1))
    save_sae(sae, root / "sae", metadata={"model_name": "tiny-llava", "hook_name": "blocks.1.hook_resid_post"},
             info={"layer": 2, "note": "random, for benchmarks"})
    return root / "policy", root / "sae"


def run(policy: Path, sae: Path, out: Path, steps: int) -> tuple[float, float]:
    """(wall s, CPU s) of `steps` rl+seg optimizer steps after the model is built."""
    from segcompass.training.supervised import TrainConfig, train

    cfg = TrainConfig(policy=policy, sae=sae, out=out, mode="rl+seg", steps=steps, threads=1, device="cpu",
                      log_every=1, checkpoint_every=10_000, resume=False)
    wall, cpu = time.perf_counter(), time.process_time()
    train(cfg, progress=False)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    from segcompass.training.supervised import TrainConfig

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        policy, sae = (Path(sys.argv[1]), Path(sys.argv[2])) if len(sys.argv) == 3 else random_parts(root)
        short = run(policy, sae, root / "short", WARMUP_STEPS)  # fixed costs: build, save, first step
        long = run(policy, sae, root / "long", WARMUP_STEPS + TIMED_STEPS)
    wall_step = (long[0] - short[0]) / TIMED_STEPS
    cpu_step = (long[1] - short[1]) / TIMED_STEPS
    default = TrainConfig(policy=policy, sae=sae, mode="rl+seg")
    minutes = default.steps * cpu_step / 60
    print(json.dumps({
        "policy": "given" if len(sys.argv) == 3 else "random (every rollout max length)",
        "rollouts_per_step": default.rl_prompts * default.group_size,
        "step_wall_s": round(wall_step, 3), "step_cpu_s": round(cpu_step, 3),
        "default_steps": default.steps, "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "targets": {"default_rl_seg_training_minutes": {"value": round(minutes, 2), "target": TARGET_MINUTES,
                                                         "higher_is_better": False}},
    }))


if __name__ == "__main__":
    main()
