"""Figure 8: OLS + confidence band + Pearson r/p; the training panel with the step held fixed
(series that only share a step trend vs a true within-step relation); the heatmap scored on the
referred vs the other objects of an image."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from analyses.correlation import (concat_referred_vs_other, correlate, object_scores, partial_correlation,
                                  plot_correlation, plot_referred_vs_other, poisson_binomial_sf, records_xy,
                                  referred_vs_other, residualize, step_basis, training_series)
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
    with pytest.raises(ValueError, match="at least 5 .*2 covariates"):
        correlate([1, 2, 3, 4], [1, 2, 3, 5], covariates=2)
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


def test_training_series_keeps_the_step():
    records = [{"step": 10, "sae_mse": 0.5, "mask_dice": 0.4}, {"eval_giou": 0.3},
               {"sae_mse": 0.2, "mask_dice": 0.1}, {"step": 30, "sae_mse": True, "mask_dice": 0.2}]
    series = training_series(records)
    assert series.step.tolist() == [10.0, 2.0]  # no step: the record's position in the log
    assert series.x.tolist() == [0.5, 0.2] and series.y.tolist() == [0.4, 0.1]


def trending_pair(seed: int, coupling: float, n: int = 300):
    """x and y both follow a fast-then-slow step trend (as losses do) plus independent noise;
    y also gets `coupling` times x's noise (a relation that holds at a fixed step)."""
    rng = np.random.default_rng(seed)
    step = np.arange(n, dtype=float) * 10
    trend = 1 / (1 + step / 300)
    noise = rng.normal(0, 0.05, n)
    return step, 0.5 + trend + noise, 0.2 + 0.6 * trend + coupling * noise + rng.normal(0, 0.05, n)


def test_series_that_only_share_the_step_trend_have_no_partial_correlation():
    step, x, y = trending_pair(0, coupling=0.0)
    result = partial_correlation(x, y, step)
    assert result.raw.pearson_r > 0.8 and result.raw.p_value < 1e-50  # what the uncontrolled panel shows
    assert abs(result.partial.pearson_r) < 0.1 and result.partial.p_value > 0.05
    assert result.n_step_terms == 2 + 8 and result.partial.n == 300


def test_a_within_step_relation_survives_the_control():
    step, x, y = trending_pair(1, coupling=0.8)
    result = partial_correlation(x, y, step)
    assert result.partial.pearson_r > 0.5 and result.partial.p_value < 1e-20
    assert result.partial.slope == pytest.approx(0.8, abs=0.12)
    # shuffling y within the (constant-trend) residuals breaks the relation again
    rng = np.random.default_rng(2)
    assert abs(correlate(result.x_residual, rng.permutation(result.y_residual)).pearson_r) < 0.15


def test_partial_fit_equals_the_full_regression():
    """Frisch-Waugh-Lovell: slope, t and p of x in y ~ 1 + x + step terms equal the residual fit's."""
    step, x, y = trending_pair(3, coupling=0.3, n=80)
    result = partial_correlation(x, y, step)
    basis = step_basis(step)
    design = np.column_stack([np.ones(len(x)), x, basis])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    dof = len(x) - design.shape[1]
    sigma2 = ((y - design @ coef) ** 2).sum() / dof
    se = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[1, 1])
    assert result.partial.slope == pytest.approx(coef[1])
    assert result.partial.p_value == pytest.approx(2 * stats.t.sf(abs(coef[1] / se), dof), rel=1e-6)
    assert np.allclose(residualize(basis[:, 0] * 3 + 1, basis), 0, atol=1e-9)  # the trend itself is absorbed
    with pytest.raises(ValueError, match="one value per point"):
        partial_correlation(x, y[:-1], step)


