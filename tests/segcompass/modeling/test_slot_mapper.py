"""Slot mapper: shapes and the per-head score formula of Eq. (5) against an explicit loop."""

import math

import torch
import torch.nn.functional as F

from segcompass.modeling.slot_mapper import SlotMapper

B, K, D_LLM, D_C, C, H, W, HEADS, DH = 2, 3, 24, 16, 12, 5, 6, 4, 8


def mapper(**kwargs) -> SlotMapper:
    torch.manual_seed(0)
    return SlotMapper(llm_dim=D_LLM, concept_dim=D_C, image_dim=C, query_dim=20, mlp_hidden=32,
                      num_heads=HEADS, head_dim=DH, map_hidden=8, **kwargs)


def test_shapes_and_per_head_reference():
    sm = mapper()
    e, r, image = torch.randn(B, K, D_LLM), torch.randn(B, K, D_C), torch.randn(B, C, H, W)
    out = sm(e, r, image)
    assert out.heatmap_logits.shape == (B, K, 4 * H, 4 * W)
    assert out.confidence_logits.shape == (B, K)

    # Slow reference: one head at a time, one slot at a time, keys as (h*w, C) rows.
    with torch.no_grad():
        q = sm.query_mlp(torch.cat([e, r], -1))  # (B, K, d_q)
        keys = image.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        w_k = sm.key_proj.weight[:, :, 0, 0]  # (N_h*d_h, C)
        heatmaps, pooled = [], []
        for b in range(B):
            for k in range(K):
                per_head = []
                for i in range(HEADS):
                    rows = slice(i * DH, (i + 1) * DH)
                    qi = q[b, k] @ sm.query_proj.weight[rows].T + sm.query_proj.bias[rows]
                    ki = keys[b] @ w_k[rows].T + sm.key_proj.bias[rows]
                    per_head.append((ki @ qi / math.sqrt(DH)).view(H, W))
                s = torch.stack(per_head)  # (N_h, H, W)
                pooled.append(torch.cat([s.amax((1, 2)), s.mean((1, 2)), q[b, k]]))
                heat = sm.map_head(s[None])
                heatmaps.append(F.interpolate(heat, scale_factor=4, mode="bilinear")[0, 0])
        expected_heat = torch.stack(heatmaps).view(B, K, 4 * H, 4 * W)
        expected_conf = sm.confidence_head(torch.stack(pooled)).view(B, K)
    torch.testing.assert_close(out.heatmap_logits, expected_heat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.confidence_logits, expected_conf, atol=1e-5, rtol=1e-5)


def test_score_only_confidence_and_gradients():
    sm = mapper(confidence_uses_query=False)
    e = torch.randn(B, K, D_LLM, requires_grad=True)
    out = sm(e, torch.randn(B, K, D_C), torch.randn(B, C, H, W))
    assert sm.confidence_head[0].in_features == 2 * HEADS
    (out.heatmap_logits.sum() + out.confidence_logits.sum()).backward()
    assert e.grad.abs().sum() > 0 and sm.key_proj.weight.grad.abs().sum() > 0


def test_neighbourhood_keys_match_an_explicit_3x3_window_sum():
    sm = mapper(key_kernel=3)
    e, r, image = torch.randn(B, K, D_LLM), torch.randn(B, K, D_C), torch.randn(B, C, H, W)
    with torch.no_grad():
        keys = sm.key_proj(image)  # (B, N_h*d_h, H, W)
        padded = F.pad(image, (1, 1, 1, 1))  # zero padding, as the conv's
        y, x = 2, 4  # one cell: the sum over its 3x3 window of W[:, :, dy, dx] @ image[y+dy-1, x+dx-1]
        expected = sm.key_proj.bias + sum(sm.key_proj.weight[:, :, dy, dx] @ padded[:, :, y + dy, x + dx].T
                                          for dy in range(3) for dx in range(3)).T
        torch.testing.assert_close(keys[:, :, y, x], expected, atol=1e-5, rtol=1e-5)
        # a change of the image two cells away from (y, x) leaves its key alone; one cell away does not
        far, near = image.clone(), image.clone()
        far[:, :, y, x - 2] += 1
        near[:, :, y, x - 1] += 1
        assert torch.equal(sm.key_proj(far)[:, :, y, x], keys[:, :, y, x])
        assert not torch.allclose(sm.key_proj(near)[:, :, y, x], keys[:, :, y, x])
    assert sm(e, r, image).heatmap_logits.shape == (B, K, 4 * H, 4 * W)


def test_even_key_kernel_is_refused():
    import pytest

    with pytest.raises(ValueError, match="key_kernel"):
        mapper(key_kernel=2)


def test_policy_image_keys_add_a_resized_projection_of_the_policy_tokens():
    sm = mapper(policy_dim=D_LLM)
    e, r, image = torch.randn(B, K, D_LLM), torch.randn(B, K, D_C), torch.randn(B, C, 8, 8)
    tokens = torch.randn(B, 16, D_LLM)  # a 4 x 4 grid of policy image tokens, raster order
    with torch.no_grad():
        keys = sm.keys(image, tokens)  # (B, N_h*d_h, 8, 8)
        # slow reference: project each token on its own, lay the 4 x 4 grid out by hand, resize
        norm, proj = sm.policy_key
        grid = torch.zeros(B, HEADS * DH, 4, 4)
        for b in range(B):
            for i in range(16):
                grid[b, :, i // 4, i % 4] = proj(norm(tokens[b, i]))
        expected = sm.key_proj(image) + F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
        torch.testing.assert_close(keys, expected, atol=1e-5, rtol=1e-5)
        # top-left token moves the top-left keys only, not the bottom-right ones
        moved = tokens.clone()
        moved[:, 0] += 3
        changed = (sm.keys(image, moved) - keys).abs().sum(1)  # (B, 8, 8)
        assert changed[:, 0, 0].min() > 0 and changed[:, 7, 7].max() == 0
    out = sm(e, r, image, tokens)
    assert out.heatmap_logits.shape == (B, K, 32, 32)


def test_policy_image_keys_refuse_missing_or_non_square_tokens():
    import pytest

    sm = mapper(policy_dim=D_LLM)
    e, r, image = torch.randn(B, K, D_LLM), torch.randn(B, K, D_C), torch.randn(B, C, H, W)
    with pytest.raises(ValueError, match="image tokens"):
        sm(e, r, image)
    with pytest.raises(ValueError, match="square grid"):
        sm(e, r, image, torch.randn(B, 12, D_LLM))
