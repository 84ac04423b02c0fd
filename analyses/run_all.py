"""Every interpretability analysis on one trained checkpoint: PNG + CSV/JSON each, and summary.json.

    figure4_activation_patterns   active atoms per token by group over τ, and the referred instance
                                  against the other instances and the background of the same image
                                  (+ figure4_activation_patterns_paired.csv) (Figure 4)
    figure5_instance_coverage     coverage of the referred instances by the top-K% image tokens vs the
                                  other instances of the same images and random K% (Figure 5)
    figure8_correlation           training SAE MSE vs Dice with the step held fixed (from
                                  <run>/metrics.jsonl), and the test heatmaps on the referred vs the
                                  other objects of each image (Figure 8; the paper's heatmap-vs-mask
                                  panel holds by construction and is not drawn)
    faithfulness                  deletion / insertion of each sample's top slot's provenance atoms
                                  vs random active atoms, mask IoU (+ faithfulness_curves.csv)
    faithfulness_heatmap          the same scored on the slot's heatmap (the concept pathway's own
                                  output, before the mask decoder): tells a pathway the masks ignore
                                  from one that carries nothing
    concept_naming                atoms named by world concepts (attributes and positions): names.csv
                                  (the naming table, `analyses.concept_naming.load_atom_labels` reads
                                  it), atom_names.json ({"atom": "label"}, `segcompass predict
                                  --atom-names`) and concept_naming_groups.csv (per concept, the atom
                                  or small group of atoms whose union names it)
    summary.json                  the acceptance numbers, each analysis's summary, the files

All analyses read one `analyses.collect.Collected` (the first n samples of a world split,
teacher-forced by default). Image tokens precede the instruction, so under causal attention
their codes cannot depend on which object is referred: Figures 4 and 5 compare the referred
instance with the other instances of the same image (`activation_patterns.CAVEAT`). The
checkpoint folder is `<run>/final`; its training log is `<run>/metrics.jsonl` when the run
folder has one.

Which slot is a sample's "top slot" (faithfulness): slots are matched to the targets by
Hungarian matching on the masks' soft IoU (as in training), and the matched pair with the
highest hard mask IoU is taken; its target is the ground truth the IoU is measured against.
Samples without a target, or whose best pair has IoU below `faith_min_iou`, give no item
(nothing can drop from a mask that already misses).

On a dataset (`segcompass analyze --data refcoco:ROOT ...`) none of these run: each reads the world's
scene metadata (WORLD_ONLY_ANALYSES says what for), and `skipped_summary` writes a summary.json
that records them as skipped; the causal suite's pathway, dose and variance run instead.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from analyses import activation_patterns as fig4
from analyses import evaluators
from analyses import concept_naming as naming
from analyses import correlation as fig8
from analyses import faithfulness as faith
from analyses import instance_coverage as fig5
from analyses.collect import Collected, collect_checkpoint
from analyses.plotting import new_figure, write_csv, write_json, write_outputs
from saekit.errors import UserError

SUMMARY_FILE = "summary.json"
NAMES_FILE = "names.csv"
GROUPS_FILE = "concept_naming_groups.csv"
ATOM_NAMES_FILE = "atom_names.json"
TRAINING_KEYS: tuple[tuple[str, str], ...] = (("sae_mse", "mask_dice"), ("sae_mse", "seg/mask_dice"))
"""(x, y) key pairs tried, in order, in the training log (`segcompass.training.supervised` writes the first;
a GRPO log would need the second)."""
TAU_FRACTIONS: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
"""Figure 4's τ sweep as fractions of the codebook threshold: SAE activations are in the SAE's
own units (the world SAE's 99th percentile is ~1.2, the paper's threshold 2.0 would be off
its scale), so the sweep follows the threshold the head itself uses."""


@dataclass(frozen=True)
class AnalysesConfig:
    """What `run_all` measures, on how many samples."""

    split: str = "val"
    """World split the samples are drawn from (with a dataset --data: its split, for the causal suite)."""
    n: int = 48
    """Samples (the first n of the split's stream for `seed`)."""
    seed: int = 1
    """World seed of the samples (1: the evaluation seed, held out from training)."""
    greedy: bool = False
    """Read the policy's own greedy responses instead of the ground-truth chain of thought."""
    batch_size: int = 8
    """Samples per forward pass."""
    k_percents: tuple[float, ...] = fig5.DEFAULT_K_PERCENTS
    """Figure 5: the K% sweep (must hold 10 for the acceptance ratio)."""
    magnitude: Literal["l2", "l1", "max"] = "l2"
    """Figure 5: token magnitude used for ranking (l2, l1, max)."""
    faith_ks: tuple[int, ...] = faith.DEFAULT_KS
    """Faithfulness: numbers of atoms deleted / kept (must hold 5)."""
    faith_draws: int = 3
    """Faithfulness: random rankings per item."""
    faith_items: int = 24
    """Faithfulness: at most this many (sample, top slot) items (each costs ~2 |ks| (1 + draws) head passes)."""
    faith_min_iou: float = 0.05
    """Faithfulness: skip items whose unedited mask IoU is below this."""
    naming_min_count: int = 20
    """Concept naming: atoms active on fewer tokens are not judged."""
    naming_f1: float = 0.5
    """Concept naming: a name is confident when its F1 is at least this."""
    naming_group_size: int = 3
    """Concept naming: most atoms in a group that names one concept (1: single atoms only)."""
    seed_random: int = 0
    """Seed of the random baselines (coverage ties, random atom rankings)."""
    readout_n: int = 400
    """Slot readout: world samples drawn from `train` (probe fit) and from `split` (held out);
    only single-target ones are used."""

    def __post_init__(self) -> None:
        from segcompass.world.scenes import SPLITS

        if self.split not in SPLITS:
            raise UserError(f"analyses: unknown split {self.split!r}; choose one of {', '.join(SPLITS)}")
        for name in ("n", "batch_size", "faith_draws", "faith_items", "naming_min_count", "naming_group_size"):
            if getattr(self, name) < 1:
                raise UserError(f"analyses: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if 10 not in self.k_percents:
            raise UserError(f"analyses: --k-percents must include 10 (the acceptance ratio), got {self.k_percents}")
        if 5 not in self.faith_ks:
            raise UserError(f"analyses: --faith-ks must include 5 (the acceptance drop), got {self.faith_ks}")
        if self.magnitude not in ("l2", "l1", "max"):
            raise UserError(f"analyses: --magnitude must be l2, l1 or max, got {self.magnitude!r}")
        if not 0 < self.naming_f1 <= 1:
            raise UserError(f"analyses: --naming-f1 must be in (0, 1], got {self.naming_f1}")


class AnalysisOutput(NamedTuple):
    """One analysis: its table, figure and JSON-able summary (table and figure may be None)."""

    table: pd.DataFrame | None
    """Written as <stem>.csv."""
    figure: Figure | None
    """Written as <stem>.png."""
    summary: dict[str, Any]
    """Written as <stem>.json and into summary.json."""
    extra_tables: dict[str, pd.DataFrame] = {}
    """Further CSVs: file name -> table."""


# ---------------------------------------------------------------- Figure 4

def figure4_thresholds(threshold: float) -> tuple[float, ...]:
    """τ sweep: TAU_FRACTIONS of the codebook threshold (the paper's default list if it is 0)."""
    if threshold <= 0:
        return fig4.DEFAULT_THRESHOLDS
    return tuple(sorted({round(f * threshold, 6) for f in TAU_FRACTIONS}))


def other_object_masks(c: Collected) -> list[list[np.ndarray]]:
    """Per sample, the visible masks of the objects it does not refer to (the policy's frame)."""
    return [[m for i, m in enumerate(masks) if i not in s.targets] for masks, s in zip(c.scene_masks, c.samples)]


PAIRED_COMPARISONS: dict[str, tuple[str, str]] = {
    "referred_vs_other_instances": ("referred - other instances", "other_instance_image"),
    "referred_vs_background": ("referred - background", "background_image")}
"""Figure 4's within-image comparisons of the referred instance: summary key -> (legend, baseline group)."""


def _paired_summary(rows: pd.DataFrame) -> dict[str, Any]:
    """A `paired_difference` table as JSON: per-τ lists, extremes, and whether mean - 2 s.e.m. > 0 at every τ."""
    mean, sem = rows.mean_difference.to_numpy(), rows["sem"].to_numpy()
    return {"mean_by_tau": mean.round(6).tolist(), "sem_by_tau": sem.round(6).tolist(),
            "fraction_positive_by_tau": rows.fraction_positive.round(4).tolist(),
            "n_images": int(rows.n_images.iloc[0]),
            "min_over_tau": float(np.min(mean)), "max_over_tau": float(np.max(mean)),
            "above_zero_beyond_2sem_every_tau": bool(np.all(mean - 2 * sem > 0))}


def activation_patterns(c: Collected, thresholds: tuple[float, ...] | None = None) -> AnalysisOutput:
    """Figure 4 on every SAE token of the collected samples: the pooled groups, and the referred
    instance against the other instances (the control) and the background, within each image."""
    thresholds = thresholds or figure4_thresholds(c.threshold)
    groups = fig4.token_groups(c.token_types, c.image_grid, c.token_sample_index, c.image_masks, c.grid_shapes,
                               other_masks=other_object_masks(c))
    table = fig4.active_atoms_by_group(c.codes, groups, thresholds)
    wide = table.pivot(index="tau", columns="group", values="mean")
    margins = {g: fig4.min_margin(table, g, "background_image")
               for g in ("instance_image", "cot", "question", "other_instance_image")}
    paired = {key: fig4.paired_difference(c.codes, groups, c.token_sample_index, thresholds, baseline=baseline)
              for key, (_, baseline) in PAIRED_COMPARISONS.items()}
    summary = {"caveat": fig4.CAVEAT, "thresholds": list(thresholds),
               "n_tokens": {g: int(table[table.group == g].n_tokens.iloc[0]) for g in fig4.GROUPS},
               "min_margin_vs_background": margins,
               "margin_by_tau": {g: (wide[g] - wide["background_image"]).round(6).tolist() for g in margins},
               "instance_above_background_every_tau": bool(margins["instance_image"] > 0),
               "cot_above_background_every_tau": bool(margins["cot"] > 0),
               **{key: _paired_summary(rows) for key, rows in paired.items()}}
    title = f"Active SAE atoms per token (Figure 4), {len(c.samples)} {c.samples[0].split} samples"
    figure = fig4.plot_active_atoms(table, {PAIRED_COMPARISONS[k][0]: rows for k, rows in paired.items()}, title=title)
    paired_table = pd.concat([rows.assign(comparison=key) for key, rows in paired.items()], ignore_index=True)
    return AnalysisOutput(table, figure, summary, {"figure4_activation_patterns_paired.csv": paired_table})


# ---------------------------------------------------------------- Figure 5

def instance_coverage(c: Collected, k_percents=fig5.DEFAULT_K_PERCENTS, *, magnitude: str = "l2",
                      seed: int = 0) -> AnalysisOutput:
    """Figure 5 over every target instance of the collected samples, against the other objects of
    the same images (the control) and random K%."""
    table = fig5.coverage_curve(c.codes, c.token_types, c.image_grid, c.token_sample_index, c.image_masks,
                                c.grid_shapes, k_percents, other_masks=other_object_masks(c), magnitude=magnitude,
                                seed=seed)
    row = table[table.k_percent == 10]
    at10 = row.iloc[0] if len(row) else None

    def top10(column: str) -> float:
        return float(at10[column]) if at10 is not None else float("nan")

    ratio = top10("ratio")
    summary = {"caveat": fig4.CAVEAT, "magnitude": magnitude, "n_instances": int(table.n_instances.iloc[0]),
               "n_other_instances": int(table.n_other_instances.iloc[0]),
               "n_paired_images": int(table.n_paired_images.iloc[0]),
               "coverage_top10": top10("coverage"), "random_top10": top10("random"),
               "ratio_top10": ratio, "ratio_top10_at_least_2": bool(ratio >= 2),
               "other_coverage_top10": top10("other_coverage"), "ratio_vs_other_top10": top10("ratio_vs_other"),
               "paired_difference_top10": top10("paired_difference"),
               "paired_difference_sem_top10": top10("paired_difference_sem")}
    return AnalysisOutput(table, fig5.plot_coverage(table), summary)


# ---------------------------------------------------------------- Figure 8

def training_log(checkpoint: str | Path) -> Path | None:
    """`<run>/metrics.jsonl` of a checkpoint folder `<run>/final`, if it exists."""
    path = Path(checkpoint).absolute().parent / "metrics.jsonl"  # not resolve(): a linked final/ keeps its run
    return path if path.is_file() else None


def training_series(log: Path | None) -> tuple[fig8.TrainingSeries, tuple[str, str]] | str:
    """(step, x, y) of the training panel and the keys read, or why there is none."""
    if log is None:
        return "no training log (<run>/metrics.jsonl) next to the checkpoint"
    reasons = []
    for keys in TRAINING_KEYS:
        try:
            return fig8.training_series(log, *keys), keys
        except ValueError as err:
            reasons.append(str(err))
    return f"{log}: {reasons[-1]}"


CIRCULAR_PANEL = ("The paper's right panel (per test instance, heatmap IoU vs mask IoU with the ground truth) is "
                  "not drawn: the mask decoder takes the heatmap as its dense prompt, so the mask follows the "
                  "heatmap by construction. It is replaced by the heatmap scored against the ground truth alone: "
                  "the referred object vs the other objects of the same image, against chance.")
"""Why Figure 8's right panel changed (summary and figure)."""


def object_masks_in_heatmap_frame(c: Collected, sample: int) -> np.ndarray:
    """(n_objects, m, m) bool every object of a sample in the head's mask frame (SAM's padded square),
    binarised at 0.5 after the area resize."""
    from segcompass.postprocess import targets_to_frame

    s = c.samples[sample]
    masks = torch.from_numpy(np.stack([o.mask for o in s.objects]))  # (n, H, W)
    # input_size = the longest side: no resize, the same pad to a square as the model's frame, then to m x m
    return targets_to_frame(masks, input_size=max(s.image.shape[:2]), out_size=c.heatmap_probs.shape[-1]).numpy() > 0.5


def referred_comparison(c: Collected) -> fig8.ReferredVsOther:
    """Each sample's most confident heatmap scored on its referred and its other objects."""
    return fig8.concat_referred_vs_other([
        fig8.referred_vs_other(c.heatmap_probs[b], c.confidences[b], object_masks_in_heatmap_frame(c, b),
                               c.samples[b].targets) for b in range(len(c.samples))])


def _training_panel(log: Path | None) -> tuple[dict[str, Any], list[pd.DataFrame], fig8.PartialCorrelation | None,
                                               tuple[str, str] | None]:
    """Figure 8's left panel: (summary, table rows, fit or None, keys or None)."""
    train = training_series(log)
    if isinstance(train, str):
        return {"skipped": train}, [], None, None
    series, keys = train
    summary: dict[str, Any] = {"log": str(log), "keys": list(keys), "held_fixed": "step (linear, log and hinge terms)"}
    rows = [pd.DataFrame({"panel": "training", "step": series.step, "x": series.x, "y": series.y})]
    try:
        fit = fig8.partial_correlation(series.x, series.y, series.step)
    except ValueError as err:
        return {**summary, "skipped": str(err)}, rows, None, keys
    summary.update(fit.partial.summary(), n_step_terms=fit.n_step_terms, raw=fit.raw.summary())
    rows.append(pd.DataFrame({"panel": "training_step_held_fixed", "step": fit.step, "x": fit.x_residual,
                              "y": fit.y_residual}))
    return summary, rows, fit, keys


def correlation(c: Collected, log: Path | None) -> AnalysisOutput:
    """Figure 8: training SAE MSE vs Dice with the step held fixed (when logged), and the test heatmaps
    on the referred vs the other objects of each image (`analyses.correlation`)."""
    train_summary, rows, fit, keys = _training_panel(log)
    comparison = referred_comparison(c)
    summary = {"training": train_summary, "referred_vs_other": comparison.summary(), "dropped_panel": CIRCULAR_PANEL}
    rows.append(pd.DataFrame({"panel": "referred_vs_other", "sample": comparison.sample, "x": comparison.other,
                              "y": comparison.referred}))
    n_panels = (fit is not None) + bool(len(comparison.referred))
    figure = None
    if n_panels:
        figure, axes = new_figure(n_panels, width=5.5, height=4.8)
        if fit is not None:
            fig8.plot_correlation(fit.partial, fit.x_residual, fit.y_residual, ax=axes[0],
                                  xlabel=f"SAE MSE minus its step trend ({keys[0]})",
                                  ylabel=f"Dice loss minus its step trend ({keys[1]})",
                                  title="Training batches, step held fixed",
                                  note=f"raw r = {fit.raw.pearson_r:.3f} (step not held fixed)")
        if len(comparison.referred):
            fig8.plot_referred_vs_other(comparison, ax=axes[-1],
                                        title=f"Heatmap vs ground truth ({c.samples[0].split} images)")
        figure.suptitle(fig4.subtitled("Correlation between modules (Figure 8)", CIRCULAR_PANEL, width=70 * n_panels),
                        fontsize="medium")
    return AnalysisOutput(pd.concat(rows, ignore_index=True), figure, summary)


# ---------------------------------------------------------------- faithfulness

class FaithItem(NamedTuple):
    """One (sample, slot) whose concept pathway is edited."""

    sample: int
    slot: int
    target: int
    """Index of the matched target instance."""
    iou: float
    """Hard mask IoU of the slot with that target, codes untouched."""


def _hard_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    union = (pred | target).sum().item()
    return (pred & target).sum().item() / union if union else 1.0


def top_slot_items(c: Collected, *, min_iou: float = 0.0) -> list[FaithItem]:
    """Per sample with a target: its best matched (slot, target) pair by hard mask IoU (module docstring)."""
    from segcompass.matching import match_slots

    items = []
    for b in range(len(c.samples)):
        targets = torch.from_numpy(c.model_masks[b] > 0.5)  # (n, m, m)
        if not len(targets):
            continue
        probs = torch.from_numpy(c.mask_probs[b])  # (K, m, m)
        match = match_slots(probs, targets.float())
        pairs = [FaithItem(b, k, t, _hard_iou(probs[k] > 0.5, targets[t]))
                 for k, t in zip(match.slot.tolist(), match.target.tolist())]
        best = max(pairs, key=lambda item: item.iou, default=None)
        if best is not None and best.iou >= min_iou:
            items.append(best)
    return items


def _codes_to(codes, device):
    return type(codes)(codes.indices.to(device), codes.values.to(device), codes.offsets.to(device), codes.d_sae)


EVALUATORS = {"mask": evaluators.slot_mask_evaluator, "heatmap": evaluators.slot_heatmap_evaluator}
"""What faithfulness measures: the slot's mask IoU (the acceptance metric) or its heatmap's soft IoU
(the concept pathway's own output, before the mask decoder)."""


def deletion_results(model, c: Collected, items: list[FaithItem], ks, *, metric: str = "mask", n_draws: int = 3,
                     seed: int = 0, progress: bool = False) -> list[faith.DeletionResult]:
    """Deletion / insertion curves of each item's provenance ranking vs random active atoms."""
    from tqdm.auto import tqdm

    device = next(model.head.parameters()).device
    results = []
    for item in tqdm(items, desc=f"faithfulness ({metric})", disable=not progress):
        b = item.sample
        target = torch.from_numpy(c.model_masks[b][item.target] > 0.5).to(device)
        policy_image = None if c.policy_image is None else c.policy_image[b:b + 1].to(device)
        evaluate = EVALUATORS[metric](model.head, c.slot_embeddings[b:b + 1].to(device),
                                      c.image_embeddings[b:b + 1].to(device), target, item.slot,
                                      policy_image=policy_image)
        results.append(faith.deletion_curves(evaluate, _codes_to(c.sample_codes(b), device),
                                             c.provenance[b][item.slot].atoms, ks, n_draws=n_draws,
                                             seed=seed + b, min_activation=c.threshold))
    return results


def faithfulness(model, c: Collected, *, metric: str = "mask", ks=faith.DEFAULT_KS, n_draws: int = 3,
                 max_items: int = 24, min_iou: float = 0.05, seed: int = 0, progress: bool = False) -> AnalysisOutput:
    """Deletion / insertion on the top slots, scored by `metric` IoU: summary table, figure, summary,
    and every curve point (extra table)."""
    items = top_slot_items(c, min_iou=min_iou)[:max_items]
    if not items:
        reason = f"no sample has a target matched with mask IoU >= {min_iou}"
        return AnalysisOutput(None, None, {"metric": metric, "skipped": reason, "n_items": 0})
    results = deletion_results(model, c, items, ks, metric=metric, n_draws=n_draws, seed=seed, progress=progress)
    split = c.samples[0].split
    table = faith.summarize(results, [split] * len(results), k=5)
    drop = faith.iou_drop(results, k=5)
    summary = {"metric": metric, "n_items": len(results), "ks": [int(k) for k in ks], "n_draws": n_draws,
               "items": [item._asdict() for item in items], **table.iloc[0].to_dict(),
               "drop_ratio_at_least_3": passes_deletion_bar(drop)}
    title = (f"Concept-pathway faithfulness ({'mask IoU' if metric == 'mask' else 'heatmap soft IoU'}): "
             f"top slot of {len(results)} {split} samples")
    figure = faith.plot_faithfulness(results, title=title)
    for ax in figure.axes:  # the shared plot says "mask IoU"
        ax.set_ylabel(f"{'mask IoU' if metric == 'mask' else 'heatmap soft IoU'} (mean of {len(results)} slots)")
    stem = "faithfulness" if metric == "mask" else f"faithfulness_{metric}"
    curves = faith.curves_table(results, [split] * len(results))
    return AnalysisOutput(table, figure, summary, {f"{stem}_curves.csv": curves})


# ---------------------------------------------------------------- concept naming

def scene_objects(c: Collected) -> list[list[naming.SceneObject]]:
    """Every object of every sample with its concepts, masks in the policy's frame."""
    return [[naming.SceneObject(mask, obj.concepts) for mask, obj in zip(masks, naming.world_scene_objects(s))]
            for masks, s in zip(c.scene_masks, c.samples)]


def concept_naming(c: Collected, *, min_count: int = 20, f1_threshold: float = 0.5,
                   group_size: int = 3) -> AnalysisOutput:
    """Name atoms active (h > the codebook threshold) on >= min_count tokens; coverage of the codebook's atoms;
    per concept, the atom or group of up to `group_size` atoms that names it (concept_naming_groups.csv)."""
    concepts = naming.token_concepts(c.token_types, c.image_grid, c.token_sample_index, c.token_strings,
                                     scene_objects(c), c.grid_shapes)
    names, has_concept = naming.concept_matrix(concepts)
    table = naming.name_atoms(c.codes, names, has_concept, min_count=min_count, f1_threshold=f1_threshold,
                              activation_threshold=c.threshold)
    coverage = naming.naming_coverage(table, c.head_codes.indices.numpy())
    summary = {**coverage._asdict(), "fraction_of_frequent": coverage.n_named / coverage.n_frequent
               if coverage.n_frequent else float("nan"), "min_count": min_count, "f1_threshold": f1_threshold,
               "activation_threshold": c.threshold, "n_concepts": len(names),
               "top_names": table[table.confident].head(10)[["atom", "name", "f1"]].to_dict("records")}
    groups = naming.name_concept_groups(c.codes, names, has_concept, max_atoms=group_size, min_count=min_count,
                                        f1_threshold=f1_threshold, activation_threshold=c.threshold)
    named = groups[groups.confident]
    summary.update(group_size=group_size, n_concepts_named_by_one_atom=int((~named.is_group).sum()),
                   n_concepts_named_by_a_group=int(named.is_group.sum()),
                   named_groups=named[named.is_group][["concept", "atoms", "f1", "single_f1"]].to_dict("records"))
    figure = naming.plot_naming(table, f1_threshold=f1_threshold) if len(table) else None
    return AnalysisOutput(None, figure, summary, {NAMES_FILE: table, GROUPS_FILE: groups})


# ---------------------------------------------------------------- runner

def acceptance(summaries: dict[str, dict]) -> dict[str, Any]:
    """The headline numbers the paper's claims are judged by, out of the analyses' summaries
    (NaN where an analysis was skipped)."""
    nan = float("nan")
    f4, f5 = summaries["figure4_activation_patterns"], summaries["figure5_instance_coverage"]
    ff, fh, nm = summaries["faithfulness"], summaries["faithfulness_heatmap"], summaries["concept_naming"]
    margins, versus_other = f4["min_margin_vs_background"], f4["referred_vs_other_instances"]
    return {"image_tokens_caveat": f4["caveat"],
            "referred_minus_other_instances_min_over_tau": versus_other["min_over_tau"],
            "referred_above_other_instances_every_tau": versus_other["above_zero_beyond_2sem_every_tau"],
            "coverage_referred_minus_other_top10": f5["paired_difference_top10"],
            "instance_minus_background_min_over_tau": margins["instance_image"],
            "cot_minus_background_min_over_tau": margins["cot"],
            "instance_and_cot_above_background_every_tau": bool(f4["instance_above_background_every_tau"]
                                                                and f4["cot_above_background_every_tau"]),
            "coverage_top10": f5["coverage_top10"], "random_top10": f5["random_top10"],
            "coverage_ratio_top10": f5["ratio_top10"], "coverage_ratio_at_least_2": f5["ratio_top10_at_least_2"],
            "deletion_drop_top5": ff.get("drop_top5", nan), "deletion_drop_random5": ff.get("drop_random5", nan),
            "deletion_drop_ratio": ff.get("drop_ratio", nan),
            "deletion_ratio_at_least_3": ff.get("drop_ratio_at_least_3", False),
            "heatmap_deletion_drop_top5": fh.get("drop_top5", nan),
            "heatmap_deletion_drop_random5": fh.get("drop_random5", nan),
            "heatmap_deletion_drop_ratio": fh.get("drop_ratio", nan),
            "codebook_atoms_named_fraction": nm["fraction"]}


def slot_readout_analysis(model, *, split: str, n: int, seed: int) -> AnalysisOutput:
    """Linear probes from the <REF_POS> states to the target (fit on `train`, scored on `split`)."""
    from analyses import slot_readout as readout
    from segcompass.world.scenes import generate

    train = readout.slot_states(model.loaded, generate("train", n, seed))
    test = readout.slot_states(model.loaded, generate(split, n, seed))
    table = readout.slot_readout(train, test)
    last = table.iloc[-1]
    summary = {"n_train": len(train.labels), "n_test": len(test.labels), "chance": float(last["chance"]),
               "last_layer_colour_accuracy": float(last["colour_accuracy"]),
               "last_layer_shape_accuracy": float(last["shape_accuracy"])}
    return AnalysisOutput(table, readout.plot_slot_readout(table), summary)


MIN_MEANINGFUL_DROP = 0.01
"""Smallest mean IoU drop (1 point) that counts as "deleting the atoms changed the mask"."""


def passes_deletion_bar(drop) -> bool:
    """The faithfulness bar: deleting a slot's top-5 atoms drops IoU >= 3x more than 5 random active atoms.

    A ratio alone is vacuous when the random drop is ~0 or negative (a 2e-4 drop against
    -1e-5 is an "infinite" ratio of nothing), so the top-5 drop must also be meaningful.
    """
    return bool(drop.drop_top >= MIN_MEANINGFUL_DROP and drop.drop_top >= 3 * max(drop.drop_random, 0.0))


WORLD_ONLY_ANALYSES: dict[str, str] = {
    "figure4_activation_patterns": "compares the referred instance with the image's other objects (world inventory)",
    "figure5_instance_coverage": "compares the referred instance with the image's other objects (world inventory)",
    "figure8_correlation": "scores heatmaps on the referred vs the other objects of each image (world inventory)",
    "faithfulness": "reads analyses.collect's world samples (the causal suite's dose-response is its dataset twin)",
    "faithfulness_heatmap": "reads analyses.collect's world samples (the causal suite's dose-response is its twin)",
    "concept_naming": "names atoms by the world's concepts (colour, shape, position of each object)",
    "slot_readout": "probes the <REF_POS> states for the world target's colour and shape",
}
"""Every analysis of this module, and why a dataset split skips it."""


def skipped_summary(checkpoint: str | Path, out_dir: str | Path, *, data: str, splits: Sequence[str]) -> dict[str, Any]:
    """summary.json for a dataset source: every analysis recorded as skipped, with why (module docstring)."""
    summary = {"checkpoint": str(checkpoint), "data": data, "splits": list(splits),
               "analyses": {stem: {"skipped": reason} for stem, reason in WORLD_ONLY_ANALYSES.items()}}
    write_json(summary, Path(out_dir) / SUMMARY_FILE)
    return summary


def run_all(checkpoint: str | Path, out_dir: str | Path, *, split: str = "val", n: int = 48, seed: int = 1,
            device: str = "cpu", progress: bool = False, **options) -> dict[str, Any]:
    """Every analysis on `n` samples of `split`; writes into out_dir and returns summary.json's content.

    `options`: other `AnalysesConfig` fields (greedy, faith_items, naming_min_count, ...)."""
    return run_analyses(checkpoint, out_dir, AnalysesConfig(split=split, n=n, seed=seed, **options),
                        device=device, progress=progress)


def run_analyses(checkpoint: str | Path, out_dir: str | Path, cfg: AnalysesConfig, *, device: str = "cpu",
                 progress: bool = False) -> dict[str, Any]:
    """`run_all` with a ready config."""
    out_dir, seconds = Path(out_dir), {}
    t = time.perf_counter()
    model, c = collect_checkpoint(checkpoint, split=cfg.split, n=cfg.n, seed=cfg.seed, greedy=cfg.greedy,
                                  batch_size=cfg.batch_size, rank_depth=max(max(cfg.faith_ks), 1), device=device,
                                  progress=progress)
    seconds["collect"] = time.perf_counter() - t
    log = training_log(checkpoint)
    faith_options = dict(ks=cfg.faith_ks, n_draws=cfg.faith_draws, max_items=cfg.faith_items,
                         min_iou=cfg.faith_min_iou, seed=cfg.seed_random, progress=progress)
    steps = {
        "figure4_activation_patterns": lambda: activation_patterns(c),
        "figure5_instance_coverage": lambda: instance_coverage(c, cfg.k_percents, magnitude=cfg.magnitude,
                                                               seed=cfg.seed_random),
        "figure8_correlation": lambda: correlation(c, log),
        "concept_naming": lambda: concept_naming(c, min_count=cfg.naming_min_count, f1_threshold=cfg.naming_f1,
                                                 group_size=cfg.naming_group_size),
        "faithfulness": lambda: faithfulness(model, c, metric="mask", **faith_options),
        "faithfulness_heatmap": lambda: faithfulness(model, c, metric="heatmap", **faith_options),
        "slot_readout": lambda: slot_readout_analysis(model, split=cfg.split, n=cfg.readout_n, seed=cfg.seed),
    }
    summaries, files = {}, {}
    for stem, step in steps.items():
        t = time.perf_counter()
        result = step()
        files[stem] = _write(out_dir, stem, result)
        summaries[stem], seconds[stem] = result.summary, time.perf_counter() - t
        if stem == "concept_naming":
            files[stem]["atom_names_json"] = _write_atom_names(out_dir, result.extra_tables[NAMES_FILE])
    summary = {"checkpoint": str(checkpoint), "config": dataclasses.asdict(cfg), "n_samples": len(c.samples),
               "n_tokens": c.codes.n_tokens, "teacher_forced": c.teacher_forced, "threshold": c.threshold,
               "acceptance": acceptance(summaries), "analyses": summaries, "files": files,
               "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    write_json(summary, out_dir / SUMMARY_FILE)
    return json.loads((out_dir / SUMMARY_FILE).read_text())


def _write(out_dir: Path, stem: str, result: AnalysisOutput) -> dict[str, str]:
    """PNG / CSV / JSON (+ extra CSVs) of one analysis; kind -> file name (relative to out_dir)."""
    written = write_outputs(out_dir, stem, table=result.table, figure=result.figure, summary=result.summary)
    files = {kind: path.name for kind, path in written.items()}
    for name, table in result.extra_tables.items():
        files[name.removesuffix(".csv").removeprefix(f"{stem}_") + "_csv"] = write_csv(table, out_dir / name).name
    return files


def _write_atom_names(out_dir: Path, table: pd.DataFrame) -> str:
    """atom_names.json: {"atom": label} of the confidently named atoms (`segcompass predict --atom-names`)."""
    labels = naming.atom_labels(table)
    return write_json({str(atom): label for atom, label in sorted(labels.items())}, out_dir / ATOM_NAMES_FILE).name
