"""A tiny random-weight SegCompass checkpoint for tests, built in a few seconds.

    policy/   tiny-llava with the world vocabulary and the template's special tokens
              (`segcompass.world.warmstart.build_policy`, narrow: d_model 32, 2 blocks, 4x4 image grid)
    sae/      a random ReLU SAE (d_sae 256) in the sae-lens folder format, its encoder scaled
              so that ~15% of the atoms pass the codebook threshold on the policy's states
              (a raw random SAE would leave no atom above 2.0 and an empty concept pathway)
    sam/      the world's `sam-tiny-16`, random
    head      `tiny-llava` head preset (4 slots), random

Use the `tiny_checkpoint` fixture (one build per test session, shared by every module that
imports it) or `build_tiny_checkpoint(directory)` directly (benchmarks, notebooks).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TINY_POLICY = dict(image_size=32, patch_size=8, hidden_size=32, n_layers=2, n_heads=2,
                   vision_hidden_size=32, vision_layers=2)
"""WarmstartConfig overrides: the smallest policy that still has every moving part."""
TINY_D_SAE = 256
TINY_SAE_LAYER = 1
TARGET_PRE_STD = 2.0
"""Std of the SAE pre-activations on real policy states: P(h > 2.0) ~ 16% per atom."""
_DONE_MARKER = "segcompass.json"


def _calibration_states(loaded, layer: int, n_samples: int = 4) -> torch.Tensor:
    """(N, d) layer-`layer` states of a few teacher-forced world samples (padding excluded)."""
    from PIL import Image

    from saekit.inputs import build_batch
    from segcompass.world.scenes import generate
    from segcompass.policy import policy_forward
    from segcompass.template import build_prompt, format_response, k_for

    samples = generate("train", n_samples, seed=0)
    batch = build_batch(loaded, [Image.fromarray(s.image) for s in samples],
                        [build_prompt(s.instruction, multi=s.multi_prompt) for s in samples],
                        [format_response(s.cot, k_for(s.multi_prompt)) for s in samples],
                        padding_side="right")
    with torch.no_grad():
        states = policy_forward(loaded.model, batch, layer).sae_hidden  # (B, T, d)
    return states[batch.attention_mask.bool()]  # (B, T, d) -> (N, d)


def build_tiny_sae(loaded, directory: Path, *, layer: int = TINY_SAE_LAYER, d_sae: int = TINY_D_SAE,
                   seed: int = 0) -> Path:
    """A random SAE over `loaded`'s layer `layer`, saved as an sae-lens folder."""
    from saekit.sae.io import save_sae
    from saekit.sae.model import SparseAutoencoder

    states = _calibration_states(loaded, layer)
    d_in = states.shape[1]
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(d_in=d_in, d_sae=d_sae)
    with torch.no_grad():
        w_enc = torch.randn(d_in, d_sae, generator=generator)  # (d_in, d_sae)
        # pre = x W_enc has std ~ |x| * std(W_enc): scale so it is TARGET_PRE_STD on real states.
        w_enc *= TARGET_PRE_STD / states.norm(dim=1).median()
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(torch.randn(d_sae, d_in, generator=generator) * 0.1)
    metadata = {"model_name": "tiny-llava", "hook_name": f"blocks.{layer - 1}.hook_resid_post"}
    info = {"model": {"name": "tiny-llava", "d_model": d_in},
            "layer": {"hf_hidden_states_index": layer,
                      "transformer_lens_hook": f"blocks.{layer - 1}.hook_resid_post"},
            "architecture": "standard", "d_in": d_in, "d_sae": d_sae, "note": "random, for tests"}
    return save_sae(sae, directory, metadata=metadata, info=info)


def build_tiny_checkpoint(directory: str | Path, *, seed: int = 0, policy: dict | None = None,
                          d_sae: int = TINY_D_SAE, sae_layer: int = TINY_SAE_LAYER) -> Path:
    """Write a complete random SegCompass checkpoint folder to `directory` (overwritten).

    `policy`: WarmstartConfig overrides (default TINY_POLICY; `{}` gives the embedded world's
    full-size policy, d_model 128 and 4 blocks, as `benchmarks/predict.py` uses)."""
    from saekit.models import save_pretrained
    from segcompass.model import SegCompassConfig, build_segcompass, save_segcompass
    from segcompass.world.warmstart import WarmstartConfig, build_policy

    directory = Path(directory)
    parts = directory.parent / f".{directory.name}-parts"
    loaded = build_policy(WarmstartConfig(seed=seed, **(TINY_POLICY if policy is None else policy)))
    save_pretrained(loaded, parts / "policy")
    build_tiny_sae(loaded, parts / "sae", layer=sae_layer, d_sae=d_sae, seed=seed)
    config = SegCompassConfig(policy_preset="tiny-llava", sae_layer=sae_layer, head_preset="tiny-llava",
                              sam_preset="sam-tiny-16")
    model = build_segcompass(config, policy_path=parts / "policy", sae_path=parts / "sae", seed=seed)
    save_segcompass(model, directory, sae_path=parts / "sae", record={"note": "random weights, for tests"})
    shutil.rmtree(parts)  # the checkpoint holds copies of everything
    return directory


def tiny_checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny checkpoint, built on first use (shared across test modules)."""
    directory = tmp_path_factory.getbasetemp() / "segcompass-tiny" / "checkpoint"
    if not (directory / _DONE_MARKER).is_file():
        build_tiny_checkpoint(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """Folder of a random-weight SegCompass checkpoint (see the module docstring)."""
    return tiny_checkpoint_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint, loaded (eval mode). Do not modify it in a test; load your own copy."""
    from segcompass.model import load_segcompass

    return load_segcompass(tiny_checkpoint).eval()
