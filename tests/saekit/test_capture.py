"""Hooked capture vs `output_hidden_states`, token-type tags, early exit, hook hygiene."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.capture import capture, capture_padded, decoder_layers, layer_metadata
from saekit.errors import UserError
from saekit.inputs import TokenType, build_batch
from saekit.tiny import build_tiny_llava, build_tiny_qwen2_5_vl

PROMPTS = ["what is the red circle ?", "find the dog", "segment all people in the picture ."]
RESPONSES = [None, "the dog is left of the cat .", "<think> many people </think> <REF_POS>"]
BUILDERS = {"tiny-llava": build_tiny_llava, "tiny-qwen2.5-vl": build_tiny_qwen2_5_vl}


@pytest.fixture(scope="module", params=list(BUILDERS))
def loaded(request):
    return BUILDERS[request.param](extra_special_tokens=["<think>", "</think>", "<REF_POS>"])


@pytest.fixture(scope="module")
def images(fixtures_dir):
    photos = [Image.open(p) for p in sorted((fixtures_dir / "labelme").glob("*.jpg"))[:2]]
    tall = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 40, 3), dtype=np.uint8))
    return [*photos, tall]


@pytest.fixture(scope="module")
def batch(loaded, images):
    return build_batch(loaded, images, PROMPTS, RESPONSES)


@pytest.fixture(scope="module")
def hidden_states(loaded, batch):
    with torch.no_grad():
        out = loaded.model(**batch.model_inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def _image_cells(loaded, batch) -> list[int]:
    """Number of image patches per sample on the LLM's grid, from the model inputs."""
    config = loaded.model.config
    if loaded.preset.family == "llava":
        side = config.vision_config.image_size // config.vision_config.patch_size
        return [side * side] * len(PROMPTS)
    merge = config.vision_config.spatial_merge_size
    return [int(t * h * w) // merge ** 2 for t, h, w in batch.model_inputs["image_grid_thw"].tolist()]


def test_capture_matches_output_hidden_states(loaded, batch, hidden_states):
    n_layers = loaded.preset.n_layers
    layers = list(range(1, n_layers + 1))
    result = capture(loaded, batch, layers)
    valid = batch.attention_mask.bool()
    assert not valid.all(), "the batch must contain padding"
    for layer in range(1, n_layers):
        torch.testing.assert_close(result.activations[layer], hidden_states[layer][valid],
                                   rtol=0, atol=1e-6)
    # HF ties hidden_states[n_layers] to the final norm's output; the block output is pre-norm.
    final_norm = loaded.model.model.language_model.norm
    with torch.no_grad():
        torch.testing.assert_close(final_norm(result.activations[n_layers]),
                                   hidden_states[n_layers][valid], rtol=0, atol=1e-5)
    for kind in (TokenType.IMAGE, TokenType.PROMPT, TokenType.RESPONSE, TokenType.SPECIAL):
        assert (result.token_types == kind).any(), kind


def test_capture_padded_matches_at_every_valid_position(loaded, batch, hidden_states):
    padded = capture_padded(loaded, batch, [2, 1])
    assert sorted(padded) == [1, 2]
    valid = batch.attention_mask.bool()
    for layer, hidden in padded.items():
        assert hidden.shape == hidden_states[layer].shape
        torch.testing.assert_close(hidden[valid], hidden_states[layer][valid], rtol=0, atol=1e-6)


def test_padding_never_in_output(loaded, batch):
    result = capture(loaded, batch, [1])
    mask = batch.attention_mask
    assert result.activations[1].shape == (int(mask.sum()), loaded.preset.d_model)
    assert bool((result.token_types >= 0).all())
    assert bool((mask[result.sample_index, result.position] == 1).all())
    expected = [(b, t) for b in range(mask.shape[0]) for t in range(mask.shape[1]) if mask[b, t]]
    assert list(zip(result.sample_index.tolist(), result.position.tolist())) == expected


def test_batched_capture_equals_one_sample_at_a_time(loaded, images, batch):
    result = capture(loaded, batch, [3])
    for i in range(len(PROMPTS)):
        alone = capture(loaded, build_batch(loaded, images[i:i + 1], PROMPTS[i:i + 1],
                                            RESPONSES[i:i + 1]), [3])
        rows = result.sample_index == i
        assert torch.equal(result.token_types[rows], alone.token_types)
        torch.testing.assert_close(result.activations[3][rows], alone.activations[3],
                                   rtol=1e-4, atol=1e-4)


def test_image_tokens_and_grid_cover_every_patch_once(loaded, batch):
    result = capture(loaded, batch, [1])
    for i, n_cells in enumerate(_image_cells(loaded, batch)):
        image_rows = (result.sample_index == i) & (result.token_types == TokenType.IMAGE)
        assert int(image_rows.sum()) == n_cells
        cells = {tuple(cell) for cell in result.image_grid[image_rows].tolist()}
        assert len(cells) == n_cells and min(min(c) for c in cells) == 0
        assert bool((result.image_grid[~image_rows & (result.sample_index == i)] == -1).all())
    ids = batch.model_inputs["input_ids"]
    image_id = loaded.model.config.image_token_id
    assert torch.equal(ids == image_id, batch.token_types == TokenType.IMAGE)


def test_token_types_tag_exactly_prompt_and_response(loaded, batch):
    tokenizer = loaded.tokenizer
    ids = batch.model_inputs["input_ids"]
    for i, (prompt, response) in enumerate(zip(PROMPTS, RESPONSES)):
        types = batch.token_types[i]
        prompt_ids = ids[i][types == TokenType.PROMPT].tolist()
        assert prompt_ids == tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = ids[i][types == TokenType.RESPONSE].tolist()
        expected = [] if response is None else tokenizer(response, add_special_tokens=False)["input_ids"]
        assert response_ids == expected
        if response is not None:  # the response sits at the end, before the end-of-turn marker
            last_response = int((types == TokenType.RESPONSE).nonzero().max())
            assert last_response == types.shape[0] - 2
            assert types[-1] == TokenType.SPECIAL
    if loaded.preset.family == "llava":  # left padding: BOS starts every row's real tokens
        first = batch.attention_mask.argmax(dim=1)
        assert bool((ids[torch.arange(len(PROMPTS)), first] == tokenizer.bos_token_id).all())


def test_early_exit_equals_full_forward_and_skips_later_blocks(loaded, batch):
    blocks = decoder_layers(loaded.model)
    calls = []
    handle = blocks[-1].register_forward_hook(lambda *args: calls.append(1))
    try:
        early = capture(loaded, batch, [1, 2], early_exit=True)
        assert calls == []
        full = capture(loaded, batch, [1, 2], early_exit=False)
        assert calls == [1]
    finally:
        handle.remove()
    for layer in (1, 2):
        assert torch.equal(early.activations[layer], full.activations[layer])


def _hook_ids(model) -> list[set[int]]:
    """Forward-hook ids per block (transformers keeps its own output-recording hooks there)."""
    return [set(block._forward_hooks) for block in decoder_layers(model)]


def test_hooks_removed_after_success_and_after_exception(loaded, batch):
    blocks = decoder_layers(loaded.model)
    before = _hook_ids(loaded.model)
    capture(loaded, batch, [1, 3])
    assert _hook_ids(loaded.model) == before

    def explode(module, args):
        raise ValueError("boom")

    handle = blocks[1].register_forward_pre_hook(explode)
    try:
        with pytest.raises(ValueError, match="boom"):
            capture(loaded, batch, [1, 3])
    finally:
        handle.remove()
    assert _hook_ids(loaded.model) == before


def test_out_of_range_layer_is_a_user_error(loaded, batch):
    n = loaded.preset.n_layers
    before = _hook_ids(loaded.model)
    for bad in (0, n + 1, -1):
        with pytest.raises(UserError) as err:
            capture(loaded, batch, [1, bad])
        message = str(err.value)
        assert f"layer {bad}" in message and loaded.preset.name in message and f"1..{n}" in message
        assert "\n" not in message
    with pytest.raises(UserError):
        layer_metadata(loaded.preset, n + 1)
    assert _hook_ids(loaded.model) == before


def test_layer_metadata_names_every_convention(loaded):
    meta = layer_metadata(loaded.preset, 2)
    assert meta["hf_hidden_states_index"] == 2
    assert meta["transformer_lens_hook"] == "blocks.1.hook_resid_post"
    assert loaded.model.get_submodule(meta["module_path"]) is decoder_layers(loaded.model)[1]


def test_build_batch_rejects_bad_inputs(loaded, images):
    with pytest.raises(UserError, match="one of each"):
        build_batch(loaded, images[:1], PROMPTS[:2])
    with pytest.raises(UserError, match="image token"):
        build_batch(loaded, images[:1], [f"look {loaded.preset.image_token} here"])
