"""ReasonSeg loader on a real-format folder built from the fixture photos and polygons."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loaders_fixtures import STEMS, build_reasonseg
from saekit.errors import UserError
from segcompass.data.reasonseg import image_size, load_reasonseg

GOLDEN = Path(__file__).resolve().parents[2] / "fixtures" / "lisa-raster" / "golden.npz"


@pytest.fixture()
def reasonseg_dir(fixtures_dir, tmp_path):
    return build_reasonseg(fixtures_dir, tmp_path / "val")


def test_samples_carry_lisa_label_maps_photos_and_texts(reasonseg_dir, fixtures_dir):
    samples = load_reasonseg(reasonseg_dir)
    assert [s.sample_id for s in samples] == sorted(STEMS.values())
    with np.load(GOLDEN) as golden:
        for k, sample in enumerate(samples):
            expected = golden[f"labelmap_{sample.sample_id}"]  # drawn by OpenCV 4.8
            photo = np.asarray(Image.open(fixtures_dir / "labelme" / f"{sample.sample_id}.jpg"))
            assert np.array_equal(sample.image, photo)
            assert sample.target_masks.shape == (1, *photo.shape[:2])
            assert np.array_equal(sample.target_masks[0], expected == 1)
            ignore = (np.zeros(photo.shape[:2], bool) if sample.ignore_mask is None
                      else sample.ignore_mask)
            assert np.array_equal(ignore, expected == 255)
            assert sample.instructions == (f"what in this picture could {sample.sample_id} be?",)
            assert sample.meta["is_sentence"] == (k % 2 == 0)
            assert len(sample.meta["shape_masks"]) == len(sample.meta["shape_labels"])
    assert samples[0].ignore_mask is not None and samples[0].ignore_mask.sum() > 0
    assert samples[2].ignore_mask is None  # 2011_000025 has no ignore region


def _edit(path, edit):
    anno = json.loads(path.read_text())
    edit(anno)
    path.write_text(json.dumps(anno))


def test_polygon_with_fewer_than_three_points_names_file_and_field(reasonseg_dir):
    path = reasonseg_dir / "2011_000025.json"
    _edit(path, lambda a: a["shapes"][2].update(points=a["shapes"][2]["points"][:2]))
    samples = load_reasonseg(reasonseg_dir)
    with pytest.raises(UserError, match=r"2011_000025\.json: field 'shapes\[2\]\.points' has 2 "
                                        r"point\(s\); a polygon needs at least 3"):
        samples[2]


def test_malformed_fields_and_missing_images_are_named(reasonseg_dir):
    path = reasonseg_dir / "2011_000003.json"
    _edit(path, lambda a: a["shapes"][0].update(shape_type="rectangle"))
    with pytest.raises(UserError, match=r"field 'shapes\[0\]\.shape_type' is 'rectangle'"):
        load_reasonseg(reasonseg_dir)[0]
    _edit(path, lambda a: (a["shapes"][0].update(shape_type="polygon"), a.pop("text")))
    with pytest.raises(UserError, match=r"2011_000003\.json: field 'text'"):
        load_reasonseg(reasonseg_dir)[0]
    (reasonseg_dir / "2011_000006.jpg").unlink()
    with pytest.raises(UserError, match=r"2011_000006\.json: no image 2011_000006"):
        load_reasonseg(reasonseg_dir)
    with pytest.raises(UserError, match="folder not found"):
        load_reasonseg(reasonseg_dir / "nope")


def test_exif_rotation_is_applied_like_cv2_imread(tmp_path):
    # A 40x20 (w x h) JPEG whose EXIF says "rotate 90": cv2.imread returns it 40 tall.
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif)
    (tmp_path / "rot.json").write_text(json.dumps({
        "text": ["x"], "is_sentence": False,
        "shapes": [{"label": "target", "points": [[1, 1], [10, 1], [10, 30]]}]}))
    assert image_size(tmp_path / "rot.jpg") == (40, 20)
    sample = load_reasonseg(tmp_path)[0]
    assert sample.image.shape == (40, 20, 3) and sample.target_masks.shape == (1, 40, 20)
