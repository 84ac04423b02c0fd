"""`segcompass predict` on a real photo (voc-labelme, a 500 x 375 JPEG), not a world scene:
the mask comes back in the photo's own frame."""

import json

import numpy as np
from PIL import Image
from segcompass_tiny import tiny_checkpoint  # noqa: F401 (pytest fixture)


def test_predict_on_a_real_photo(tiny_checkpoint, fixtures_dir, tmp_path):  # noqa: F811
    from segcompass.cli import main

    photo = fixtures_dir / "labelme" / "2011_000003.jpg"
    out = tmp_path / "report"
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(photo), "the man on the left",
                 "--out", str(out), "--max-new-tokens", "8", "--top-atoms", "2"]) == 0
    with Image.open(photo) as image:
        width, height = image.size
    mask = np.asarray(Image.open(out / "mask.png"))
    assert mask.shape == (height, width)
    record = json.loads((out / "prediction.json").read_text())
    assert record["mask_area"] == int((mask > 0).sum()) and (out / "report.html").is_file()
