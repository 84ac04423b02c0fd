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
from saekit.models import load_model, save_pretrained
from saekit.tiny import build_tiny_llava

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


def test_saekit_sae_through_sae_lens_on_the_bridge_matches_saekit_encode(
        bridge, saekit_llava, llava_batch, tiny_llava_dir, fixtures_dir, tmp_path):
    """An SAE trained by `saekit train` on the saved tiny LLaVA, loaded by sae-lens and fed the
    bridge's activations at the hook named in its cfg.json, gives saekit's sparse codes."""
    import json

    from sae_lens import SAE

    from saekit.cli import main
    from saekit.sae import encode_sparse, load_sae

    photos = sorted((fixtures_dir / "labelme").glob("*.jpg"))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"image": str(p), "text": f"photo {i} of a scene"}) + "\n"
                            for i, p in enumerate(photos * 2)))
    out = tmp_path / "sae"
    assert main(["train", "--model", "tiny-llava", "--model-path", str(tiny_llava_dir), "--layer", "2",
                 "--data", str(data), "--out", str(out), "--d-sae", "256", "--batch-size", "64",
                 "--training-tokens", str(64 * 6), "--warmup-steps", "1", "--lr", "1e-3",
                 "--no-progress"]) == 0
    sae_lens_sae = SAE.load_from_disk(out)
    hook = sae_lens_sae.cfg.metadata.hook_name
    assert hook == layer_metadata(saekit_llava.preset, 2)["transformer_lens_hook"] == "blocks.1.hook_resid_post"
    inputs = llava_batch.model_inputs
    with torch.no_grad():
        _, cache = bridge.run_with_cache(
            inputs["input_ids"], pixel_values=inputs["pixel_values"],
            attention_mask=inputs["attention_mask"], names_filter=lambda name: name == hook)
        bridge_latents = sae_lens_sae.encode(cache[hook][llava_batch.attention_mask.bool()])
    acts = capture(saekit_llava, llava_batch, [2]).activations[2]
    codes = encode_sparse(load_sae(out, expected_d_in=acts.shape[1]).sae, acts, chunk_tokens=50)
    assert codes.indices.numel() > 0
    torch.testing.assert_close(codes.to_dense(), bridge_latents, rtol=1e-4, atol=1e-5)
