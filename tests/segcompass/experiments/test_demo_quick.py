"""The main job's `--quick` variant end to end (issue 6: exercised in CI): world -> warm start
-> world SAM -> activation cache -> SAE -> SegCompass training -> evaluation -> analyses ->
reports -> index.html, every link and image of which resolves and which renders in
headless Chromium. Numbers are a smoke test only."""

import html.parser
import json
from pathlib import Path

import numpy as np
import pytest
from browser import screenshot
from PIL import Image

from segcompass.experiments.demo import EVAL_SPLITS, DemoConfig, run_demo


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        self.hrefs += [value for name, value in attrs if (tag, name) in (("a", "href"), ("img", "src"))]


@pytest.mark.slow
def test_quick_demo_runs_end_to_end_and_links_every_result(tmp_path, capsys):
    index = run_demo(DemoConfig(out=tmp_path / "demo", quick=True))
    assert index == tmp_path / "demo" / "index.html"
    parser = _Links()
    parser.feed(index.read_text())
    assert any(h.endswith("report.html") for h in parser.hrefs) and any(h.endswith(".png") for h in parser.hrefs)
    for href in parser.hrefs:
        assert (index.parent / href).is_file(), href
    metrics = json.loads((index.parent / "eval" / "metrics.json").read_text())["splits"]
    assert set(metrics) == set(EVAL_SPLITS)
    assert all(0 <= m["giou"] <= 1 for m in metrics.values())
    assert (index.parent / "analyses" / "causal" / "causal.json").is_file()  # the causal suite ran
    assert "Do the masks come from the SAE atoms?" in index.read_text() and "<table>" in index.read_text()
    printed = capsys.readouterr().out
    assert "results table:" in printed and f"index page: {index.resolve()}" in printed
    # a second call finds every stage done and redoes nothing
    before = {p: p.stat().st_mtime_ns for p in Path(index.parent).rglob("*.safetensors")}
    run_demo(DemoConfig(out=tmp_path / "demo", quick=True))
    assert {p: p.stat().st_mtime_ns for p in before} == before
    # the index page renders in headless Chromium, figures included (last: a machine that
    # cannot install Chromium skips only this part)
    shot = tmp_path / "index.png"
    screenshot(index, shot, tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.std() > 15 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 200, "index page did not render"
