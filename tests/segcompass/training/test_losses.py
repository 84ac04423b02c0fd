"""Hungarian matching on soft IoU and the segmentation / confidence losses, on hand-made cases."""

import math

import pytest
import torch

from segcompass.training.losses import SegLossConfig, dice_loss, segmentation_loss
from segcompass.matching import hungarian_match, match_slots, soft_iou

BIG = 30.0  # a logit whose sigmoid is 1 to within 1e-13


def square(size: int, top: int, left: int, side: int) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[top:top + side, left:left + side] = 1
    return mask


def as_logits(mask: torch.Tensor) -> torch.Tensor:
    return (mask * 2 - 1) * BIG


def test_soft_iou_hand_computed():
    probs = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # intersection 1.5, union 1.5 + 2 - 1.5 = 2
    assert soft_iou(probs, target).item() == pytest.approx(0.75, abs=1e-6)


def test_hungarian_beats_greedy_and_handles_rectangles():
    match = hungarian_match(torch.tensor([[0.9, 0.8], [0.85, 0.1]]))
    assert match.slot.tolist() == [0, 1] and match.target.tolist() == [1, 0]  # 1.65, not greedy 1.0
    torch.testing.assert_close(match.score, torch.tensor([0.8, 0.85]))
    more_slots = hungarian_match(torch.tensor([[0.1], [0.7], [0.3]]))
    assert more_slots.slot.tolist() == [1] and more_slots.target.tolist() == [0]
    more_targets = hungarian_match(torch.tensor([[0.2, 0.9, 0.4]]))
    assert more_targets.slot.tolist() == [0] and more_targets.target.tolist() == [1]
    assert len(hungarian_match(torch.zeros(3, 0)).slot) == 0


def test_match_slots_finds_the_right_slot():
    a, b = square(8, 0, 0, 4), square(8, 4, 4, 4)
    probs = torch.stack([b, torch.zeros(8, 8), a])  # slot 0 ~ b, slot 2 ~ a
    match = match_slots(probs, torch.stack([a, b]))
    assert dict(zip(match.slot.tolist(), match.target.tolist())) == {0: 1, 2: 0}


def test_perfect_prediction_gives_near_zero_loss():
    target = square(16, 2, 3, 6)
    heat = torch.stack([as_logits(torch.zeros(16, 16)), as_logits(target)])[None]  # slot 1 is right
    mask = heat.clone()
    conf = torch.tensor([[-BIG, BIG]])
    out = segmentation_loss(heat, mask, conf, [target[None]])
    assert out.matches[0].slot.tolist() == [1]
    assert out.heatmap_bce.item() < 1e-6 and out.mask_dice.item() < 1e-6 and out.conf.item() < 1e-6
    assert out.total.item() < 1e-6
    assert (out.num_matched, out.num_targets, out.num_unmatched_targets) == (1, 1, 0)


def test_uninformed_prediction_hand_computed():
    """Zero logits: p = 0.5 everywhere. BCE = ln 2; Dice = 1 - (2*0.5a + 1) / (0.5n + a + 1)."""
    n, area = 64, 9
    target = square(8, 1, 1, 3)
    zeros = torch.zeros(1, 2, 8, 8)
    out = segmentation_loss(zeros, zeros, torch.zeros(1, 2), [target[None]], SegLossConfig())
    dice = 1 - (area + 1) / (0.5 * n + area + 1)
    assert out.heatmap_bce.item() == pytest.approx(math.log(2), rel=1e-5)
    assert out.mask_dice.item() == pytest.approx(dice, rel=1e-5)
    assert out.conf.item() == pytest.approx(math.log(2), rel=1e-5)
    assert out.seg.item() == pytest.approx(math.log(2) + 0.6 * dice, rel=1e-5)
    assert out.total.item() == pytest.approx(math.log(2) + 0.6 * dice + 0.2 * math.log(2), rel=1e-5)
    assert dice_loss(torch.zeros(1, 8, 8), target[None]).item() == pytest.approx(dice, rel=1e-5)


