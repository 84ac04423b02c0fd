"""One policy forward pass supplies the SAE layer and the slot embeddings: parity with two passes."""

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.capture import capture_padded
from saekit.inputs import TokenType, build_batch
from segcompass.world.scenes import generate
from segcompass.policy import policy_forward, ref_token_id, slot_inputs
from segcompass.template import build_prompt, format_response, k_for
from segcompass.world.warmstart import WarmstartConfig, build_policy


@pytest.fixture(scope="module")
def policy_and_batch():
    torch.manual_seed(0)
    loaded = build_policy(WarmstartConfig(hidden_size=32, n_layers=3, n_heads=2, vision_hidden_size=32,
                                          vision_layers=2, image_size=32, patch_size=8))
    loaded.model.eval()
    samples = generate("multi", 3, seed=4)
    prompts = [build_prompt(s.instruction, multi=s.multi_prompt) for s in samples]
    responses = [format_response(s.cot, k_for(s.multi_prompt)) for s in samples]
    responses[1] = responses[1].rsplit(" ", 2)[0]  # a malformed response: two concentration tokens short
    batch = build_batch(loaded, [Image.fromarray(s.image) for s in samples], prompts, responses,
                        padding_side="right")
    return loaded, batch, samples


def test_one_pass_equals_two_passes(policy_and_batch):
    loaded, batch, _ = policy_and_batch
    with torch.no_grad():
        one = policy_forward(loaded.model, batch, sae_layer=2)
        sae_states = capture_padded(loaded, batch, [2], early_exit=True)[2]  # pass 1: the SAE layer
        full = loaded.model(**batch.model_inputs, output_hidden_states=True)  # pass 2: logits, last layer
    valid = batch.token_types != -1
    torch.testing.assert_close(one.sae_hidden[valid], sae_states[valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.last_hidden[valid], full.hidden_states[-1][valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(one.logits[valid], full.logits[valid], rtol=1e-5, atol=1e-5)


def test_slot_inputs_pick_response_ref_tokens(policy_and_batch):
    loaded, batch, samples = policy_and_batch
    with torch.no_grad():
        one = policy_forward(loaded.model, batch, sae_layer=2)
    k = k_for(True)
    slots = slot_inputs(one, batch, ref_token_id(loaded), k)
    assert slots.slot_embeddings.shape == (3, k, one.last_hidden.shape[-1])
    assert slots.slots_written.tolist() == [k, k - 2, k]
    ids, types = batch.model_inputs["input_ids"], batch.token_types
    ref = ref_token_id(loaded)
    for row in (0, 2):
        positions = ((ids[row] == ref) & (types[row] == int(TokenType.RESPONSE))).nonzero().flatten()
        torch.testing.assert_close(slots.slot_embeddings[row], one.last_hidden[row, positions])
    # the prompt names <REF_POS> too, but only response tokens are concentration tokens
    assert ((ids == ref) & (types == int(TokenType.PROMPT))).any()
    # SAE tokens: image, prompt and response tokens, never padding or special tokens
    kept = types[slots.token_sample_index, slots.token_position]
    assert set(kept.tolist()) <= {int(TokenType.IMAGE), int(TokenType.PROMPT), int(TokenType.RESPONSE)}
    assert len(kept) == int(((types >= 0) & (types != int(TokenType.SPECIAL))).sum())


def test_hooks_removed_after_forward(policy_and_batch):
    loaded, batch, _ = policy_and_batch
    from saekit.capture import decoder_layers
    from segcompass.policy import final_norm

    modules = (decoder_layers(loaded.model)[0], final_norm(loaded.model))
    before = [dict(m._forward_hooks) for m in modules]  # transformers installs hooks of its own
    policy_forward(loaded.model, batch, sae_layer=1)
    assert [dict(m._forward_hooks) for m in modules] == before
    with pytest.raises(Exception):
        bad = batch._replace(model_inputs={**batch.model_inputs, "input_ids": batch.model_inputs["input_ids"][:, :3]})
        policy_forward(loaded.model, bad, sae_layer=1)
    assert [dict(m._forward_hooks) for m in modules] == before
