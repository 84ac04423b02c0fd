"""Concept aggregator: shapes, parity with torch's pre-norm TransformerEncoderLayer, padding."""

import torch
from torch import nn

from segcompass.modeling.concept_aggregator import ConceptAggregator

D, HEADS, FF, K = 32, 4, 64, 3


def aggregator(layers: int = 2) -> ConceptAggregator:
    torch.manual_seed(0)
    return ConceptAggregator(num_slots=K, d_model=D, num_layers=layers, num_heads=HEADS, ff_dim=FF).eval()


def reference_layers(agg: ConceptAggregator) -> list[nn.TransformerEncoderLayer]:
    """torch's own norm_first encoder layers carrying the same weights."""
    layers = []
    for block in agg.blocks:
        ref = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu",
                                         batch_first=True, norm_first=True).eval()
        ref.self_attn.in_proj_weight.data.copy_(block.qkv.weight)
        ref.self_attn.in_proj_bias.data.copy_(block.qkv.bias)
        ref.self_attn.out_proj.load_state_dict(block.out_proj.state_dict())
        ref.linear1.load_state_dict(block.ff[0].state_dict())
        ref.linear2.load_state_dict(block.ff[3].state_dict())
        ref.norm1.load_state_dict(block.norm_attn.state_dict())
        ref.norm2.load_state_dict(block.norm_ff.state_dict())
        layers.append(ref)
    return layers


def test_matches_torch_prenorm_encoder_and_its_attention_weights():
    agg = aggregator()
    tokens = torch.randn(2, 5, D)
    padding = torch.tensor([[False] * 5, [False, False, True, True, True]])
    out = agg(tokens, padding)
    assert out.concepts.shape == (2, K, D) and out.slot_attention.shape == (2, K, 5)

    x = torch.cat([agg.slot_queries.expand(2, -1, -1), tokens], 1)
    mask = torch.cat([torch.zeros(2, K, dtype=torch.bool), padding], 1)
    refs = reference_layers(agg)
    with torch.no_grad():
        for ref in refs[:-1]:
            x = ref(x, src_key_padding_mask=mask)
        normed = refs[-1].norm1(x)
        _, weights = refs[-1].self_attn(normed, normed, normed, key_padding_mask=mask,
                                         need_weights=True, average_attn_weights=True)
        x = refs[-1](x, src_key_padding_mask=mask)
        expected = agg.final_norm(x[:, :K])
    torch.testing.assert_close(out.concepts, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.slot_attention, weights[:, :K, K:], atol=1e-6, rtol=1e-5)
    assert (out.slot_attention[1, :, 2:] == 0).all()
    assert (out.slot_attention.sum(-1) <= 1 + 1e-6).all()


def test_padding_does_not_change_the_concepts():
    agg = aggregator()
    tokens = torch.randn(1, 4, D)
    alone = agg(tokens, torch.zeros(1, 4, dtype=torch.bool))
    padded_tokens = torch.cat([tokens, 100 * torch.randn(1, 3, D)], 1)  # garbage at padding
    padded = agg(padded_tokens, torch.tensor([[False] * 4 + [True] * 3]))
    torch.testing.assert_close(padded.concepts, alone.concepts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.slot_attention[..., :4], alone.slot_attention, atol=1e-6, rtol=1e-5)


def test_empty_codebook_sequence_and_gradients():
    agg = aggregator().train()
    out = agg(torch.zeros(2, 0, D), torch.zeros(2, 0, dtype=torch.bool))
    assert out.concepts.shape == (2, K, D) and out.slot_attention.shape == (2, K, 0)
    tokens = torch.randn(2, 6, D, requires_grad=True)
    agg(tokens, torch.zeros(2, 6, dtype=torch.bool)).concepts.sum().backward()
    assert tokens.grad.abs().sum() > 0 and agg.slot_queries.grad.abs().sum() > 0
