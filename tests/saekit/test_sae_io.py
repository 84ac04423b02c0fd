"""SAE folders: saekit's saved folder loads in sae-lens and encodes identically, sae-lens's
own folders load in saekit, the input scale folds exactly, a mismatched width is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saekit.errors import UserError
from saekit.sae.io import load_sae, save_sae
from saekit.sae.model import SparseAutoencoder

D_IN, D_SAE = 32, 128
LAYER = {"layer": 2, "hf_hidden_states_index": 2, "transformer_lens_hook": "blocks.1.hook_resid_post",
         "module_path": "model.language_model.layers.1"}


def _trained_like(architecture: str, k: int | None = None) -> SparseAutoencoder:
    sae = SparseAutoencoder(d_in=D_IN, d_sae=D_SAE, architecture=architecture, k=k)
    sae.init_weights_(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return sae


def _save(sae: SparseAutoencoder, directory: Path) -> Path:
    return save_sae(sae, directory, metadata={"model_name": "tiny-llava",
                                              "hook_name": LAYER["transformer_lens_hook"]},
                    info={"model": {"name": "tiny-llava"}, "layer": LAYER, "d_in": D_IN})


@pytest.mark.parametrize("architecture,k", [("standard", None), ("topk", 5)])
def test_saved_folder_loads_in_sae_lens_with_identical_encodings(tmp_path, architecture, k):
    from sae_lens import SAE

    sae = _trained_like(architecture, k)
    folder = _save(sae, tmp_path / "sae")
    theirs = SAE.load_from_disk(folder)
    assert type(theirs).__name__ == {"standard": "StandardSAE", "topk": "TopKSAE"}[architecture]
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert theirs.cfg.apply_b_dec_to_input is False
    x = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = load_sae(folder).sae
        assert torch.equal(theirs.encode(x), ours.encode(x))
        assert torch.equal(theirs.encode(x), sae.encode(x))
        torch.testing.assert_close(theirs(x), ours(x), rtol=0, atol=0)
    if architecture == "topk":
        assert ((ours.encode(x) != 0).sum(dim=1) <= k).all()
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_folders_written_by_sae_lens_load_in_saekit(tmp_path, architecture):
    """sae-lens defaults differ from saekit's: b_dec subtracted from the input, and a TopK
    trained with decoder-norm rescaling (folded by sae-lens's save_inference_model)."""
    from sae_lens import (SAE, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)

    torch.manual_seed(5)
    if architecture == "standard":
        training = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        training = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=6))
    with torch.no_grad():
        for p in training.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    training.save_inference_model(tmp_path / "theirs")
    theirs = SAE.load_from_disk(tmp_path / "theirs")
    loaded = load_sae(tmp_path / "theirs")
    assert loaded.info == {} and loaded.sae.apply_b_dec_to_input is True
    x = torch.randn(30, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(loaded.sae.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loaded.sae(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_folded_input_scale_gives_the_same_latents_on_raw_inputs():
    sae = _trained_like("standard")
    x = torch.randn(20, D_IN, dtype=torch.float32)
    scale = 0.37
    with torch.no_grad():
        latents_scaled = sae.encode(x * scale)
        recon_scaled = sae(x * scale)
        sae.fold_input_scale_(scale)
        torch.testing.assert_close(sae.encode(x), latents_scaled, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sae(x), recon_scaled / scale, rtol=1e-5, atol=1e-5)


def test_mismatched_width_is_one_line_naming_both_widths_and_layers(tmp_path):
    folder = _save(_trained_like("standard"), tmp_path / "sae")
    with pytest.raises(UserError) as err:
        load_sae(folder, expected_d_in=4096, target="layer 16 of llava-1.5-7b")
    message = str(err.value)
    assert "\n" not in message
    for part in ("d_in 32", "layer 2 of tiny-llava", "width 4096", "layer 16 of llava-1.5-7b"):
        assert part in message
    assert load_sae(folder, expected_d_in=D_IN).sae.d_in == D_IN


def test_missing_or_broken_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sae(tmp_path / "nowhere")
    folder = _save(_trained_like("standard"), tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(UserError, match="architecture 'gated' is not supported"):
        load_sae(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 64}))
    with pytest.raises(UserError, match=r"W_enc is \(32, 128\), cfg.json implies \(32, 64\)"):
        load_sae(folder)
