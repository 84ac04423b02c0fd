"""The inspectable prediction: PNGs, `prediction.json` and ONE self-contained `report.html`.

The report answers "what did the model use?": the chain of thought with each token
shaded by how strongly the top slot's atoms fire on it, every slot's heatmap, confidence
and mask, and for each slot its heaviest SAE atoms (index, weight, optional concept name)
with a small map of the image patches where each atom fires and the words it fires on.

Self-contained means: every image is an inline base64 PNG data URI, the CSS is inline,
there is no script and no external resource. Every piece of user or model text (the
instruction, the response, token words, atom names) goes through `html.escape`.
Images are drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from saekit.atomic import atomic_write_bytes
from segcompass.predictor import AtomTrace, Prediction

MASK_COLOUR = np.array([255, 48, 48], dtype=np.float32)
FIRE_RGB = (255, 140, 0)
"""Orange used to shade tokens by atom activation."""
ATOM_MAP_SIDE = 112
"""Pixel side of the per-atom image maps."""


class ReportFiles(NamedTuple):
    html: Path
    json: Path
    mask: Path
    overlay: Path
    heatmaps: list[Path]
    """heatmap_slot{k}.png, one per slot."""


class PredictedReport(NamedTuple):
    prediction: Prediction
    files: ReportFiles


# ---------------------------------------------------------------------- images

def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    buffer = io.BytesIO()
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def overlay_mask(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image with `mask` tinted red and its outline drawn."""
    out = image.astype(np.float32)
    out[mask] = (1 - alpha) * out[mask] + alpha * MASK_COLOUR
    edge = mask & ~_erode(mask)
    out[edge] = MASK_COLOUR
    return out.clip(0, 255).astype(np.uint8)


def _erode(mask: np.ndarray) -> np.ndarray:
    """4-neighbour binary erosion (pixels outside the image count as background)."""
    padded = np.pad(mask, 1, constant_values=False)
    return (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])