def test_object_scores_and_the_referred_comparison():
    objects = np.zeros((3, 8, 8), bool)
    objects[0, 0:2, 0:2] = True  # 4 px
    objects[1, 4:8, 4:8] = True  # 16 px
    objects[2, 0:4, 6:8] = True  # 8 px
    heat = np.full((2, 8, 8), 0.1)
    heat[1, 0:2, 0:2] = 0.9  # slot 1 lights object 0
    heat[1, 4:8, 4:6] = 0.5  # and half of object 1
    assert object_scores(heat[1], objects).tolist() == pytest.approx([0.9, 0.3, 0.1])
    assert np.isnan(object_scores(heat[1], np.zeros((1, 8, 8), bool))).all()
    confident = [0.2, 0.7]  # slot 1 is scored
    assert referred_vs_other(heat, confident, objects, [0]) == pytest.approx((0.9, 0.3, 1 / 3))
    assert referred_vs_other(heat, confident, objects, [1, 2]) == pytest.approx((0.3, 0.9, 2 / 3))
    assert referred_vs_other(heat, [0.9, 0.1], objects, [0]) == pytest.approx((0.1, 0.1, 1 / 3))  # slot 0: flat
    assert referred_vs_other(heat, confident, objects, []) is None  # no target
    assert referred_vs_other(heat, confident, objects[:1], [0]) is None  # nothing to compare with
    both = concat_referred_vs_other([referred_vs_other(heat, confident, objects, [0]), None,
                                     referred_vs_other(heat, confident, objects, [1, 2]),
                                     referred_vs_other(heat, [0.9, 0.1], objects, [0])])
    assert both.sample.tolist() == [0, 2, 3] and both.n_skipped == 1
    summary = both.summary()
    assert summary["hit_rate"] == pytest.approx(1 / 3) and summary["tie_rate"] == pytest.approx(1 / 3)
    assert summary["chance_rate"] == pytest.approx(4 / 9)
    assert summary["hit_p_value"] == pytest.approx(1 - (2 / 3) * (1 / 3) * (2 / 3))  # P(at least one hit)


def test_hits_against_chance():
    assert poisson_binomial_sf(7, [0.25] * 20) == pytest.approx(stats.binom.sf(6, 20, 0.25))
    assert poisson_binomial_sf(0, [0.3, 0.5]) == 1.0 and poisson_binomial_sf(3, [0.3, 0.5]) == 0.0
    rng = np.random.default_rng(4)
    n_objects = rng.integers(2, 7, 400)
    chance = 1 / n_objects
    blind = np.array([rng.integers(0, k) == 0 for k in n_objects])  # the best object drawn at random
    assert 0.05 < poisson_binomial_sf(int(blind.sum()), chance) < 0.95


def test_referred_plot(tmp_path):
    rng = np.random.default_rng(5)
    parts = [referred_vs_other(rng.random((2, 8, 8)), rng.random(2), rng.random((4, 8, 8)) > 0.5, [0])
             for _ in range(30)]
    fig = plot_referred_vs_other(concat_referred_vs_other(parts), title="heatmap vs ground truth")
    path = save_png(fig, tmp_path / "referred.png")
    assert path.stat().st_size > 10_000
    assert legend_texts(fig) == ["images (n=30)", "y = x (no preference)"]
    assert any("chance" in t.get_text() for t in fig.axes[0].texts)


def test_plot_has_points_line_band_and_annotation(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, 50)
    y = x + rng.normal(0, 0.2, 50)
    result = correlate(x, y)
    fig = plot_correlation(result, x, y, xlabel="SAE MSE", ylabel="Dice loss", title="training", note="raw r = 0.9")
    path = save_png(fig, tmp_path / "fig8.png")
    assert path.stat().st_size > 10_000
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("SAE MSE", "Dice loss")
    texts = legend_texts(fig)
    assert texts[0] == "points (n=50)" and texts[1].startswith("OLS") and texts[2] == "95% CI of the mean"
    assert any("Pearson r" in t.get_text() and "raw r = 0.9" in t.get_text() for t in ax.texts)