def test_no_target_sample_trains_confidence_down_and_gives_no_seg_loss():
    heat = torch.randn(2, 3, 8, 8, requires_grad=True)
    mask = torch.randn(2, 3, 8, 8, requires_grad=True)
    conf = torch.zeros(2, 3, requires_grad=True)
    targets = [torch.zeros(0, 8, 8), square(8, 0, 0, 4)[None]]
    out = segmentation_loss(heat, mask, conf, targets)
    out.total.backward()
    assert len(out.matches[0].slot) == 0 and out.num_matched == 1
    assert (conf.grad[0] > 0).all()  # gradient descent lowers every confidence of sample 0
    assert (heat.grad[0] == 0).all() and (mask.grad[0] == 0).all()
    matched = out.matches[1].slot.item()
    assert conf.grad[1, matched] < 0  # the matched slot of sample 1 is pushed up

    only_empty = segmentation_loss(heat[:1], mask[:1], conf[:1], targets[:1])
    assert only_empty.seg.item() == 0 and only_empty.seg.requires_grad
    assert only_empty.conf.item() == pytest.approx(math.log(2), rel=1e-6)


def test_more_targets_than_slots_is_counted_not_fatal():
    targets = torch.stack([square(16, 4 * i, 4 * i, 3) for i in range(4)])
    out = segmentation_loss(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16), torch.zeros(1, 2), [targets])
    assert (out.num_matched, out.num_targets, out.num_unmatched_targets) == (2, 4, 2)
    assert sorted(out.matches[0].slot.tolist()) == [0, 1]


def test_targets_at_another_resolution_are_area_resized():
    target = square(32, 8, 8, 16)  # 32^2 target against 16^2 predictions
    small = as_logits(square(16, 4, 4, 8))[None, None]
    out = segmentation_loss(small, small, torch.full((1, 1), BIG), [target[None]])
    assert out.total.item() < 1e-6
    mismatched = segmentation_loss(small, small, torch.zeros(1, 1), [target[None]],
                                   SegLossConfig(match_on="heatmap"))
    assert mismatched.mask_dice.item() < 1e-6


def test_config_is_checked():
    with pytest.raises(ValueError, match="dice_weight"):
        SegLossConfig(dice_weight=-1)
    with pytest.raises(ValueError, match="target sets"):
        segmentation_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.zeros(2, 1), [torch.zeros(0, 4, 4)])


def test_active_slots_restrict_matching_to_the_prompted_slots():
    """A single-object prompt asks for one concentration token: only slot 0 may take the target,
    even when another slot happens to fit it better; the rest learn confidence 0."""
    import torch

    from segcompass.training.losses import segmentation_loss

    target = torch.zeros(1, 8, 8)
    target[0, :4, :4] = 1
    mask = torch.full((1, 3, 8, 8), -8.0)
    mask[0, 2, :4, :4] = 8.0  # slot 2 is the perfect fit
    heat = mask.clone()
    conf = torch.zeros(1, 3)
    free = segmentation_loss(heat, mask, conf, [target])
    assert free.matches[0].slot.tolist() == [2]
    single = segmentation_loss(heat, mask, conf, [target], active_slots=[1])
    assert single.matches[0].slot.tolist() == [0]
    assert single.mask_dice.item() > 0.9  # slot 0 predicts nothing there: a large Dice loss


def test_heatmap_dice_term_adds_exactly_its_weight():
    import torch

    from segcompass.training.losses import SegLossConfig, dice_loss, segmentation_loss

    torch.manual_seed(0)
    heat, mask = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    conf = torch.zeros(2, 3)
    targets = [torch.rand(1, 8, 8).round(), torch.rand(2, 8, 8).round()]
    base = segmentation_loss(heat, mask, conf, targets)
    extra = segmentation_loss(heat, mask, conf, targets, SegLossConfig(heatmap_dice_weight=0.5))
    pairs = [(b, int(s), int(t)) for b, m in enumerate(base.matches) for s, t in zip(m.slot, m.target)]
    heat_dice = torch.stack([dice_loss(heat[b, s][None], targets[b][t][None])[0] for b, s, t in pairs]).mean()
    torch.testing.assert_close(extra.seg - base.seg, 0.5 * heat_dice)
