"""SegCompassHead assembled by the builders: shapes (world and paper dimensions), gradients,
provenance bookkeeping."""

import pytest
import torch
from transformers import SamConfig, SamModel

from saekit.sparse import SparseCodes
from segcompass.build import HEAD_PRESETS, build_head, head_config
from segcompass.sam import build_sam, sam_config


def codes_for(n_tokens: int, d_sae: int, seed: int = 0, active: int = 12) -> SparseCodes:
    """ReLU-SAE-like codes: `active` atoms per token, about half of them >= 2."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.zeros(n_tokens, d_sae)
    for t in range(n_tokens):
        atoms = torch.randperm(d_sae, generator=g)[:active]
        dense[t, atoms] = torch.rand(active, generator=g) * 4
    return SparseCodes.from_dense(dense)


@pytest.fixture(scope="module")
def world():
    cfg = head_config("tiny-llava", d_sae=256)
    sam = build_sam(cfg.sam_preset, seed=0)
    torch.manual_seed(0)
    return cfg, build_head(cfg, sam)


def test_world_head_shapes_and_gradients(world):
    cfg, head = world
    codes = codes_for(20, cfg.d_sae)
    sample = torch.tensor([0] * 8 + [1] * 12)
    e = torch.randn(2, cfg.num_slots, cfg.d_llm)
    out = head(codes, sample, e, torch.randn(2, 64, 16, 16), torch.randn(2, 64, cfg.d_llm))
    k = cfg.num_slots
    assert out.heatmap_logits.shape == (2, k, 64, 64) and out.mask_logits.shape == (2, k, 64, 64)
    assert out.confidence_logits.shape == (2, k) and out.iou_pred.shape == (2, k)
    (out.mask_logits.mean() + out.heatmap_logits.mean() + out.confidence_logits.mean()).backward()
    grad_rows = head.codebook.weight.grad.abs().sum(1) > 0
    used = torch.zeros(cfg.d_sae, dtype=torch.bool)
    used[out.provenance.pair_atom] = True
    assert torch.equal(grad_rows, used)  # only surviving atoms' codebook rows learn
    assert head.slot_mapper.policy_key[1].weight.grad.abs().sum() > 0  # the world keys read the policy's tokens
    for module in (head.aggregator, head.slot_mapper, head.mask_decoder.mask_decoder):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    head.zero_grad()


def test_provenance_accounts_for_the_slot_attention(world):
    cfg, head = world
    codes = codes_for(15, cfg.d_sae, seed=1)
    sample = torch.tensor([1, 0] * 7 + [1])
    with torch.no_grad():
        out = head(codes, sample, torch.randn(2, cfg.num_slots, cfg.d_llm), torch.randn(2, 64, 16, 16),
                   torch.randn(2, 64, cfg.d_llm))
    prov = out.provenance
    assert prov.pair_slot_weight.shape == (len(prov.pair_atom), cfg.num_slots)
    assert torch.equal(prov.pair_sample, sample[prov.pair_token])
    # Shares sum to 1 per codebook token, so a sample's pair weights add up to its attention.
    for b in range(2):
        torch.testing.assert_close(prov.pair_slot_weight[prov.pair_sample == b].sum(0),
                                   prov.slot_attention[b].sum(-1))
    top = prov.top_atoms(sample=1, slot=2, k=4)
    assert len(top.atoms) == 4 and (top.weights[:-1] >= top.weights[1:]).all()
    for atom, weight, tokens, values in zip(top.atoms, top.weights, top.token_ids, top.values):
        rows = (prov.pair_sample == 1) & (prov.pair_atom == atom)
        torch.testing.assert_close(weight, prov.pair_slot_weight[rows, 2].sum())
        assert (sample[tokens] == 1).all() and (values >= cfg.threshold).all()
        dense = codes.to_dense()
        torch.testing.assert_close(values, dense[tokens, atom])


def test_head_rejects_wrong_slot_count(world):
    cfg, head = world
    with pytest.raises(ValueError, match="slot"):
        head(codes_for(3, cfg.d_sae), torch.zeros(3, dtype=torch.int64),
             torch.randn(1, cfg.num_slots + 1, cfg.d_llm), torch.randn(1, 64, 16, 16), torch.randn(1, 64, cfg.d_llm))


def test_paper_dimensions():
    """Paper numbers: d_sae 65536 -> d_c 512, 6 slots, SAM's 256 x 64 x 64 keys -> 256^2 masks.

    The SAM here has ViT-H's prompt encoder and mask decoder (identical across vit-b/l/h) with
    a one-block vision encoder, so the test does not build 600M encoder weights it never uses.
    """
    assert {name: HEAD_PRESETS[name].d_llm for name in ("llava-1.5-7b", "llava-1.5-13b", "qwen2.5-vl-7b")} \
        == {"llava-1.5-7b": 4096, "llava-1.5-13b": 5120, "qwen2.5-vl-7b": 3584}
    cfg = head_config("qwen2.5-vl-7b")
    assert (cfg.d_sae, cfg.d_c, cfg.aggregator_layers, cfg.aggregator_heads, cfg.aggregator_ff) == \
        (65536, 512, 2, 8, 2048)
    assert (cfg.mapper_heads, cfg.mapper_head_dim, cfg.threshold, cfg.sam_preset) == (4, 64, 2.0, "sam-vit-h")
    full = sam_config("sam-vit-h")
    vision = full.vision_config.to_dict()
    vision.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, global_attn_indexes=[0])
    sam = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=full.prompt_encoder_config.to_dict(),
                             mask_decoder_config=full.mask_decoder_config.to_dict()))
    torch.manual_seed(0)
    head = build_head(cfg, sam)
    assert head.codebook.weight.shape == (65536, 512)
    with torch.no_grad():
        out = head(codes_for(40, cfg.d_sae, active=60), torch.zeros(40, dtype=torch.int64),
                   torch.randn(1, 6, 3584), torch.randn(1, 256, 64, 64))
    assert out.heatmap_logits.shape == (1, 6, 256, 256) and out.mask_logits.shape == (1, 6, 256, 256)
    assert out.provenance.slot_attention.shape == (1, 6, 40)


@pytest.fixture(scope="module")
def routed():
    cfg = head_config("tiny-llava", d_sae=256, routing="concepts")
    sam = build_sam(cfg.sam_preset, seed=0)
    torch.manual_seed(0)
    return cfg, build_head(cfg, sam)


def _routed_inputs(cfg, seed: int = 0):
    codes = codes_for(20, cfg.d_sae, seed=seed)
    sample = torch.tensor([0] * 10 + [1] * 10)
    slot_rows = torch.tensor([[6, 7, 8, 9], [16, 17, 18, 19]])  # concentration tokens: last 4 of each
    image_rows = torch.cat([torch.arange(0, 4).repeat(16)[None], torch.arange(10, 14).repeat(16)[None]])  # (2, 64)
    return codes, sample, slot_rows, image_rows


def test_concept_routed_head_reads_no_raw_state(routed):
    """Raw e_k and raw image states are ignored: any change to them leaves every output equal."""
    cfg, head = routed
    codes, sample, slot_rows, image_rows = _routed_inputs(cfg)
    image = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        a = head(codes, sample, torch.randn(2, cfg.num_slots, cfg.d_llm), image, torch.randn(2, 64, cfg.d_llm),
                 slot_rows=slot_rows, image_rows=image_rows)
        b = head(codes, sample, None, image, None, slot_rows=slot_rows, image_rows=image_rows)
        zero = codes._replace(values=torch.zeros_like(codes.values))
        c = head(zero, sample, None, image, None, slot_rows=slot_rows, image_rows=image_rows)
    for field in ("heatmap_logits", "confidence_logits", "mask_logits"):
        assert torch.equal(getattr(a, field), getattr(b, field))
        assert not torch.allclose(getattr(a, field), getattr(c, field))  # the codes decide


def test_concept_routed_head_learns_both_codebooks_and_names_the_direct_path(routed):
    cfg, head = routed
    codes, sample, slot_rows, image_rows = _routed_inputs(cfg, seed=2)
    out = head(codes, sample, None, torch.randn(2, 64, 16, 16), slot_rows=slot_rows, image_rows=image_rows)
    (out.heatmap_logits.mean() + out.confidence_logits.mean()).backward()
    assert head.key_codebook.weight.grad.abs().sum() > 0 and head.codebook.weight.grad.abs().sum() > 0
    prov = out.provenance
    own = prov.pair_token == slot_rows[prov.pair_sample, 0]  # pairs of sample b's slot-0 token
    # the direct path adds each own pair's share within its token (shares sum to 1 per token)
    for b in (0, 1):
        mine = own & (prov.pair_sample == b)
        assert mine.any() and float(prov.pair_slot_weight[mine, 0].sum()) >= 1 - 1e-5
    head.zero_grad()
    with pytest.raises(ValueError, match="slot_rows"):
        head(codes, sample, None, torch.randn(2, 64, 16, 16))
