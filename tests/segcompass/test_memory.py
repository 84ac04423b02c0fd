"""docs/memory.md is exactly what fresh meta-device builds give; the meta counting agrees with a
real (tiny) model; the written configs give the published model sizes; LoRA and freezing count
what a SegCompass run trains."""

from pathlib import Path

import pytest
import torch

from segcompass.memory import REAL_PRESETS, memory_markdown, part, preset_memory

DOC = Path(__file__).resolve().parents[2] / "docs" / "memory.md"


@pytest.fixture(scope="module")
def rows():
    return [preset_memory(p) for p in REAL_PRESETS]


def test_the_document_is_the_meta_builds(rows):
    assert DOC.read_text() == memory_markdown(rows), "regenerate with: python -m segcompass.memory"


def test_the_configs_give_the_published_sizes(rows):
    sizes = {r.preset: r.policy_full.params for r in rows}
    assert sizes["llava-1.5-7b"] == 7_063_427_072  # llava-hf/llava-1.5-7b-hf: 7.06B
    assert sizes["qwen2.5-vl-7b"] == 8_292_166_656  # Qwen/Qwen2.5-VL-7B-Instruct: 8.29B
    assert sizes["llava-1.5-13b"] == pytest.approx(13.35e9, rel=2e-3)  # llava-hf/llava-1.5-13b-hf: 13.4B
    sam = rows[0].sam.params
    assert sam == pytest.approx(641e6, rel=2e-3)  # SAM ViT-H


def test_counting_matches_a_real_model_and_segcompass_freezing(tiny_model_dir):
    """The tiny twin, loaded with weights, counts as its meta build; trained = requires_grad."""
    from segcompass.model import load_segcompass

    model = load_segcompass(tiny_model_dir)
    real = part([model.policy])
    assert real.params == sum(p.numel() for p in model.policy.parameters())
    assert real.trainable == sum(p.numel() for p in model.policy.parameters() if p.requires_grad)
    assert real.weight_bytes == 4 * real.params and real.train_bytes == 12 * real.trainable  # fp32 on CPU


def test_lora_trains_only_adapters_above_the_sae_layer(rows):
    from segcompass.memory import meta_policy

    model = meta_policy("llava-1.5-7b", lora_rank=16)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trained)
    layers = {int(n.split(".layers.")[1].split(".")[0]) for n in trained}
    assert layers == set(range(16, 32))  # blocks 17..32: above hidden_states[16]
    # r (d_in + d_out) per adapted linear: 4 attention (4096->4096) + gate/up (4096->11008) + down
    per_block = 16 * (4 * 2 * 4096 + 2 * (4096 + 11008) + (11008 + 4096))
    assert rows[0].policy_lora.trainable == 16 * per_block
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from segcompass_tiny import tiny_checkpoint_dir

    return tiny_checkpoint_dir(tmp_path_factory)
