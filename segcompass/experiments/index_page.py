"""The demo's index.html: a results page (tables, figures with what to look for, stage times).

Everything shown is read from the files the demo's stages wrote, so the page can be rebuilt
from a finished run folder; every string from a file is escaped.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from analyses.causal import CAUSAL_DIR, CAUSAL_FILE

STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
         "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
         "th:first-child,td:first-child{text-align:left}figure{display:inline-block;width:360px;margin:6px;"
         "vertical-align:top}figcaption{font-size:.85em}.note{color:#555;font-size:.9em}")

FIGURE_NOTES = {
    "figure4_activation_patterns": "Active atoms on the referred object minus the other objects of the same image; "
                                   "image tokens precede the instruction, so this measures saliency, not reference.",
    "figure5_instance_coverage": "How many of an object's patches its top atoms cover, referred vs other objects.",
    "figure8_correlation": "SAE loss vs Dice with the training step held fixed, and heatmaps scored against the truth.",
    "concept_naming": "Atoms (or small groups) named for a colour, shape, size or position, with their F1.",
    "faithfulness": "Mask IoU as a slot's top atoms are deleted, against random atoms.",
    "faithfulness_heatmap": "The same deletion read on the heatmap's soft IoU.",
    "slot_readout": "What a linear probe reads from each slot's input: the object the chain of thought named.",
    "reasoning_to_mask": "Mask IoU when the chain of thought named the right target vs a wrong one.",
}
"""One line per figure saying what to look for."""

CAUSAL_ROWS = (
    ("zero_codes_giou_drop", "gIoU lost when every SAE code is removed (points)", 100),
    ("shuffled_codes_off_target_share", "masks off target with another sample's codes (%)", 100),
    ("unedited_off_target_share", "masks off target, unedited (%)", 100),
    ("conflict_follow_codes_share", "conflict test: masks that follow the codes (%)", 100),
    ("variance_explained_thresholded", "layer variance the head's thresholded code explains (%)", 100),
)


def _cell(value: Any, scale: float = 100) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{scale * value:.1f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def eval_table(metrics: dict) -> str:
    """gIoU / cIoU / N-acc / T-acc per split (percent) from an eval's metrics.json."""
    rows = [[html.escape(split), *(_cell(s.get(k)) for k in ("giou", "ciou", "n_acc", "t_acc")),
             str(s.get("n_samples", ""))] for split, s in metrics.get("splits", {}).items()]
    return _table(["split", "gIoU", "cIoU", "N-acc", "T-acc", "samples"], rows)


def causal_table(causal: dict) -> str:
    """The causal suite's headline numbers per split (segcompass analyze --causal)."""
    acceptance = causal.get("acceptance", {})
    splits = sorted({s for key, _, _ in CAUSAL_ROWS for s in acceptance.get(key, {}) if s != "all_splits"})
    rows = [[html.escape(label), *(_cell(acceptance.get(key, {}).get(s), scale) for s in splits)]
            for key, label, scale in CAUSAL_ROWS if key in acceptance]
    ratios = acceptance.get("deletion_cost_ratio_top10_vs_random10", {})
    for method in ("attribution", "provenance"):
        rows.append([f"deleting the top 10% pairs by {method} / a random 10% (x)",
                     *(_cell((ratios.get(s) or {}).get(method), 1) for s in splits)])
    return _table(["", *splits], rows)


def stage_table(timings: dict[str, float]) -> str:
    return _table(["stage", "minutes"], [[html.escape(k), f"{v / 60:.1f}"] for k, v in timings.items()])


def figures(analyses: Path, files: dict) -> str:
    cards = []
    for stem, entry in files.items():
        if "png" not in entry:
            continue
        src = html.escape(f"analyses/{entry['png']}")
        note = html.escape(FIGURE_NOTES.get(stem, ""))
        cards.append(f'<figure><a href="{src}"><img src="{src}" width="360" alt="{html.escape(stem)}"></a>'
                     f"<figcaption><b>{html.escape(stem)}</b>. {note}</figcaption></figure>")
    for png in sorted((analyses / CAUSAL_DIR).glob("causal_*.png")):
        src = html.escape(f"analyses/{CAUSAL_DIR}/{png.name}")
        cards.append(f'<figure><a href="{src}"><img src="{src}" width="360" alt="{html.escape(png.stem)}"></a>'
                     f"<figcaption><b>{html.escape(png.stem)}</b>. What each intervention on the head's inputs "
                     "does to the masks.</figcaption></figure>")
    return "".join(cards)


def write_index(out: Path, *, quick: bool, routing: str, reports: Sequence[Path], timings: dict[str, float],
                files: dict, policy_summary: str) -> Path:
    """Write out/index.html from the run folder `out`."""
    metrics_path, causal_path = out / "eval" / "metrics.json", out / "analyses" / CAUSAL_DIR / CAUSAL_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    causal = json.loads(causal_path.read_text()) if causal_path.is_file() else {}
    links = "".join(f'<li><a href="{html.escape(str(r.relative_to(out)))}">{html.escape(r.parent.name)}</a></li>'
                    for r in reports)
    quick_note = ("<p class='note'><b>Quick run:</b> a smoke test with tiny budgets; its numbers mean nothing.</p>"
                  if quick else "")
    parts = [f"<!doctype html><meta charset='utf-8'><title>segcompass demo</title><style>{STYLE}</style>",
             f"<h1>segcompass demo{' (quick)' if quick else ''}</h1>{quick_note}",
             f"<p class='note'>Head routing: <b>{html.escape(routing)}</b>.</p>",
             "<h2>Evaluation (greedy decoding, percent)</h2>", eval_table(metrics)]
    if causal:
        parts += ["<h2>Do the masks come from the SAE atoms?</h2>", causal_table(causal),
                  f"<p class='note'>Every number: <a href='analyses/{CAUSAL_DIR}/{CAUSAL_FILE}'>{CAUSAL_FILE}</a>.</p>"]
    parts += [f"<h2>Prediction reports</h2><ul>{links}</ul>",
              f"<h2>Figures</h2>{figures(out / 'analyses', files)}",
              f"<h2>Warm-started policy (greedy, val)</h2><pre>{html.escape(policy_summary)}</pre>",
              "<h2>Stage times</h2>", stage_table(timings)]
    path = out / "index.html"
    path.write_text("".join(parts))
    return path
