"""A pretrained-style policy without the template tokens gets them: tokens never split, new
embedding rows the mean of the old ones, every old token's logits unchanged, saved and reloaded."""

import pytest
import torch

from saekit.errors import UserError
from saekit.models import load_model, save_pretrained
from saekit.tiny import build_tiny_llava
from segcompass.policy import ref_token_id
from segcompass.policy_tokens import main, prepare_policy


def test_template_tokens_are_added_and_old_tokens_untouched(tmp_path):
    loaded = build_tiny_llava(["the", "red", "square"], image_size=32, patch_size=8, hidden_size=32, n_layers=2,
                              n_heads=2, vision_hidden_size=32, vision_layers=2, seed=0)
    with pytest.raises(ValueError, match="no <REF_POS> token"):
        ref_token_id(loaded)
    save_pretrained(loaded, tmp_path / "plain")
    prepared = load_model("tiny-llava", prepare_policy("tiny-llava", tmp_path / "plain", tmp_path / "policy"))
    ids = prepared.tokenizer("the red square", return_tensors="pt").input_ids
    assert torch.equal(ids, loaded.tokenizer("the red square", return_tensors="pt").input_ids)
    with torch.no_grad():
        old, new = loaded.model(input_ids=ids).logits, prepared.model(input_ids=ids).logits
    n = old.shape[-1]
    torch.testing.assert_close(new[..., :n], old, rtol=0, atol=1e-6)  # the old vocabulary reads the same
    assert prepared.tokenizer.tokenize("<think> red </think> <REF_POS>") == ["<think>", "red", "</think>", "<REF_POS>"]
    ref = ref_token_id(prepared)
    embeddings = prepared.model.get_input_embeddings().weight
    torch.testing.assert_close(embeddings[ref], loaded.model.get_input_embeddings().weight.mean(0))
    with pytest.raises(UserError, match="already has every template token"):
        prepare_policy("tiny-llava", tmp_path / "policy", tmp_path / "again")
    assert main(["--preset", "tiny-llava", str(tmp_path / "policy"), str(tmp_path / "again")]) == 2
