"""Early-exit capture vs a full forward pass on a 32-layer tiny LLaVA twin hooked at layer 16.

Same model, same batch, same hooks: `capture(..., early_exit=True)` stops the forward pass
at block 16; `early_exit=False` runs all 32 blocks and the LM head (what a capture through
`output_hidden_states=True` costs). Warm-up, then the median of several repeats.
Prints one JSON object with a `targets` map.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np
import torch
from PIL import Image

from saekit.capture import capture
from saekit.inputs import build_batch
from saekit.tiny import build_tiny_llava

N_LAYERS, LAYER = 32, 16
PROMPTS = ["what is the red circle in the middle of the picture ?", "find the dog",
           "segment all people on the left of the car .", "where is the cat ?"]


def _median_seconds(fns: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median wall time of each function; calls alternate so load changes hit both alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def early_exit_benchmark(hidden_size: int = 128, repeats: int = 9, warmup: int = 2,
                         threads: int = 1) -> dict:
    """Seconds per capture with and without early exit, and the speed-up.

    One thread by default: on a small shared CPU, multi-threaded kernels of this size
    spend their time waiting on each other and the timings scatter by 10x.
    """
    torch.set_num_threads(threads)
    loaded = build_tiny_llava(n_layers=N_LAYERS, hidden_size=hidden_size, n_heads=4, seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in PROMPTS]
    batch = build_batch(loaded, images, PROMPTS)
    # The reference: early exit must not change what is captured.
    early = capture(loaded, batch, [LAYER], early_exit=True).activations[LAYER]
    full = capture(loaded, batch, [LAYER], early_exit=False).activations[LAYER]
    assert torch.equal(early, full), "early exit changed the captured activations"
    seconds = _median_seconds({
        "early": lambda: capture(loaded, batch, [LAYER], early_exit=True),
        "full": lambda: capture(loaded, batch, [LAYER], early_exit=False)}, repeats, warmup)
    t_early, t_full = seconds["early"], seconds["full"]
    speedup = t_full / t_early
    return {
        "benchmark": "capture_early_exit",
        "model": f"tiny-llava twin, {N_LAYERS} layers, d_model {hidden_size}, hooked layer {LAYER}",
        "batch": {"samples": len(PROMPTS), "tokens": int(batch.attention_mask.sum()),
                  "padded_length": int(batch.attention_mask.shape[1])},
        "threads": torch.get_num_threads(),
        "seconds_early_exit": round(t_early, 5),
        "seconds_full_forward": round(t_full, 5),
        "targets": {"early_exit_speedup": {"value": round(speedup, 3), "target": 1.7,
                                           "higher_is_better": True}},
    }


if __name__ == "__main__":
    print(json.dumps(early_exit_benchmark()))
