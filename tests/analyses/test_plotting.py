"""Shared analysis helpers: patch geometry against its loop definition, readable-figure checks,
atomic CSV/JSON writers."""

import json

import numpy as np
import pandas as pd
import pytest

from analyses.patches import (patch_areas, patch_fractions, patch_pixel_counts, patch_pixel_counts_reference,
                              rows_by_sample)
from analyses.plotting import (label_axes, legend_texts, missing_labels, new_figure, save_png, write_csv, write_json,
                               write_outputs)


@pytest.mark.parametrize("image_shape,grid", [((8, 8), (4, 4)), ((10, 7), (3, 2)), ((128, 128), (24, 24))])
def test_patch_counts_match_the_loop_definition(image_shape, grid):
    mask = np.random.default_rng(0).random(image_shape) > 0.6
    counts = patch_pixel_counts(mask, grid)
    assert np.array_equal(counts, patch_pixel_counts_reference(mask, grid))
    assert counts.sum() == mask.sum()  # the patches tile the image
    assert patch_areas(image_shape, grid).sum() == image_shape[0] * image_shape[1]
    assert np.allclose(patch_fractions(np.ones(image_shape, bool), grid), 1.0)


def test_patch_fractions_hand_case():
    mask = np.zeros((8, 8), bool)
    mask[0:3, 0:3] = True  # 2x2 patches: (0,0) full, (0,1) and (1,0) half, (1,1) a quarter
    expected = np.zeros((4, 4))
    expected[0, 0], expected[0, 1], expected[1, 0], expected[1, 1] = 1.0, 0.5, 0.5, 0.25
    assert np.allclose(patch_fractions(mask, (4, 4)), expected)
    with pytest.raises(ValueError, match="cannot tile"):
        patch_pixel_counts(mask, (9, 4))


def test_save_png_refuses_unlabelled_figures_and_writes_readable_ones(tmp_path):
    fig, (ax,) = new_figure()
    ax.plot([0, 1], [0, 1], label="a")
    ax.plot([0, 1], [1, 0], label="b")
    assert set(missing_labels(fig)) == {"axes 0: no x label", "axes 0: no y label",
                                        "axes 0: 2 labelled artists but no legend"}
    with pytest.raises(ValueError, match="not readable"):
        save_png(fig, tmp_path / "bad.png")
    label_axes(ax, "x", "y", "t")
    ax.legend()
    path = save_png(fig, tmp_path / "sub" / "good.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert legend_texts(fig) == ["a", "b"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_writers_round_trip(tmp_path):
    frame = pd.DataFrame({"k": [1, 2], "v": [0.5, np.nan]})
    assert pd.read_csv(write_csv(frame, tmp_path / "t.csv")).equals(frame)
    record = {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"), "d": (1, 2)}
    assert json.loads(write_json(record, tmp_path / "r.json").read_text()) == \
        {"a": 1.5, "b": [0, 1, 2], "c": None, "d": [1, 2]}


def test_write_outputs_writes_what_is_given(tmp_path):
    fig, (ax,) = new_figure()
    ax.plot([0, 1], [0, 1])
    label_axes(ax, "x", "y")
    written = write_outputs(tmp_path, "fig", table=pd.DataFrame({"a": [1]}), figure=fig, summary={"r": 0.5})
    assert {k: p.name for k, p in written.items()} == {"csv": "fig.csv", "png": "fig.png", "json": "fig.json"}
    assert write_outputs(tmp_path, "only", summary=[1]) == {"json": tmp_path / "only.json"}


def test_rows_by_sample_groups_in_order():
    samples = np.array([2, 0, 2, 1, 0, 2])
    selected = np.array([True, True, False, True, True, True])
    groups = rows_by_sample(selected, samples)
    assert list(groups) == [0, 1, 2]
    assert {k: v.tolist() for k, v in groups.items()} == {0: [1, 4], 1: [3], 2: [0, 5]}
    assert rows_by_sample(np.zeros(3, bool), np.zeros(3, int)) == {}
