"""The prediction report: hand-built cases for token shading and atom maps, escaping of every
piece of user/model text, self-containment, and a headless-Chromium screenshot that is not blank."""

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from browser import screenshot
from segcompass_tiny import tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)

from segcompass.predictor import AtomTrace, Prediction, PredictorConfig, ResponseToken, SlotTrace, TextFiring
from segcompass.report import atom_map, cot_html, predict_report, report_html, token_strength, write_report
from segcompass.template import parse_response

HOSTILE = 'the red <script>alert("x")</script> & "square" <b>'
HOSTILE_NAME = "<img src=x onerror=alert(1)> & red"


def hand_prediction(size: int = 64) -> Prediction:
    """One slot, two atoms on a 2 x 2 image grid, a five-token response (values chosen by hand)."""
    response = "<think> red square </think> <REF_POS>"
    mask = np.zeros((size, size), bool)
    mask[8:24, 40:56] = True
    atoms = [AtomTrace(7, 0.6, None, np.array([[0, 1]]), np.array([3.0], np.float32),
                       [TextFiring("red", 10, 1, "response", 2.0)]),
             AtomTrace(9, 0.2, None, np.array([[1, 0]]), np.array([1.0], np.float32),
                       [TextFiring("square", 11, 2, "response", 4.0), TextFiring("<b>", 5, -1, "prompt", 1.0)])]
    tokens = [ResponseToken("<think>", 9), ResponseToken(" red", 10), ResponseToken(" square", 11),
              ResponseToken(" </think>", 12), ResponseToken(" <REF_POS>", 13)]
    heatmap = np.zeros((1, 16, 16), np.float32)
    heatmap[0, 2:6, 10:14] = 0.9
    return Prediction(mask, mask[None], mask[None].astype(np.float32), heatmap, np.array([0.9], np.float32),
                      np.array([True]), response, parse_response(response, 1), [SlotTrace(0, atoms)], tokens,
                      (2, 2), (0, 0, size, size), False)


def test_token_shading_by_weight_times_activation():
    pred = hand_prediction()
    assert token_strength(pred, 0) == pytest.approx({10: 0.6 * 2.0, 11: 0.2 * 4.0, 5: 0.2 * 1.0})
    page = cot_html(pred, 0)
    alpha = dict(re.findall(r'rgba\(255,140,0,([0-9.]+)\)" title="[^"]*">([^<]*)<', page)[i][::-1]
                 for i in range(5))
    assert float(alpha["red"]) == pytest.approx(0.85)  # the strongest token
    assert float(alpha["square"]) == pytest.approx(0.85 * 0.8 / 1.2, abs=1e-3)
    assert float(alpha["&lt;think&gt;"]) == 0.0  # special tokens are text, escaped


def test_atom_map_colours_only_the_patches_where_the_atom_fires():
    image = np.full((64, 64, 3), 128, np.uint8)
    trace = hand_prediction().provenance[0].atoms[0]  # fires at (row 0, col 1) only
    amap = atom_map(image, trace, (2, 2), (0, 0, 64, 64), side=64).astype(int)
    grey = lambda block: (block[..., 0] == block[..., 1]).all() and (block[..., 1] == block[..., 2]).all()  # noqa: E731
    assert not grey(amap[:32, 32:])  # top-right: coloured by the activation
    assert grey(amap[:32, :32]) and grey(amap[32:, :32]) and grey(amap[32:, 32:])


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.sources = set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.sources += [value for name, value in attrs if name in ("src", "href")]


def test_report_escapes_text_and_is_self_contained(tmp_path):
    pred = hand_prediction()
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    files = write_report(tmp_path, image, HOSTILE, pred, atom_names={7: HOSTILE_NAME})
    page = files.html.read_text()
    assert "<script" not in page and "<img src=x" not in page
    assert html_escaped(HOSTILE) in page and html_escaped(HOSTILE_NAME) in page
    parser = _Tags()
    parser.feed(page)
    assert parser.tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "h4", "div", "p",
                           "span", "b", "br", "figure", "figcaption", "img", "table", "tr", "th", "td"}
    assert parser.sources and all(s.startswith("data:image/png;base64,") for s in parser.sources)
    record = json.loads(files.json.read_text())
    assert record["instruction"] == HOSTILE and record["chain_of_thought"] == "red square"
    atom = record["slots"][0]["top_atoms"][0]
    assert atom["name"] == HOSTILE_NAME and atom["image"] == [{"row": 0, "col": 1, "activation": 3.0}]
    assert atom["text"][0] == {"word": "red", "position": 10, "response_index": 1, "kind": "response",
                               "activation": 2.0}
    assert np.array_equal(np.asarray(Image.open(files.mask)) > 0, pred.mask)


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def test_report_from_tiny_checkpoint_renders_in_chromium(tiny_model, tmp_path):  # noqa: F811
    from segcompass.world.scenes import generate

    sample = generate("val", 1, seed=3)[0]
    config = PredictorConfig(max_new_tokens=16, top_atoms=4)
    pred, files = predict_report(tiny_model, sample.image, sample.instruction + " <script>&", tmp_path / "report",
                                 multi=True, config=config)
    assert len(pred.provenance) == 4 and json.loads(files.json.read_text())["multi"] is True
    page = files.html.read_text()
    assert "<script" not in page and "&lt;script&gt;&amp;" in page
    assert len(files.heatmaps) == 4 and all(p.is_file() for p in files.heatmaps)
    shot = tmp_path / "shot.png"
    screenshot(files.html, shot, tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1600, 1200)
    assert pixels.std() > 15, "screenshot is (nearly) one colour"
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 500, f"only {len(colours)} distinct colours: the images did not render"


def test_report_html_single_and_multi_labels():
    pred = hand_prediction()
    page = report_html(np.zeros((64, 64, 3), np.uint8), "x", pred, [b"png"])
    assert "single-object prompt" in page and "Slot 0 (top slot)" in page and "(unnamed)" in page
