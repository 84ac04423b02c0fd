"""What a SegCompass training run holds in GPU memory, computed from meta-device builds.

Every real backbone is built from its published config on the meta device (`torch.device("meta")`:
shapes and dtypes, no weights), frozen the way `SegCompass` freezes it, and given LoRA adapters the
way `segcompass.lora` adds them; the counts and bytes below are read off those modules, never typed.
The configs are written from the published `config.json` files (no hub is reachable here):
d_model, depth and hooked layer are `saekit.presets`'; heads, MLP widths, vocabularies and the
vision towers are the rest of llava-hf/llava-1.5-{7b,13b}-hf and Qwen/Qwen2.5-VL-7B-Instruct's
configs. SAM ViT-H is `segcompass.sam`'s preset, the head `segcompass.build`'s paper preset, the
SAE a ReLU SAE of d_sae 65536 on d_model.

What is counted is what this code allocates on a GPU:
  - the policy in bf16 (`saekit.models.resolve_dtype`); its trainable parameters (blocks above the
    SAE layer + final norm + untied LM head, or the LoRA adapters alone) add a gradient and AdamW's
    two moments, each in the parameter's own dtype (peft keeps adapters in fp32);
  - SAM, the head and the SAE in fp32: SAM's vision encoder and the SAE frozen (weights only),
    SAM's prompt encoder + mask decoder and the head trained (weights + gradient + 2 moments);
  - `rl+seg` adds TRL's frozen reference policy (bf16 weights, loaded from the base policy);
  - FSDP (TRL/accelerate, full shard over N GPUs) shards the policy, its gradients and optimizer
    state, and the reference policy, N ways; head, SAM and SAE live outside TRL's model and are
    replicated on every GPU. DDP replicates everything.
Activations are not in the table: they grow with batch and sequence length. With activation
checkpointing a decoder keeps one bf16 hidden state per block and token (`checkpointed_bytes`).

    python -m segcompass.memory            # rewrites docs/memory.md
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

REAL_PRESETS = ("llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b")
LORA_RANK = 16
FSDP_GPUS = 8
TOKENS = 832
"""Tokens of one LLaVA-1.5 sequence for the activation estimate: 576 image + 256 text."""
D_SAE = 65536
GIB = 1024 ** 3

_CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
_LLAMA = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act="silu",
              tie_word_embeddings=False)
TEXT_CONFIGS: dict[str, dict] = {
    "llava-1.5-7b": dict(_LLAMA, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "llava-1.5-13b": dict(_LLAMA, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40),
    "qwen2.5-vl-7b": dict(vocab_size=152064, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                          max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6, hidden_act="silu",
                          tie_word_embeddings=False),
}
"""The published text-model numbers other than d_model and depth (saekit.presets holds those)."""
QWEN_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2, window_size=112, hidden_act="silu",
                   fullatt_block_indexes=[7, 15, 23, 31])


def policy_config(preset: str):
    """The transformers config of a real preset, from `saekit.presets` + TEXT_CONFIGS."""
    from saekit.presets import get_preset

    p = get_preset(preset)
    text = dict(TEXT_CONFIGS[preset], hidden_size=p.d_model, num_hidden_layers=p.n_layers)
    if p.family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        return LlavaConfig(vision_config=CLIPVisionConfig(**_CLIP_L_336), text_config=LlamaConfig(**text),
                           image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(QWEN_VISION, out_hidden_size=p.d_model),
                            tie_word_embeddings=False)


@contextlib.contextmanager
def _meta():
    with torch.device("meta"):
        yield


def meta_policy(preset: str, *, lora_rank: int = 0) -> nn.Module:
    """The preset's policy on the meta device in bf16, frozen up to its hooked layer as
    `SegCompass` freezes it, with LoRA adapters above that layer when `lora_rank`."""
    import transformers

    from saekit.presets import get_preset
    from segcompass.model import freeze_policy_up_to

    p = get_preset(preset)
    with _meta():
        model = getattr(transformers, p.hf_class)(policy_config(preset)).to(torch.bfloat16)
        freeze_policy_up_to(model, p.default_layer)
        if lora_rank:
            from segcompass.lora import add_lora

            add_lora(model, p.default_layer, lora_rank)
    return model


def meta_side(preset: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(SAM ViT-H with frozen encoder, the head's own modules, the SAE) on the meta device, fp32."""
    from saekit.presets import get_preset
    from saekit.sae.model import SparseAutoencoder
    from segcompass.build import build_aggregator, build_codebook, build_slot_mapper, head_config
    from segcompass.sam import build_sam, freeze_vision_encoder

    d_model = get_preset(preset).d_model
    with _meta():
        sam = freeze_vision_encoder(build_sam("sam-vit-h"))
        cfg = head_config(preset, d_sae=D_SAE, d_llm=d_model)
        head = nn.ModuleDict({"codebook": build_codebook(cfg), "aggregator": build_aggregator(cfg),
                              "slot_mapper": build_slot_mapper(cfg, image_dim=sam.config.vision_config.output_channels)})
        sae = SparseAutoencoder(d_in=d_model, d_sae=D_SAE).requires_grad_(False)
    return sam, head, sae


