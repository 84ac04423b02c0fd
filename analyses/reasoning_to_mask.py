"""Beyond the paper: does the mask follow the reasoning?

Reads an evaluation's predictions (`segcompass eval`: predictions.json), regenerates each
world sample from its id, and judges the policy's chain of thought against the truth
(`segcompass.world.policy_eval.judge`). Two tables:

- per split: how many chains of thought named the right target(s), and the mean mask IoU
  when they did and when they did not. A head that follows the reasoning scores high on
  the first and near zero on the second; a gap that closes means the head is correcting
  (or ignoring) the text.
- no-target samples (N-acc's anatomy): what the chain of thought concluded (`none`, an
  object that is not in the image, an object that is, or no parsable answer) against
  whether the mask came out empty. "named absent, mask" is what a head that checks the
  named object against the image can fix; "named present, mask" it cannot.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analyses.plotting import GROUP_COLOURS, label_axes, new_figure, write_csv, write_outputs

CONCLUSIONS = ("none", "named absent", "named present", "unparsed")
"""What a no-target sample's chain of thought concluded (`conclusion`)."""


def conclusion(named: list[tuple[str, str]] | None, present: set[tuple[str, str]]) -> str:
    """One of CONCLUSIONS for the (colour, shape) pairs an answer line named."""
    if named is None:
        return "unparsed"
    if not named:
        return "none"
    return "named present" if set(named) & present else "named absent"


def judge_predictions(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per prediction record: split, family, template_id, n_targets, cot_right,
    conclusion, iou (union of targets, gRefCOCO's empty/empty = 1) and pred_empty."""
    from segcompass.world.scenes import sample_from_id
    from segcompass.evaluate import decode_rle
    from segcompass.metrics import batch_counts, sample_iou, target_union
    from segcompass.world.policy_eval import judge

    rows = []
    for record in records:
        sample = sample_from_id(record["sample_id"])
        verdict = judge(sample, record["response"])
        pred = decode_rle(record["rle"])  # (H, W)
        counts = batch_counts(pred[None], target_union(sample.target_masks)[None])
        present = {(o.colour, o.shape) for o in sample.objects}
        rows.append({"sample_id": sample.sample_id, "split": sample.split, "family": sample.family,
                     "template_id": sample.template_id, "n_targets": len(sample.targets),
                     "cot_right": verdict.target_correct, "conclusion": conclusion(verdict.named, present),
                     "iou": float(sample_iou(counts.intersection, counts.union)[0]),
                     "pred_empty": bool(counts.pred_empty[0])})
    return pd.DataFrame(rows)


def reasoning_table(judged: pd.DataFrame) -> pd.DataFrame:
    """Per split: n, cot_right, iou_when_right, iou_when_wrong (NaN where a part is empty)."""
    rows = []
    for split, group in judged.groupby("split", sort=False):
        right, wrong = group[group.cot_right], group[~group.cot_right]
        rows.append({"split": split, "n": len(group), "cot_right": len(right),
                     "iou_when_right": right.iou.mean() if len(right) else float("nan"),
                     "iou_when_wrong": wrong.iou.mean() if len(wrong) else float("nan")})
    return pd.DataFrame(rows)


def no_target_table(judged: pd.DataFrame) -> pd.DataFrame:
    """No-target samples counted by (split, template_id, conclusion, pred_empty)."""
    empty = judged[judged.n_targets == 0]
    counts = empty.groupby(["split", "template_id", "conclusion", "pred_empty"], sort=True).size()
    return counts.rename("count").reset_index()


def conclusion_totals(no_target: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{conclusion: {"empty": n, "mask": n}} over every split of a `no_target_table`."""
    totals = no_target.groupby(["conclusion", "pred_empty"])["count"].sum()
    return {c: {"empty": int(totals.get((c, True), 0)), "mask": int(totals.get((c, False), 0))}
            for c in CONCLUSIONS}


def plot_reasoning(table: pd.DataFrame, no_target: pd.DataFrame) -> Figure:
    """Left: mean IoU when the CoT was right / wrong per split. Right: no-target samples by
    conclusion, empty mask or not (all splits)."""
    fig, (left, right) = new_figure(2)
    x = np.arange(len(table))
    for offset, column, colour, label in ((-0.2, "iou_when_right", GROUP_COLOURS[2], "CoT right"),
                                          (0.2, "iou_when_wrong", GROUP_COLOURS[4], "CoT wrong")):
        left.bar(x + offset, table[column].fillna(0), width=0.4, color=colour, label=label)
    left.set_xticks(x, [f"{s}\n{r}/{n}" for s, r, n in zip(table.split, table.cot_right, table.n)])
    left.set_ylim(0, 1)
    left.legend()
    label_axes(left, "split (CoT right / samples)", "mean mask IoU", "Does the mask follow the reasoning?")
    totals = conclusion_totals(no_target)
    y = np.arange(len(CONCLUSIONS))
    for offset, kind, colour, label in ((-0.2, "empty", GROUP_COLOURS[2], "empty mask"),
                                        (0.2, "mask", GROUP_COLOURS[4], "mask")):
        values = [totals[c][kind] for c in CONCLUSIONS]
        right.barh(y + offset, values, height=0.4, color=colour, label=label)
    right.set_yticks(y, CONCLUSIONS)
    right.legend(loc="lower right")
    label_axes(right, "no-target samples", "what the CoT concluded", "No-target samples (N-acc)")
    return fig


def write_reasoning_report(eval_dir: str | Path, out_dir: str | Path | None = None,
                           stem: str = "reasoning_to_mask") -> dict[str, Any]:
    """Judge `eval_dir/predictions.json`; write <stem>.csv/.png/.json and <stem>_no_target.csv
    into `out_dir` (default: eval_dir). Returns the JSON summary."""
    eval_dir = Path(eval_dir)
    out_dir = Path(out_dir or eval_dir)
    judged = judge_predictions(json.loads((eval_dir / "predictions.json").read_text()))
    table, no_target = reasoning_table(judged), no_target_table(judged)
    summary = {"splits": table.to_dict("records"), "no_target": conclusion_totals(no_target)}
    write_outputs(out_dir, stem, table=table, figure=plot_reasoning(table, no_target), summary=summary)
    write_csv(no_target, out_dir / f"{stem}_no_target.csv")
    return summary
