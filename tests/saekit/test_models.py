"""Model presets, offline loading, tiny twins and their save/load round trip."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.errors import UserError
from saekit.inputs import build_batch, format_prompt
from saekit.models import PRESETS, load_model, save_pretrained
from saekit.tiny import build_tiny_llava, build_tiny_qwen2_5_vl

BUILDERS = {"tiny-llava": build_tiny_llava, "tiny-qwen2.5-vl": build_tiny_qwen2_5_vl}


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]


def _logits(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**batch.model_inputs, use_cache=False).logits


def test_real_presets_carry_the_published_numbers():
    expected = {"llava-1.5-7b": ("llava-hf/llava-1.5-7b-hf", 4096, 32, 16),
                "llava-1.5-13b": ("llava-hf/llava-1.5-13b-hf", 5120, 40, 16),
                "qwen2.5-vl-7b": ("Qwen/Qwen2.5-VL-7B-Instruct", 3584, 28, 13)}
    for name, (hub_id, d_model, n_layers, layer) in expected.items():
        preset = PRESETS[name]
        assert (preset.hub_id, preset.d_model, preset.n_layers, preset.default_layer) == \
            (hub_id, d_model, n_layers, layer)
    assert PRESETS["tiny-llava"].hf_class == PRESETS["llava-1.5-7b"].hf_class
    assert PRESETS["tiny-qwen2.5-vl"].hf_class == PRESETS["qwen2.5-vl-7b"].hf_class


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tiny_twins_are_the_real_classes_and_seeded(name):
    a, b, c = BUILDERS[name](seed=3), BUILDERS[name](seed=3), BUILDERS[name](seed=4)
    assert type(a.model).__name__ == PRESETS[name].hf_class
    state_a, state_b, state_c = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert a.preset.d_model == a.model.config.text_config.hidden_size
    assert a.preset.n_layers == a.model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("name", list(BUILDERS))
def test_extra_special_tokens_stay_whole(name):
    loaded = BUILDERS[name](extra_special_tokens=["<think>", "</think>", "<REF_POS>"])
    ids = loaded.tokenizer("<think>red circle</think><REF_POS>", add_special_tokens=False)["input_ids"]
    tokens = loaded.tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<think>", "red", "circle", "</think>", "<REF_POS>"]


def test_format_prompt_uses_the_real_conversation_formats():
    llava, qwen = build_tiny_llava(), build_tiny_qwen2_5_vl()
    assert format_prompt(llava, "Where is the dog?") == "USER: <image>\nWhere is the dog? ASSISTANT:"
    assert format_prompt(qwen, "Where is the dog?") == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>Where is the dog?<|im_end|>\n"
        "<|im_start|>assistant\n")
    # A tokenizer without a template (as llava-hf's) gets the family's reference template.
    llava.tokenizer.chat_template = None
    assert format_prompt(llava, "hi") == "USER: <image>\nhi ASSISTANT:"


def test_missing_real_model_dir_is_one_line_error(tmp_path):
    with pytest.raises(UserError) as err:
        load_model("llava-1.5-7b", model_path=tmp_path / "nowhere")
    message = str(err.value)
    assert "\n" not in message and "--model-path" in message
    assert "llava-hf/llava-1.5-7b-hf" in message and str(tmp_path / "nowhere") in message


def test_missing_from_hf_cache_is_one_line_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError) as err:
        load_model("qwen2.5-vl-7b")
    message = str(err.value)
    assert "\n" not in message and "--model-path" in message
    assert "huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct" in message
    assert str(tmp_path / "empty-cache") in message


def test_missing_or_corrupt_weights_are_one_line_errors(tmp_path):
    directory = save_pretrained(build_tiny_llava(), tmp_path / "llava")
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError) as err:
        load_model("llava-1.5-7b", model_path=directory)
    assert "\n" not in str(err.value) and str(directory) in str(err.value)
    (directory / "model.safetensors").unlink()
    with pytest.raises(UserError, match="model.safetensors"):
        load_model("llava-1.5-7b", model_path=directory)


def test_unknown_preset_and_wrong_family(tmp_path):
    with pytest.raises(UserError, match="tiny-llava"):
        load_model("llava-9b")
    save_pretrained(build_tiny_qwen2_5_vl(), tmp_path / "qwen")
    with pytest.raises(UserError, match="model_type 'qwen2_5_vl', expected 'llava'"):
        load_model("llava-1.5-7b", model_path=tmp_path / "qwen")


@pytest.mark.parametrize("name", list(BUILDERS))
def test_save_pretrained_round_trip_gives_identical_logits(name, tmp_path):
    loaded = BUILDERS[name](extra_special_tokens=["<REF_POS>"], seed=1)
    save_pretrained(loaded, tmp_path / name)
    again = load_model(name, model_path=tmp_path / name)
    assert again.preset == loaded.preset
    prompts, responses = ["what is the red circle ?", "find it"], [None, "it is left <REF_POS>"]
    batch = build_batch(loaded, _images(), prompts, responses)
    batch_again = build_batch(again, _images(), prompts, responses)
    for key, value in batch.model_inputs.items():
        assert torch.equal(value, batch_again.model_inputs[key]), key
    assert torch.equal(batch.token_types, batch_again.token_types)
    assert torch.equal(_logits(loaded, batch), _logits(again, batch_again))


def test_saved_tiny_llava_loads_with_plain_transformers(tmp_path):
    from transformers import LlavaForConditionalGeneration

    loaded = build_tiny_llava()
    save_pretrained(loaded, tmp_path / "llava")
    plain = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    batch = build_batch(loaded, _images(), ["a", "the dog"])
    with torch.no_grad():
        logits = plain(**batch.model_inputs, use_cache=False).logits
    assert torch.equal(logits, _logits(loaded, batch))


def test_real_preset_path_loads_a_real_layout_directory(tmp_path):
    loaded = build_tiny_llava()
    save_pretrained(loaded, tmp_path / "llava")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        real = load_model("llava-1.5-7b", model_path=tmp_path / "llava")
    assert any("d_model 128" in str(w.message) for w in caught)
    assert (real.preset.name, real.preset.d_model, real.preset.n_layers) == ("llava-1.5-7b", 128, 4)
    assert 1 <= real.preset.default_layer <= 4
    batch = build_batch(real, _images(), ["where", "what"])
    assert torch.equal(_logits(real, batch), _logits(loaded, batch))