def heatmap_figure(image: np.ndarray, heatmap: np.ndarray, slot_mask: np.ndarray, title: str) -> bytes:
    """PNG of two panels: the slot heatmap over the image (with colour bar) and its mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.2), dpi=100)
    height, width = image.shape[:2]
    left.imshow(image)
    shown = left.imshow(heatmap, cmap="inferno", vmin=0, vmax=1, alpha=0.65, extent=(0, width, height, 0),
                        interpolation="bilinear")
    fig.colorbar(shown, ax=left, fraction=0.046, pad=0.04, label="heatmap probability")
    left.set_title("heatmap H_k", fontsize=9)
    right.imshow(overlay_mask(image, slot_mask))
    right.set_title("mask", fontsize=9)
    for ax in (left, right):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.84, wspace=0.25)  # no tight_layout: it draws twice
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def atom_map(image: np.ndarray, trace: AtomTrace, grid_shape: tuple[int, int],
             region: tuple[int, int, int, int], side: int = ATOM_MAP_SIDE) -> np.ndarray:
    """(side, side, 3) uint8: the image region the policy saw, each patch tinted by the atom's
    activation there (matplotlib's 'inferno' colour map, transparent where the atom is silent)."""
    from matplotlib import colormaps

    top, left, height, width = region
    crop = Image.fromarray(image[top:top + height, left:left + width]).resize((side, side), Image.BILINEAR)
    base = np.asarray(crop.convert("L").convert("RGB"), dtype=np.float32)  # grey, so colour reads as activation
    grid = trace.image_map(grid_shape)  # (rows, cols)
    peak = float(grid.max())
    if peak <= 0:
        return (base * 0.6).astype(np.uint8)
    strength = grid / peak
    up = np.asarray(Image.fromarray(strength.astype(np.float32), mode="F").resize((side, side), Image.NEAREST))
    colour = colormaps["inferno"](up)[..., :3] * 255  # (side, side, 3)
    alpha = (0.85 * up)[..., None]
    return (base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------- data

def top_slot(prediction: Prediction) -> int:
    """The slot a reader should look at first: the single slot, or the most confident one."""
    return 0 if not prediction.multi else int(np.argmax(prediction.confidences))


def token_strength(prediction: Prediction, slot: int) -> dict[int, float]:
    """Sequence position -> sum over the slot's top atoms of weight x activation at that token."""
    strength: dict[int, float] = {}
    for atom in prediction.provenance[slot].atoms:
        for firing in atom.text:
            strength[firing.position] = strength.get(firing.position, 0.0) + atom.weight * firing.activation
    return strength


def _atom_json(trace: AtomTrace, names: dict[int, str]) -> dict[str, Any]:
    return {"atom": trace.atom, "weight": round(trace.weight, 6), "name": names.get(trace.atom, trace.name),
            "image": [{"row": int(r), "col": int(c), "activation": round(float(v), 5)}
                      for (r, c), v in zip(trace.image_cells, trace.image_values)],
            "text": [{"word": f.text, "position": f.position, "response_index": f.response_index,
                      "kind": f.kind, "activation": round(f.activation, 5)} for f in trace.text]}


def prediction_json(prediction: Prediction, instruction: str, *, atom_names: dict[int, str] | None = None,
                    heatmap_files: list[str] | None = None) -> dict[str, Any]:
    """Everything in the report as JSON-able data (arrays summarised: areas, file names)."""
    names = atom_names or {}
    slots = []
    for k, trace in enumerate(prediction.provenance):
        slots.append({"slot": k, "confidence": round(float(prediction.confidences[k]), 6),
                      "selected": bool(prediction.selected[k]), "mask_area": int(prediction.slot_masks[k].sum()),
                      "heatmap_png": heatmap_files[k] if heatmap_files else None,
                      "top_atoms": [_atom_json(a, names) for a in trace.atoms]})
    parsed = prediction.parsed
    return {"instruction": instruction, "multi": prediction.multi, "response": prediction.response,
            "chain_of_thought": parsed.think, "format_valid": parsed.is_valid, "format_score": parsed.format_score,
            "image_size": list(prediction.mask.shape), "mask_area": int(prediction.mask.sum()),
            "image_grid": list(prediction.image_grid), "grid_region": list(prediction.grid_region),
            "top_slot": top_slot(prediction), "slots": slots}


# ---------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.row{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0;background:#fff;padding:8px;border:1px solid #e3e3e3;border-radius:6px}
figcaption{font-size:12px;color:#555;margin-top:4px}
.instr{font-size:16px;background:#fff;border-left:4px solid #4a7bd0;padding:8px 12px;margin:8px 0}
.cot{font-family:ui-monospace,Menlo,monospace;font-size:14px;line-height:2;background:#fff;padding:10px;
 border:1px solid #e3e3e3;border-radius:6px;white-space:pre-wrap}
.tok{border-radius:3px;padding:1px 0}
.slot{background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:12px;margin:12px 0}
.slot.top{border:2px solid #ff8c00}
.badge{display:inline-block;font-size:12px;padding:2px 8px;border-radius:10px;background:#eee;margin-left:6px}
.badge.on{background:#d9f2d9}.badge.off{background:#f6dada}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;
 vertical-align:middle}
.bar{display:inline-block;height:10px;background:#ff8c00;vertical-align:middle}
.words{font-family:ui-monospace,Menlo,monospace;font-size:12px;max-width:380px}
.muted{color:#777;font-size:12px}
"""


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img(png: bytes, alt: str, width: int | None = None) -> str:
    size = f' width="{width}"' if width else ""
    return f'<img src="{data_uri(png)}" alt="{_esc(alt)}"{size}>'


def cot_html(prediction: Prediction, slot: int) -> str:
    """The response, token by token, shaded by the slot's atom activity (title = score)."""
    strength = token_strength(prediction, slot)
    peak = max(strength.values(), default=0.0)
    spans = []
    for token in prediction.response_tokens:
        score = strength.get(token.position, 0.0)
        level = score / peak if peak > 0 else 0.0
        lead = token.text[:len(token.text) - len(token.text.lstrip())]
        style = f"background:rgba({FIRE_RGB[0]},{FIRE_RGB[1]},{FIRE_RGB[2]},{0.85 * level:.3f})"
        spans.append(f'{_esc(lead)}<span class="tok" style="{style}" title="{_esc(f"{score:.3f}")}">'
                     f"{_esc(token.text.lstrip())}</span>")
    return "".join(spans) or '<span class="muted">(empty response)</span>'


def _where(firing) -> str:
    if firing.kind == "response":
        return f"CoT word {firing.response_index}"
    return f"question pos {firing.position}"


def _words_html(trace: AtomTrace, limit: int = 6) -> str:
    strongest = sorted(trace.text, key=lambda f: -f.activation)[:limit]
    if not strongest:
        return '<span class="muted">no text tokens</span>'
    return ", ".join(f'{_esc(f.text)} <span class="muted">({_where(f)}, {f.activation:.2f})</span>'
                     for f in strongest)


def atoms_table(image: np.ndarray, prediction: Prediction, slot: int, names: dict[int, str],
                links: dict[int, str] | None = None) -> str:
    """The slot's atoms; `links` maps an atom to its page in a `saekit dashboard` folder."""
    atoms = prediction.provenance[slot].atoms
    links = links or {}
    if not atoms:
        return '<p class="muted">No SAE atom passed the codebook threshold for this sample.</p>'
    peak = max(a.weight for a in atoms) or 1.0
    rows = ["<tr><th>#</th><th>atom</th><th>weight</th><th>name</th><th>where it fires on the image</th>"
            "<th>strongest words</th></tr>"]
    for rank, trace in enumerate(atoms, 1):
        name = names.get(trace.atom, trace.name)
        amap = atom_map(image, trace, prediction.image_grid, prediction.grid_region)
        n_cells = len(trace.image_cells)
        rows.append(
            f"<tr><td>{rank}</td><td>{_atom_cell(trace.atom, links)}</td><td>{trace.weight:.4f}<br>"
            f'<span class="bar" style="width:{int(80 * trace.weight / peak)}px"></span></td>'
            f"<td>{_esc(name) if name else '<span class=muted>(unnamed)</span>'}</td>"
            f"<td>{_img(png_bytes(amap), f'atom {trace.atom} on the image')}<br>"
            f'<span class="muted">{n_cells} image patch{"es" if n_cells != 1 else ""}</span></td>'
            f'<td class="words">{_words_html(trace)}</td></tr>')
    legend = ('<p class="muted">Weight: the atom\'s summed attention into this slot. Map: the image region the '
              "policy saw, each patch coloured by the atom's activation there (bright = strong, grey = silent). "
              "Words: the strongest text tokens the atom fires on (question position or chain-of-thought word "
              "index, activation).</p>")
    return legend + "<table>" + "".join(rows) + "</table>"


def _atom_cell(atom: int, links: dict[int, str]) -> str:
    href = links.get(atom)
    return f'<a href="{_esc(href)}" title="its dashboard page">{atom}</a>' if href else str(atom)


def dashboard_links(dashboard: str | Path | None, atoms: set[int], base: Path) -> dict[int, str]:
    """atom -> relative URL (from `base`) of its page in the `saekit dashboard` folder
    `dashboard`; empty when there is none."""
    if dashboard is None:
        return {}
    from saekit.dashboard import atom_link

    links = {}
    for atom in sorted(atoms):
        target = atom_link(dashboard, atom)
        if target is not None:
            links[atom] = Path(os.path.relpath(target.resolve(), Path(base).resolve())).as_posix()
    return links


def slot_html(image: np.ndarray, prediction: Prediction, slot: int, heatmap_png: bytes,
              names: dict[int, str], links: dict[int, str] | None = None) -> str:
    confidence = float(prediction.confidences[slot])
    on = bool(prediction.selected[slot])
    top = slot == top_slot(prediction)
    badge = f'<span class="badge {"on" if on else "off"}">{"in final mask" if on else "not used"}</span>'
    return (f'<div class="slot{" top" if top else ""}"><h3>Slot {slot}{" (top slot)" if top else ""}'
            f' <span class="badge">confidence {confidence:.3f}</span>{badge}</h3>'
            f'<div class="row"><figure>{_img(heatmap_png, f"slot {slot} heatmap and mask")}'
            f"<figcaption>Heatmap H_{slot} and its mask (area {int(prediction.slot_masks[slot].sum())} px)"
            f"</figcaption></figure></div><h4>Top SAE atoms feeding slot {slot}</h4>"
            f"{atoms_table(image, prediction, slot, names, links)}</div>")


def report_html(image: np.ndarray, instruction: str, prediction: Prediction, heatmap_pngs: list[bytes],
                *, atom_names: dict[int, str] | None = None, title: str = "SegCompass prediction",
                links: dict[int, str] | None = None) -> str:
    """The whole self-contained report as one HTML string (`links`: atom -> dashboard page)."""
    names = atom_names or {}
    top = top_slot(prediction)
    parsed = prediction.parsed
    validity = "valid" if parsed.is_valid else "INVALID"
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_CSS}</style></head><body><h1>{_esc(title)}</h1>")
    images = (f'<div class="row"><figure>{_img(png_bytes(image), "input image", 256)}<figcaption>input</figcaption>'
              f'</figure><figure>{_img(png_bytes(overlay_mask(image, prediction.mask)), "final mask overlay", 256)}'
              f"<figcaption>final mask ({int(prediction.mask.sum())} px, "
              f'{"multi" if prediction.multi else "single"}-object prompt)</figcaption></figure></div>')
    cot = (f"<h2>Chain of thought</h2><p class=\"muted\">Response format {validity} "
           f"(score {parsed.format_score}). Each token is shaded by how strongly the top slot's "
           f"(slot {top}) atoms fire on it: sum of atom weight x activation.</p>"
           f'<div class="cot">{cot_html(prediction, top)}</div>')
    slots = "".join(slot_html(image, prediction, k, heatmap_pngs[k], names, links)
                    for k in range(len(heatmap_pngs)))
    return (head + f'<div class="instr"><b>Instruction:</b> {_esc(instruction)}</div>' + images + cot
            + "<h2>Slots</h2>" + slots + "</body></html>")


# ---------------------------------------------------------------------- files

def write_report(out: str | Path, image: np.ndarray, instruction: str, prediction: Prediction, *,
                 atom_names: dict[int, str] | None = None, title: str = "SegCompass prediction",
                 dashboard: str | Path | None = None) -> ReportFiles:
    """mask.png, overlay.png, heatmap_slot{k}.png, prediction.json and report.html in `out`;
    with `dashboard` (a `saekit dashboard` folder), each listed atom links to its page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "mask.png", png_bytes((prediction.mask * 255).astype(np.uint8)))
    atomic_write_bytes(out / "overlay.png", png_bytes(overlay_mask(image, prediction.mask)))
    heatmap_pngs, heatmap_paths = [], []
    for k in range(len(prediction.confidences)):
        title_k = f"slot {k}: confidence {prediction.confidences[k]:.3f}"
        heatmap_pngs.append(heatmap_figure(image, prediction.heatmaps[k], prediction.slot_masks[k], title_k))
        heatmap_paths.append(out / f"heatmap_slot{k}.png")
        atomic_write_bytes(heatmap_paths[-1], heatmap_pngs[-1])
    record = prediction_json(prediction, instruction, atom_names=atom_names,
                             heatmap_files=[p.name for p in heatmap_paths])
    atomic_write_bytes(out / "prediction.json", (json.dumps(record, indent=2) + "\n").encode())
    atoms = {trace.atom for slot in prediction.provenance for trace in slot.atoms}
    page = report_html(image, instruction, prediction, heatmap_pngs, atom_names=atom_names, title=title,
                       links=dashboard_links(dashboard, atoms, out))
    atomic_write_bytes(out / "report.html", page.encode("utf-8"))
    return ReportFiles(out / "report.html", out / "prediction.json", out / "mask.png", out / "overlay.png",
                       heatmap_paths)


def predict_report(model, image: np.ndarray, instruction: str, out: str | Path, *, multi: bool = False,
                   atom_names: dict[int, str] | None = None, config=None,
                   dashboard: str | Path | None = None) -> PredictedReport:
    """Predict one image and write its report. `model`: a SegCompass or a checkpoint folder;
    `config`: a `PredictorConfig` (defaults otherwise); `dashboard`: a `saekit dashboard`
    folder the listed atoms link into."""
    from segcompass.model import load_segcompass
    from segcompass.predictor import Predictor, PredictorConfig

    if isinstance(model, (str, Path)):
        model = load_segcompass(model)
    predictor = Predictor(model, config or PredictorConfig(batch_size=1), atom_names=atom_names)
    [prediction] = predictor.predict([image], [instruction], multi=multi)
    return PredictedReport(prediction, write_report(out, image, instruction, prediction, atom_names=atom_names,
                                                    dashboard=dashboard))
