"""`saekit dashboard`: a tiny-twin SAE's atoms over a `saekit cache` cache become paged,
self-contained HTML (index pages, blocks of atoms, images inline) with every data and
tokenizer string escaped; capturing from the data directly gives the same counts; headless
Chromium renders an atom page with its image patches."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.cli import main
from saekit.dashboard import atom_link
from saekit.dashboard.build import build_dashboard
from saekit.dashboard.config import DashboardConfig

D_SAE = 96
HOSTILE = 'the red <b>circle</b> & "square" <script>x</script>'
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "div", "a", "h1", "h2", "p", "b", "br",
                "span", "img", "table", "tr", "th", "td", "ul", "li", "svg", "rect"}


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dash")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        pixels[:, : 8 * (i + 1)] = (200, 30, 30)  # a red band of growing width
        Image.fromarray(pixels).save(root / f"{i}.png")
        text = HOSTILE if i == 2 else "find the red circle left of the big blue square"[: 14 + 6 * i]
        lines.append({"image": f"{i}.png", "text": text})
    (root / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["cache", "--model", "tiny-llava", "--data", str(root / "data.jsonl"), "--out",
                 str(root / "cache"), "--layers", "2", "--device", "cpu", "--no-progress"]) == 0
    assert main(["train", "--cache", str(root / "cache"), "--out", str(root / "sae"), "--architecture",
                 "topk", "--k", "8", "--d-sae", str(D_SAE), "--batch-size", "64", "--training-tokens",
                 str(64 * 12), "--warmup-steps", "2", "--lr", "2e-3", "--no-progress"]) == 0
    out = root / "dash"
    summary = build_dashboard(DashboardConfig(sae=root / "sae", data=root / "cache", out=out, top_examples=3,
                                              atoms_per_page=16, atoms_per_index=32, device="cpu"),
                              progress=False)
    return root, out, summary


def test_pages_are_paged_linked_and_escaped(setup):
    root, out, summary = setup
    assert summary.n_atoms == D_SAE and summary.n_samples == 6 and summary.n_pages == 6
    assert sorted(p.name for p in out.glob("index_*.html")) == [f"index_{i:05d}.html" for i in range(3)]
    assert sorted(p.name for p in (out / "atoms").glob("*.html")) == [f"block_{i:05d}.html" for i in range(6)]
    assert atom_link(out, 40) == out / "atoms" / "block_00002.html#atom-40"
    assert atom_link(out, D_SAE) is None and atom_link(root, 0) is None
    pages = [out / "index.html", *out.glob("index_*.html"), *(out / "atoms").glob("*.html")]
    for path in pages:
        text = path.read_text()
        parser = _Tags()
        parser.feed(text)
        assert parser.tags <= ALLOWED_TAGS, (path.name, parser.tags - ALLOWED_TAGS)
        for href in re.findall(r'href="([^"#]+)', text):  # every relative link resolves
            assert (path.parent / href).is_file(), (path.name, href)
        assert "<unk>" not in text and "<s>" not in text
    atoms = "".join(p.read_text() for p in (out / "atoms").glob("*.html"))
    assert "&lt;s&gt;" in atoms  # the BOS token, shown as text
    assert atoms.count('class="atom"') == D_SAE
    record = json.loads((out / "dashboard.json").read_text())
    assert record["d_sae"] == D_SAE and record["layer"] == 2 and record["n_tokens"] == summary.n_tokens


def _pngs(text: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB"))
            for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def test_atom_sections_show_patch_heat_histogram_share_and_promoted_tokens(setup):
    _, out, _ = setup
    record = json.loads((out / "dashboard.json").read_text())
    home = (out / "index.html").read_text()
    top = int(re.search(r"most frequent atoms</h2><p><a href=\"atoms/block_\d+\.html#atom-(\d+)\"", home).group(1))
    text = (out / "atoms" / f"block_{top // 16:05d}.html").read_text()
    section = text[text.index(f'id="atom-{top}"'):]
    section = section[: section.find('<div class="atom"', 1) if '<div class="atom"' in section[1:] else None]
    assert "<svg" in section and "image " in section and "promotes" in section
    assert section.count('class="ex"') == 3
    images = _pngs(section)
    assert images and images[0].shape == (144, 144, 3)
    heat = [(img[..., 0].astype(int) - img[..., 2]).max() for img in images]
    assert max(heat) > 60  # some patch is tinted orange where the atom fires
    assert record["live_atoms"] > 0


def test_capturing_from_the_data_gives_the_cache_s_counts(setup, tmp_path):
    root, out, summary = setup
    direct = build_dashboard(DashboardConfig(sae=root / "sae", data=root / "data.jsonl", out=tmp_path / "d",
                                             top_examples=3, atoms_per_page=16, atoms_per_index=32,
                                             device="cpu"), progress=False)
    assert (direct.n_tokens, direct.n_samples, direct.n_live) == (summary.n_tokens, summary.n_samples,
                                                                  summary.n_live)
    a, b = (json.loads((d / "dashboard.json").read_text()) for d in (out, tmp_path / "d"))
    assert a["live_atoms"] == b["live_atoms"]


def test_chromium_renders_an_atom_page_with_its_patches(setup, tmp_path):
    from browser import screenshot

    _, out, _ = setup
    shot = tmp_path / "atoms.png"
    screenshot(out / "atoms" / "block_00000.html", shot, tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 10  # not a blank page
    orange = (pixels[..., 0] > 180) & (pixels[..., 1] > 60) & (pixels[..., 1] < 170) & (pixels[..., 2] < 90)
    assert orange.sum() > 50  # the heat drawn over the pictures is on screen
    home = tmp_path / "home.png"
    screenshot(out / "index.html", home, tmp_path / "profile2")
    assert np.asarray(Image.open(home).convert("L")).std() > 5
