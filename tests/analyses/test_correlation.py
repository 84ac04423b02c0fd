"""Figure 8: OLS + confidence band + Pearson r/p, training-log pairs, per-instance IoUs."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from analyses.correlation import (concat_instance_ious, correlate, instance_ious, plot_correlation,
                                  records_xy)
from analyses.plotting import legend_texts, save_png


def test_hand_computed_three_points():
    # x = 0,1,2; y = 0,1,3: Sxx = 2, Sxy = 3, Syy = 14/3, SSE = 14/3 - 9/2 = 1/6.
    result = correlate([0, 1, 2], [0, 1, 3], n_grid=3)
    assert result.slope == pytest.approx(1.5) and result.intercept == pytest.approx(-1 / 6)
    r = 3 / math.sqrt(2 * 14 / 3)
    assert result.pearson_r == pytest.approx(r)
    t = r / math.sqrt(1 - r * r)  # 1 degree of freedom: Student t is Cauchy
    assert result.p_value == pytest.approx(1 - 2 / math.pi * math.atan(t))
    s = math.sqrt(1 / 6)
    t975 = 12.706204736174707  # t_{0.975, 1}
    half = [t975 * s * math.sqrt(1 / 3 + (x0 - 1) ** 2 / 2) for x0 in (0, 1, 2)]
    fit = [-1 / 6, 4 / 3, 17 / 6]
    assert np.allclose(result.band.x, [0, 1, 2])
    assert np.allclose(result.band.lower, np.subtract(fit, half))
    assert np.allclose(result.band.upper, np.add(fit, half))
    assert result.n == 3 and result.summary()["level"] == 0.95


def test_recovers_a_noisy_line_and_agrees_with_scipy():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 200)
    y = 2 * x + 0.5 + rng.normal(0, 0.1, 200)
    result = correlate(x, y)
    ref = stats.linregress(x, y)
    assert result.slope == pytest.approx(ref.slope) and result.intercept == pytest.approx(ref.intercept)
    assert result.pearson_r == pytest.approx(ref.rvalue) and result.p_value == pytest.approx(ref.pvalue, rel=1e-6)
    assert abs(result.slope - 2) < 0.06 and result.pearson_r > 0.98 and result.p_value < 1e-50
    width = result.band.upper - result.band.lower
    assert width.argmin() == pytest.approx(np.abs(result.band.x - x.mean()).argmin(), abs=1)  # narrowest at x̄


def test_independent_noise_is_not_significant():
    rng = np.random.default_rng(1)
    result = correlate(rng.normal(size=300), rng.normal(size=300))
    assert abs(result.pearson_r) < 0.15 and result.p_value > 0.01


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 3"):
        correlate([1, 2, np.nan], [1, 2, 3])
    with pytest.raises(ValueError, match="constant"):
        correlate([1, 1, 1], [1, 2, 3])


def test_records_from_a_training_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "sae_mse": 0.5, "mask_dice": 0.4}, {"step": 2, "eval_giou": 0.3},
               {"step": 3, "sae_mse": 0.2, "mask_dice": 0.1}, {"step": 4, "sae_mse": None, "mask_dice": 0.2}]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    x, y = records_xy(log)
    assert x.tolist() == [0.5, 0.2] and y.tolist() == [0.4, 0.1]
    with pytest.raises(ValueError, match="keys present: .*eval_giou"):
        records_xy(records, "mse", "dice")


def test_instance_ious_match_slots_to_instances():
    targets = np.zeros((2, 8, 8), bool)
    targets[0, 0:4, 0:4] = True  # 16 px
    targets[1, 4:8, 4:8] = True  # 16 px
    masks = np.zeros((3, 8, 8))
    masks[2] = targets[0]  # slot 2 predicts instance 0 exactly
    masks[0, 4:8, 4:6] = 0.9  # slot 0 covers half of instance 1
    heat = np.zeros((3, 8, 8))
    heat[2, 0:2, 0:4] = 0.8  # half of instance 0
    heat[0, 4:8, 0:8] = 0.7  # instance 1 plus as much outside
    out = instance_ious(heat, masks, targets)
    assert out.mask_iou.tolist() == [0.5, 1.0]  # ordered by slot: slot 0 -> instance 1, slot 2 -> instance 0
    assert out.heatmap_iou.tolist() == [0.5, 0.5]
    assert out.n_unmatched == 0
    few = instance_ious(heat[:1], masks[:1], targets)  # one slot, two instances
    assert few.n_unmatched == 1 and len(few.mask_iou) == 1
    both = concat_instance_ious([out, few])
    assert len(both.heatmap_iou) == 3 and both.n_unmatched == 1
    with pytest.raises(ValueError, match="share"):
        instance_ious(heat, masks[:2], targets)


def test_plot_has_points_line_band_and_annotation(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, 50)
    y = x + rng.normal(0, 0.2, 50)
    result = correlate(x, y)
    fig = plot_correlation(result, x, y, xlabel="heatmap IoU", ylabel="mask IoU", title="test time")
    path = save_png(fig, tmp_path / "fig8.png")
    assert path.stat().st_size > 10_000
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("heatmap IoU", "mask IoU")
    texts = legend_texts(fig)
    assert texts[0] == "points (n=50)" and texts[1].startswith("OLS") and texts[2] == "95% CI of the mean"
    assert any("Pearson r" in t.get_text() for t in ax.texts)
