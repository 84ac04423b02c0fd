"""Build each training step's batch ahead of the optimizer, in worker processes.

On a GPU the warm start's step is mostly rendering world images and tokenising on one
CPU thread while the GPU waits. The batches are a pure function of the
step index (`warmstart.step_examples`, `vision_pretrain`'s sample ranges), so workers can
build steps k+1, k+2, ... while step k trains, and the result is the same batch for the
same step whatever the number of workers: training and resume stay exact
(tests/segcompass/world/test_prefetch.py checks batches and trained weights against the
inline path).
"""

from __future__ import annotations

import multiprocessing
from typing import Callable, Iterator, TypeVar

import torch

Batch = TypeVar("Batch")


class _StepRange(torch.utils.data.Dataset):
    """Item i = build(first + i)."""

    def __init__(self, build: Callable[[int], Batch], first: int, end: int):
        self.build, self.first, self.end = build, first, end

    def __len__(self) -> int:
        return self.end - self.first

    def __getitem__(self, i: int) -> Batch:
        return self.build(self.first + i)


def _as_is(batch):
    return batch


def resolve_workers(workers: int, device: torch.device) -> int:
    """-1 = auto: 4 on CUDA, else 0 (on CPU the workers would take cores from the forward pass;
    elsewhere, e.g. macOS with MPS, forking a process that runs the accelerator is unsafe)."""
    if workers < -1:
        raise ValueError(f"data workers must be >= -1 (-1 = auto), got {workers}")
    if workers == -1:
        return 4 if device.type == "cuda" else 0
    return workers


def step_batches(build: Callable[[int], Batch], first: int, end: int, workers: int = 0) -> Iterator[Batch]:
    """build(step) for step in [first, end), in order; with `workers` > 0 computed that many
    processes ahead (forked, so `build` may close over models and tokenizers it only reads)."""
    if workers == 0:
        return (build(step) for step in range(first, end))
    # fork: the children inherit `build` instead of unpickling it; they never touch CUDA.
    context = multiprocessing.get_context("fork")
    loader = torch.utils.data.DataLoader(_StepRange(build, first, end), batch_size=None, shuffle=False,
                                         num_workers=workers, prefetch_factor=4, collate_fn=_as_is,
                                         multiprocessing_context=context, persistent_workers=False)
    return iter(loader)
