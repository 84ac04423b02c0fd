"""`segcompass score` refuses nonsense instead of scoring it with exit 0 (issue 25, item 5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from saekit.errors import UserError
from segcompass.cli import main
from segcompass.data.reasonseg import read_truth


def _gt(folder, points):
    folder.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(folder / "a.png")
    (folder / "a.json").write_text(json.dumps({"text": ["x"], "shapes": [{"label": "t", "points": points}]}))
    return folder


def test_a_polygon_past_int32_is_refused(tmp_path):
    """The trial: a GT polygon at 1e30 only warned (numpy's int32 cast is undefined there)."""
    gt = _gt(tmp_path / "gt", [[1, 1], [1e30, 1], [5, 5]])
    with pytest.raises(UserError, match=r"a\.json: field 'shapes\[0\]\.points' must be .* within"):
        read_truth(gt / "a.json", 20, 30)
    assert read_truth(_gt(tmp_path / "far", [[1, 1], [1e9, 1], [5, 5]]) / "a.json", 20, 30).target.any()


def test_an_empty_prediction_folder_is_refused_unless_asked(tmp_path, capsys):
    """The trial: `score` with an empty prediction folder exited 0."""
    gt = _gt(tmp_path / "gt", [[1, 1], [10, 1], [10, 10]])
    (tmp_path / "pred").mkdir()
    assert main(["score", str(gt), str(tmp_path / "pred")]) == 2
    assert "--allow-empty" in capsys.readouterr().err
    assert main(["score", str(gt), str(tmp_path / "pred"), "--allow-empty", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["missing_predictions"] == 1