class Part(NamedTuple):
    params: int
    """Parameters."""
    trainable: int
    """Of which trained."""
    weight_bytes: int
    """Bytes of all weights."""
    train_bytes: int
    """Bytes of the gradients + AdamW's two moments of the trained parameters."""


def part(modules: Iterable[nn.Module]) -> Part:
    """Counts and bytes of the distinct parameters of `modules`."""
    seen, params, trainable, weight, train = set(), 0, 0, 0, 0
    for module in modules:
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            params, weight = params + p.numel(), weight + size
            if p.requires_grad:
                trainable, train = trainable + p.numel(), train + 3 * size  # gradient, exp_avg, exp_avg_sq
    return Part(params, trainable, weight, train)


class PresetMemory(NamedTuple):
    preset: str
    policy_full: Part
    """The policy as full fine-tuning trains it (blocks above L, final norm, LM head)."""
    policy_lora: Part
    """The policy with rank-LORA_RANK adapters above L (only they train)."""
    sam: Part
    head: Part
    sae: Part
    checkpointed_bytes: int
    """bf16 hidden state per block and token of one TOKENS-long sequence (activation checkpointing)."""

    def per_gpu(self, lora: bool, gpus: int, grpo: bool) -> int:
        """Bytes per GPU: the policy (and the rl+seg reference) sharded over `gpus` (1 = DDP)."""
        policy = self.policy_lora if lora else self.policy_full
        sharded = policy.weight_bytes + policy.train_bytes + (self.policy_full.weight_bytes if grpo else 0)
        replicated = sum(p.weight_bytes + p.train_bytes for p in (self.sam, self.head, self.sae))
        return -(-sharded // gpus) + replicated


def preset_memory(preset: str, lora_rank: int = LORA_RANK) -> PresetMemory:
    from saekit.presets import get_preset

    full, lora = meta_policy(preset), meta_policy(preset, lora_rank=lora_rank)
    sam, head, sae = meta_side(preset)
    p = get_preset(preset)
    checkpointed = p.n_layers * TOKENS * p.d_model * torch.tensor([], dtype=torch.bfloat16).element_size()
    return PresetMemory(preset, part([full]), part([lora]), part([sam]), part([head]), part([sae]), checkpointed)


def _b(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def memory_markdown(rows: list[PresetMemory], lora_rank: int = LORA_RANK, gpus: int = FSDP_GPUS) -> str:
    """docs/memory.md: the two tables and what they count."""
    lines = ["# GPU memory of a SegCompass training run", "",
             "Computed by `python -m segcompass.memory` from meta-device builds of each preset (shapes and "
             "dtypes, no weights; `segcompass/memory.py` says what is counted); "
             "`tests/segcompass/test_memory.py` checks every number against fresh builds.", "",
             "## Parameters", "",
             f"| preset | policy | trained, full (above L) | trained, LoRA r={lora_rank} | SAM ViT-H "
             "(trained) | head | SAE |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.preset} | {_b(r.policy_full.params)} | {_b(r.policy_full.trainable)} | "
                     f"{_b(r.policy_lora.trainable)} | {_b(r.sam.params)} ({_b(r.sam.trainable)}) | "
                     f"{_b(r.head.params)} | {_b(r.sae.params)} |")
    lines += ["", "## GiB per GPU: weights + gradients + AdamW state (activations not included)", "",
              f"`seg` trains the head on the policy's responses; `rl+seg` adds TRL's reference policy. "
              f"FSDP = full shard of the policy over {gpus} GPUs; DDP replicates.", "",
              "| preset | mode | full, DDP | full, FSDP x%d | LoRA, DDP | LoRA, FSDP x%d | checkpointed "
              "activations / %d-token sequence |" % (gpus, gpus, TOKENS),
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for mode, grpo in (("seg", False), ("rl+seg", True)):
            cells = [_gib(r.per_gpu(lora, n, grpo)) for lora in (False, True) for n in (1, gpus)]
            lines.append(f"| {r.preset} | {mode} | {' | '.join(cells)} | {r.checkpointed_bytes / 2**20:.0f} MiB |")
    lines += ["", "Byte counts per part (GiB: weights / gradients + AdamW):", ""]
    for r in rows:
        parts = {"policy full": r.policy_full, "policy LoRA": r.policy_lora, "SAM": r.sam, "head": r.head,
                 "SAE": r.sae}
        lines.append(f"- {r.preset}: " + "; ".join(f"{k} {_gib(p.weight_bytes)} / {_gib(p.train_bytes)}"
                                                  for k, p in parts.items()))
    return "\n".join(lines) + "\n"


def main(out: str | Path = Path(__file__).resolve().parents[1] / "docs" / "memory.md") -> Path:
    from saekit.atomic import atomic_write_text

    out = Path(out)
    atomic_write_text(out, memory_markdown([preset_memory(p) for p in REAL_PRESETS]))
    return out


if __name__ == "__main__":
    print(main())
