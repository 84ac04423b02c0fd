"""Small PNG and SVG bar charts drawn with Pillow / plain strings (saekit needs no plotting
library): the feature-density histogram of `saekit eval` and the activation histograms of
`saekit dashboard`."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont


def bar_chart_png(counts: Sequence[float], edges: Sequence[float], *, title: str, xlabel: str,
                  note: str = "", size: tuple[int, int] = (720, 400)) -> bytes:
    """PNG bytes of a histogram: bar i spans edges[i]..edges[i+1], height counts[i]."""
    if len(edges) != len(counts) + 1:
        raise ValueError(f"{len(counts)} bars need {len(counts) + 1} edges, got {len(edges)}")
    width, height = size
    left, right, top, bottom = 64, 16, 40, 56
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    peak = max(max(counts, default=0), 1)
    plot_w, plot_h = width - left - right, height - top - bottom
    bar_w = plot_w / max(len(counts), 1)
    for i, count in enumerate(counts):
        x0 = left + i * bar_w
        y0 = top + plot_h * (1 - count / peak)
        draw.rectangle([x0 + 1, y0, x0 + bar_w - 1, top + plot_h], fill=(70, 110, 180))
    draw.line([left, top + plot_h, left + plot_w, top + plot_h], fill="black")
    draw.line([left, top, left, top + plot_h], fill="black")
    step = max(1, len(counts) // 8)
    for i in range(0, len(edges), step):
        x = left + i * bar_w
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        draw.text((x - 12, top + plot_h + 6), f"{edges[i]:g}", fill="black", font=font)
    for frac in (0.0, 0.5, 1.0):
        y = top + plot_h * (1 - frac)
        draw.text((4, y - 6), f"{peak * frac:.0f}", fill="black", font=font)
    draw.text((left, 12), title, fill="black", font=font)
    draw.text((left + plot_w // 2 - 3 * len(xlabel), height - 22), xlabel, fill="black", font=font)
    if note:
        draw.text((left + plot_w - 6 * len(note), 26), note, fill=(90, 90, 90), font=font)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def bar_chart_svg(counts: Sequence[float], *, width: int = 240, height: int = 60,
                  color: str = "#4a6fb4", label: str = "") -> str:
    """An inline SVG of `counts` as bars (no axes: a sparkline histogram)."""
    peak = max(max(counts, default=0), 1)
    bar_w = width / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{i * bar_w:.2f}" y="{height * (1 - c / peak):.2f}" width="{max(bar_w - 0.5, 0.5):.2f}" '
        f'height="{height * c / peak:.2f}" fill="{color}"/>' for i, c in enumerate(counts) if c)
    title = f"<title>{label}</title>" if label else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img">{title}'
            f'<rect width="{width}" height="{height}" fill="#f4f4f4"/>{bars}</svg>')
