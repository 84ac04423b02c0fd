"""What a real-scale run (LLaVA-1.5-7B + SAM ViT-H on one 80 GB GPU) turns on, in one place:

- bf16 autocast around the forward passes and losses (`TrainConfig.bf16`, GPU only: on this
  CPU bf16 matmuls are ~300x slower than fp32, so CPU runs stay fp32);
- activation checkpointing of the policy's decoder blocks (`act_checkpointing`, GPU only;
  non-reentrant, so frozen blocks and LoRA adapters backpropagate correctly);
- SAM image embeddings of a frozen (pretrained) encoder computed once and kept on disk,
  keyed by image content and by preset + encoder weights (`SegCompass.use_embedding_cache`,
  `sam_cache`, default OUT/sam_cache); a trained world encoder is never cached;
- LoRA adapters above the SAE layer (`lora_rank`, `segcompass.lora`), set up by the model itself.

docs/memory.md computes what each choice saves.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def uses_gpu_features(device: torch.device) -> bool:
    return device.type == "cuda"


def autocast_context(cfg, device: torch.device):
    """bf16 autocast on a GPU when `cfg.bf16`; a no-op context otherwise."""
    if cfg.bf16 and uses_gpu_features(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model, cfg, device: torch.device, out: Path) -> None:
    """Activation checkpointing (GPU) and the frozen-SAM embedding cache of a training run."""
    if cfg.act_checkpointing and uses_gpu_features(device):
        model.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.sam_path is not None:  # a pretrained SAM: the encoder is frozen, its embeddings never change
        model.use_embedding_cache(cfg.sam_cache or Path(out) / "sam_cache")
