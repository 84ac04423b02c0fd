"""LISA's ReasonSeg rasterisation (OpenCV 4.x polylines + fillPoly) reimplemented in numpy:
held to masks drawn by real OpenCV 4.8 (golden file), to its own slow reference, and to
live OpenCV when it can be imported."""

import json
from pathlib import Path

import numpy as np
import pytest

from segcompass.data import rasterize as R
from segcompass.data.reasonseg import read_shapes

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "lisa-raster"


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN_DIR / "golden.npz") as data:
        return {k: data[k] for k in data.files}


def _golden_polygons(golden):
    offsets, fill_off, line_off = (golden["poly_offsets"], golden["poly_fill_bits_offsets"],
                                   golden["poly_line_bits_offsets"])
    for i, (h, w) in enumerate(golden["poly_sizes"]):
        verts = golden["poly_vertices"][offsets[i]:offsets[i + 1]]
        fill = np.unpackbits(golden["poly_fill_bits"][fill_off[i]:fill_off[i + 1]])[:h * w]
        line = np.unpackbits(golden["poly_line_bits"][line_off[i]:line_off[i + 1]])[:h * w]
        yield (int(h), int(w), verts, fill.reshape(h, w).astype(bool),
               line.reshape(h, w).astype(bool))


def test_golden_was_drawn_by_opencv_4(golden):
    assert str(golden["opencv_version"]).startswith("4.")


def test_fill_and_outline_match_opencv_48_pixel_for_pixel(golden):
    n_outside = 0
    for h, w, verts, cv_fill, cv_line in _golden_polygons(golden):
        n_outside += int(((verts < 0) | (verts >= [w, h])).any())
        assert np.array_equal(R.fill_poly_mask(verts, h, w), cv_fill)
        assert np.array_equal(R.polyline_mask(verts, h, w), cv_line)
        assert not (cv_line & ~cv_fill).any()  # why lisa_shape_mask draws fillPoly alone
    assert n_outside > 30  # the clipped-edge path is exercised


def test_slow_reference_matches_opencv_48(golden):
    for k, (h, w, verts, cv_fill, _) in enumerate(_golden_polygons(golden)):
        if k % 3 == 0:  # the reference is a per-pixel loop: a third of the cases is plenty
            assert np.array_equal(R.reference_fill_poly(verts, h, w), cv_fill)


def test_line_pixels_match_reference_port():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w = rng.integers(2, 40, size=2)
        p = rng.integers(-20, 60, size=4)
        ys, xs = R.line_pixels(p[None, :2], p[None, 2:], int(h), int(w))
        expected = R.reference_line_pixels(*(int(v) for v in p), int(h), int(w))
        assert list(zip(ys.tolist(), xs.tolist())) == expected


@pytest.mark.parametrize("stem", ["2011_000003", "2011_000006", "2011_000025", "nested"])
def test_label_maps_of_real_annotations_match_lisa_with_opencv_48(golden, fixtures_dir, stem):
    path = (GOLDEN_DIR / "nested.json" if stem == "nested"
            else fixtures_dir / "labelme" / f"{stem}.json")
    anno = json.loads(path.read_text())
    shapes = read_shapes(anno, path)
    raster = R.lisa_label_map([(s.label, s.vertices) for s in shapes],
                              anno["imageHeight"], anno["imageWidth"])
    expected = golden[f"labelmap_{stem}"]
    assert np.array_equal(raster.label_map, expected)
    assert set(np.unique(expected)) <= {0, 1, 255}


def test_nested_shapes_paint_largest_first():
    # A small ignore triangle inside a larger target wins; a target inside a larger ignore wins.
    anno = json.loads((GOLDEN_DIR / "nested.json").read_text())
    shapes = read_shapes(anno, GOLDEN_DIR / "nested.json")
    assert [s.label for s in shapes].count("flag") == 0  # "flag" shapes are skipped
    raster = R.lisa_label_map([(s.label, s.vertices) for s in shapes], 48, 64)
    assert raster.label_map[18, 47] == R.IGNORE_VALUE  # inside the small ignore triangle
    assert raster.label_map[30, 50] == R.TARGET_VALUE  # target triangle below the small ignore
    assert raster.label_map[24, 23] == R.TARGET_VALUE  # target over the big ignore region
    assert raster.label_map[40, 40] == R.IGNORE_VALUE  # big ignore region alone
    assert raster.label_map[32, 7] == R.TARGET_VALUE  # small target in the ignore region
    areas = [int(m.sum()) for m in raster.shape_masks]
    assert [areas[i] for i in raster.draw_order] == sorted(areas, reverse=True)


def test_vertices_truncate_toward_zero_like_int32_cast():
    pts = [[-0.7, 3.9], [2.5, -1.2], [7.99, 0.0]]
    assert R.vertices_int32(pts).tolist() == np.array([pts], dtype=np.int32)[0].tolist()
    assert R.vertices_int32(pts).tolist() == [[0, 3], [2, -1], [7, 0]]


def test_live_opencv_agrees_when_available():
    cv2 = pytest.importorskip("cv2")
    if not cv2.__version__.startswith("4."):
        pytest.skip(f"OpenCV {cv2.__version__}: LISA's rasterisation is that of 4.x")
    rng = np.random.default_rng(7)
    for _ in range(100):
        h, w = rng.integers(4, 50, size=2)
        pts = np.stack([rng.uniform(-10, w + 10, 6), rng.uniform(-10, h + 10, 6)], 1)
        verts = np.array([pts], dtype=np.int32)
        m = np.zeros((h, w), np.uint8)
        cv2.polylines(m, verts, True, 1, 1)
        cv2.fillPoly(m, verts, 1)
        assert np.array_equal(R.lisa_shape_mask(verts[0], int(h), int(w)), m.astype(bool))
