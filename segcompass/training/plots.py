"""Curves of a GRPO run from its metrics.jsonl, as one PNG (matplotlib's Agg backend).

What says whether GRPO gets a signal (docs/results.md section 4): the share of groups whose
rewards have no spread, the policy's mean token entropy, the KL to the reference and the
clip fraction, beside the rewards. `segcompass train --mode rl | rl+seg` writes OUT/grpo_curves.png.
"""

from __future__ import annotations

import json
from pathlib import Path

CURVES = (("reward/frac_zero_std_groups", "zero-spread share (batch)"),
          ("dynamic/zero_spread_drawn", "zero-spread share (drawn)"),
          ("entropy", "mean token entropy (nats)"),
          ("kl", "KL to the reference"),
          ("clip_fraction", "clip fraction"),
          ("reward/total", "reward (total)"),
          ("reward/mask", "reward (mask)"),
          ("reward/consistency", "reward (consistency)"))
"""(metrics.jsonl key, panel title); a key no record has gets no panel."""


def read_curves(metrics: str | Path) -> dict[str, tuple[list[int], list[float]]]:
    """Key -> (steps, values) of every CURVES key found in the step records of `metrics`
    (lines that do not parse, and records without a number for the key, are left out)."""
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for line in Path(metrics).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "reward/total" not in record:
            continue  # TRL's run summary and anything else that is not a step record
        for key, _ in CURVES:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return curves


def plot_grpo_curves(metrics: str | Path, png: str | Path, *, title: str = "") -> Path | None:
    """Draw the CURVES found in `metrics` into `png` (2 columns of panels); None when the file
    has no step record to draw (the PNG is then not written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from saekit.atomic import atomic_file

    if not Path(metrics).is_file():
        return None
    curves = read_curves(metrics)
    panels = [(key, name) for key, name in CURVES if key in curves]
    if not panels:
        return None
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(9, 2.4 * rows), squeeze=False)
    for ax, (key, name) in zip(axes.flat, panels):
        steps, values = curves[key]
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png = Path(png)
    with atomic_file(png) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return png
