"""Interop: TransformerLens's TransformerBridge on a saved tiny LLaVA sees what saekit captures.

`tiny_llava_dir` and `bridge` are module fixtures other interop tests (e.g. an SAE attached
through sae-lens) can reuse: the bridge is booted offline from the very directory saekit
loads, so both wrap the same weights.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.capture import capture, layer_metadata
from saekit.inputs import TokenType, build_batch
from saekit.models import build_tiny_llava, load_model, save_pretrained

PROMPTS = ["what is the red circle ?", "find the dog on the left", "point at it"]
RESPONSES = [None, "the dog is left of the cat .", None]


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory) -> Path:
    """A tiny LLaVA saved with `saekit.models.save_pretrained` (the real HF folder layout)."""
    directory = tmp_path_factory.mktemp("tiny-llava") / "model"
    save_pretrained(build_tiny_llava(seed=0), directory)
    return directory


@pytest.fixture(scope="module")
def bridge(tiny_llava_dir):
    """`TransformerBridge.boot_transformers(tiny_llava_dir)`, offline, with installs blocked."""
    from transformer_lens.model_bridge import TransformerBridge

    def refuse(*args, **kwargs):
        # boot() runs `pip install torchvision` when a processor fails to load: never here.
        raise RuntimeError(f"test refused to run {args}")

    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bridge warns about CLIP hook aliases it cannot map
        patch.setattr(subprocess, "check_call", refuse)
        patch.setattr(subprocess, "run", refuse)
        booted = TransformerBridge.boot_transformers(str(tiny_llava_dir), device="cpu")
    assert type(booted.processor).__name__ == "LlavaProcessor"  # loaded, so no install attempt
    return booted


@pytest.fixture(scope="module")
def saekit_llava(tiny_llava_dir):
    """The same directory through saekit; eager attention, as the bridge forces it."""
    loaded = load_model("tiny-llava", model_path=tiny_llava_dir)
    loaded.model.set_attn_implementation("eager")
    return loaded


@pytest.fixture(scope="module")
def llava_batch(saekit_llava, fixtures_dir):
    photos = [Image.open(p) for p in sorted((fixtures_dir / "labelme").glob("*.jpg"))[:2]]
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    return build_batch(saekit_llava, [*photos, noise], PROMPTS, RESPONSES)


def test_bridge_resid_post_equals_saekit_capture(bridge, saekit_llava, llava_batch):
    n_layers = saekit_llava.preset.n_layers
    layers = list(range(1, n_layers + 1))
    hooks = {layer: layer_metadata(saekit_llava.preset, layer)["transformer_lens_hook"]
             for layer in layers}
    inputs = llava_batch.model_inputs
    with torch.no_grad():
        _, cache = bridge.run_with_cache(
            inputs["input_ids"], pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"], names_filter=lambda name: name in hooks.values())
    result = capture(saekit_llava, llava_batch, layers, early_exit=False)
    valid = llava_batch.attention_mask.bool()
    assert (result.token_types == TokenType.IMAGE).sum() == 3 * 64
    for layer, hook in hooks.items():
        torch.testing.assert_close(cache[hook][valid].to(result.activations[layer].dtype),
                                   result.activations[layer], rtol=1e-5, atol=1e-6)
