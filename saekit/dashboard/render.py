"""HTML of the dashboard's pages. Every piece of text from the data, the model or the
tokenizer goes through `html.escape`; images are inline base64 PNGs."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps

from saekit.inputs import TokenType
from saekit.plot import bar_chart_svg

THUMB = 144
"""Pixel side of an example's picture."""
HEAT = np.array([255, 96, 0], dtype=np.float32)
"""Colour of a patch where the atom fires (alpha grows with the activation)."""
STYLE = """<style>
body{font-family:system-ui,sans-serif;margin:1.2em;color:#222;max-width:1400px}
a{color:#2456a4;text-decoration:none} a:hover{text-decoration:underline}
table{border-collapse:collapse} td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left;font-size:13px}
.atom{border:1px solid #ccc;border-radius:6px;padding:8px 12px;margin:14px 0}
.examples{display:flex;flex-wrap:wrap;gap:10px}
.ex{width:300px;border:1px solid #eee;padding:4px;font-size:12px}
.ex img{display:block;width:144px;height:auto;image-rendering:pixelated}
.tok{padding:0 1px;border-radius:2px} .special{color:#999} .img{color:#777;font-style:italic}
.muted{color:#777;font-size:12px} .bar{display:inline-block;height:10px;background:#4a6fb4}
.nav{margin:8px 0}
</style>"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(image: Image.Image, family: str, side: int = THUMB) -> Image.Image:
    """The picture as the model saw it: LLaVA's processor centre-crops a square, Qwen2.5-VL
    keeps the whole image."""
    image = image.convert("RGB")
    if family == "llava":
        return ImageOps.fit(image, (side, side), Image.Resampling.BICUBIC)
    scale = side / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                        Image.Resampling.BICUBIC)


def overlay_png(thumb: Image.Image, cells: np.ndarray, acts: np.ndarray, grid: tuple[int, int],
                peak: float) -> bytes:
    """PNG of `thumb` with each image-grid cell (row, col) tinted by act / peak (alpha up to
    0.75); the rest of the picture dimmed so the tint reads."""
    rows, cols = grid
    base = np.asarray(thumb, dtype=np.float32) * 0.55 + 255 * 0.45 * 0.25  # (H, W, 3) dimmed
    alpha = np.zeros((rows, cols), np.float32)
    for (r, c), a in zip(cells.tolist(), acts.tolist()):
        if 0 <= r < rows and 0 <= c < cols:
            alpha[r, c] = max(alpha[r, c], min(a / peak, 1.0) * 0.75 if peak > 0 else 0.0)
    h, w = base.shape[:2]
    ys = np.minimum(np.arange(h) * rows // h, rows - 1)
    xs = np.minimum(np.arange(w) * cols // w, cols - 1)
    a = alpha[ys][:, xs][..., None]  # (H, W, 1) nearest-cell upsampling
    out = base * (1 - a) + HEAT * a
    buffer = io.BytesIO()
    Image.fromarray(out.clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def tokens_html(tokens: Sequence[str], types: Sequence[int], acts: dict[int, float], peak: float) -> str:
    """The sample's tokens in order, text shaded by the atom's activation (title = value);
    the image positions collapsed into one marker that says how many fire."""
    out, run = [], 0
    image_fired = 0
    for pos, (token, kind) in enumerate(zip(tokens, types)):
        if kind == TokenType.IMAGE:
            run += 1
            image_fired += pos in acts
            continue
        if run:
            out.append(f'<span class="img">[image: {run} patches, {image_fired} fire]</span> ')
            run = image_fired = 0
        a = acts.get(pos, 0.0)
        alpha = min(a / peak, 1.0) if peak > 0 else 0.0
        cls = "tok special" if kind == TokenType.SPECIAL else "tok"
        out.append(f'<span class="{cls}" style="background:rgba(255,140,0,{alpha:.2f})" '
                   f'title="{a:.3g}">{html.escape(token)}</span> ')
    if run:
        out.append(f'<span class="img">[image: {run} patches, {image_fired} fire]</span>')
    return "".join(out)


class ExampleView(NamedTuple):
    sample: int
    value: float
    image_png: bytes | None
    text_html: str


class AtomView(NamedTuple):
    atom: int
    fires: np.ndarray
    """(4,) firings per token type."""
    n_tokens: int
    peak: float
    hist: np.ndarray
    promoted: list[tuple[str, float]]
    examples: list[ExampleView]


def _share(fires: np.ndarray) -> str:
    total = int(fires.sum())
    if total == 0:
        return "never fires on this data"
    image = fires[TokenType.IMAGE] / total
    text = (fires[TokenType.PROMPT] + fires[TokenType.RESPONSE]) / total
    return (f'image {image:.0%} <span class="bar" style="width:{60 * image:.0f}px"></span> '
            f'text {text:.0%} <span class="bar" style="width:{60 * text:.0f}px;background:#e08a2c"></span>'
            f' special {fires[TokenType.SPECIAL] / total:.0%}')


def atom_section(view: AtomView, edges: Sequence[float]) -> str:
    total = int(view.fires.sum())
    density = total / max(view.n_tokens, 1)
    promoted = ", ".join(f"{html.escape(tok)} <span class=muted>({v:+.3g})</span>" for tok, v in view.promoted)
    examples = "".join(
        f'<div class="ex"><b>sample {ex.sample}</b> <span class="muted">max {ex.value:.3g}</span>'
        + (f'<img src="{data_uri(ex.image_png)}" alt="atom {view.atom} on sample {ex.sample}">'
           if ex.image_png else "")
        + f"<div>{ex.text_html}</div></div>" for ex in view.examples)
    hist = bar_chart_svg(view.hist.tolist(), label=f"log10 activation {edges[0]:g} .. {edges[-1]:g}")
    return (f'<div class="atom" id="atom-{view.atom}"><h2>atom {view.atom}</h2>'
            f"<p>fires on {total} of {view.n_tokens} tokens (density {density:.3g}); max activation "
            f"{view.peak:.3g}</p><p>{_share(view.fires)}</p>"
            f'<p>activation histogram <span class="muted">(log10, {edges[0]:g} .. {edges[-1]:g})</span><br>'
            f"{hist}</p><p><b>promotes</b>: {promoted}</p>"
            f'<div class="examples">{examples or "<p class=muted>no example</p>"}</div></div>')


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title>{STYLE}</head><body>{body}</body></html>\n")


def nav(links: Sequence[tuple[str, str | None]]) -> str:
    """A row of links; (label, None) renders as plain text."""
    parts = [f'<a href="{href}">{html.escape(label)}</a>' if href else html.escape(label)
             for label, href in links]
    return f'<div class="nav">{" · ".join(parts)}</div>'
