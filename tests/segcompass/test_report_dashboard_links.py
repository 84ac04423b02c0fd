"""The prediction report links each listed atom to its page in a `saekit dashboard` folder
when one is given, and to nothing otherwise (or for atoms the dashboard does not hold)."""

import json

import numpy as np
from test_report_browser import hand_prediction

from saekit.dashboard import DASHBOARD_FILE, DASHBOARD_FORMAT
from segcompass.report import write_report


def _dashboard(folder, d_sae: int, atoms_per_page: int = 4):
    folder.mkdir(parents=True)
    (folder / DASHBOARD_FILE).write_text(json.dumps(
        {"format": DASHBOARD_FORMAT, "d_sae": d_sae, "atoms_per_page": atoms_per_page}))
    return folder


def test_atoms_link_to_their_dashboard_pages(tmp_path):
    image = np.full((64, 64, 3), 120, np.uint8)
    dash = _dashboard(tmp_path / "dash", d_sae=16)
    files = write_report(tmp_path / "report", image, "find it", hand_prediction(), dashboard=dash)
    page = files.html.read_text()
    assert '<a href="../dash/atoms/block_00001.html#atom-7" title="its dashboard page">7</a>' in page
    assert '<a href="../dash/atoms/block_00002.html#atom-9" title="its dashboard page">9</a>' in page


def test_no_links_without_a_dashboard_or_outside_it(tmp_path):
    image = np.full((64, 64, 3), 120, np.uint8)
    plain = write_report(tmp_path / "plain", image, "find it", hand_prediction()).html.read_text()
    assert "its dashboard page" not in plain
    small = _dashboard(tmp_path / "small", d_sae=8)  # holds atom 7, not atom 9
    page = write_report(tmp_path / "r", image, "find it", hand_prediction(), dashboard=small).html.read_text()
    assert "#atom-7" in page and "#atom-9" not in page
    missing = write_report(tmp_path / "m", image, "find it", hand_prediction(),
                           dashboard=tmp_path / "nowhere").html.read_text()
    assert "its dashboard page" not in missing
