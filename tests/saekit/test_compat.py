"""The compatibility record (saekit.compat) and its checks (issue 25, item 1): pieces made for
another model or layer are refused in one line naming both, unless --allow-mismatch."""

from __future__ import annotations

import json

import pytest
import torch

from fault_pieces import build_cache, save_sae
from saekit.cache import ActivationCache
from saekit.cli import main
from saekit.compat import capture_record, check_compatible, model_fingerprint
from saekit.errors import UserError
from saekit.models import load_model, save_pretrained


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("compat"))


def test_the_fingerprint_follows_the_weights_below_the_layer(tmp_path):
    loaded = load_model("tiny-llava")
    blocks = loaded.model.model.language_model.layers
    before = model_fingerprint(loaded.model, 2)
    assert before == model_fingerprint(load_model("tiny-llava").model, 2)  # the same build, the same print
    save_pretrained(loaded, tmp_path / "saved")
    assert model_fingerprint(load_model("tiny-llava", tmp_path / "saved").model, 2) == before
    assert model_fingerprint(load_model("tiny-llava", tmp_path / "saved", dtype="bfloat16").model, 2) == before
    with torch.no_grad():
        blocks[2].mlp.down_proj.weight.mul_(1.5)  # block 3: above layer 2, its states do not change
        loaded.model.lm_head.weight.mul_(1.5)
    assert model_fingerprint(loaded.model, 2) == before
    assert model_fingerprint(loaded.model, 3) != model_fingerprint(load_model("tiny-llava").model, 3)
    with torch.no_grad():
        blocks[0].mlp.down_proj.weight.add_(1e-4)  # a small fine-tune of block 1 changes it
    assert model_fingerprint(loaded.model, 2) != before


def test_records_name_every_difference_and_skip_unknown_fields():
    loaded = load_model("tiny-llava")
    record = capture_record(loaded, 2, ["image"])
    assert record["hook"] == "blocks.1.hook_resid_post" and record["d_in"] == 128
    assert check_compatible(record, "a", dict(record, fingerprint=None), "b") == []
    with pytest.raises(UserError) as err:
        check_compatible(dict(record, model="tiny-qwen2.5-vl", layer=1, hook="blocks.0.hook_resid_post"),
                         "SAE x", record, "cache y")
    message = str(err.value)
    assert "\n" not in message and "SAE x" in message and "cache y" in message
    assert "model tiny-qwen2.5-vl vs tiny-llava" in message and "layer 1 vs 2" in message
    assert "hook" not in message.split(":", 1)[1].split(";")[0]  # the layer says it once
    assert check_compatible(dict(record, layer=1), "a", record, "b", allow_mismatch=True) == ["layer 1 vs 2"]


def test_encode_refuses_an_sae_of_another_model_unless_allowed(cache, tmp_path, capsys):
    """The trial: a tiny-qwen2.5-vl SAE applied to a tiny-llava cache (same d_in) was encoded."""
    compat = dict(ActivationCache(cache).compat(2), model="tiny-qwen2.5-vl", fingerprint=None)
    sae = save_sae(tmp_path / "qwen-sae", compat)
    argv = ["encode", "--sae", str(sae), "--cache", str(cache), "--out", str(tmp_path / "codes.safetensors"),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(sae) in err and str(cache) in err
    assert "model tiny-qwen2.5-vl vs tiny-llava" in err and "--allow-mismatch" in err
    assert not (tmp_path / "codes.safetensors").exists()
    assert main(argv + ["--allow-mismatch"]) == 0
    assert (tmp_path / "codes.safetensors").is_file()


def test_encode_without_layer_refuses_an_sae_of_another_layer(cache, tmp_path, capsys):
    """The trial: with --layer omitted, the cache's only layer was encoded with an SAE of another."""
    compat = dict(ActivationCache(cache).compat(2), layer=1, hook="blocks.0.hook_resid_post")
    sae = save_sae(tmp_path / "layer1-sae", compat)
    assert main(["encode", "--sae", str(sae), "--cache", str(cache), "--out", str(tmp_path / "c.safetensors"),
                 "--no-progress"]) == 2
    assert "layer 1 vs 2" in capsys.readouterr().err
    assert not (tmp_path / "c.safetensors").exists()


def test_a_trained_sae_and_its_cache_carry_the_same_record(cache, tmp_path):
    manifest = json.loads((cache / "manifest.json").read_text())
    record = manifest["compat"]["2"]
    assert record["model"] == "tiny-llava" and record["layer"] == 2 and record["fingerprint"].startswith("bf16:")
    assert record["fingerprint"] == model_fingerprint(load_model("tiny-llava").model, 2)
    assert all(shard["bytes"] == (cache / shard["file"]).stat().st_size for shard in manifest["shards"])
    assert manifest["data_fingerprint"]
    out = tmp_path / "sae"
    assert main(["train", "--cache", str(cache), "--out", str(out), "--d-sae", "32", "--batch-size", "32",
                 "--training-tokens", "128", "--warmup-steps", "1", "--token-types", "image", "prompt",
                 "--device", "cpu", "--no-progress"]) == 0
    info = json.loads((out / "saekit.json").read_text())
    assert info["compat"] == dict(record, token_types=["image", "prompt"])
    # The default encode reads the SAE's own token types, and the codes file is never empty.
    assert main(["encode", "--sae", str(out), "--cache", str(cache), "--out", str(tmp_path / "codes.safetensors"),
                 "--no-progress"]) == 0
