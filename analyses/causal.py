"""The causal suite (issue 19, item 1): do the masks come from the SAE atoms?

For a checkpoint and splits of a source (the world, or a dataset: `--data`), each sample is decoded
greedily once and run through the policy once (`analyses.causal_pass`); every test then re-runs only
the head on edited inputs:

    pathway        r_k, the slot-query input, the keys' policy term, all codes: removed, averaged,
                   shuffled across samples (`analyses.causal_pathway`)
    conflict       one image, referents A and B; A's states with B's codes (`analyses.causal_conflict`)
    dose           deletion / insertion of the top p% (token, atom) pairs by provenance, by gradient
                   x activation, at random; e_k present and zeroed (`analyses.causal_dose`)
    concept edit   one colour's (shape's) atoms replaced by another's at the response tokens
                   (`analyses.causal_concept_edit`)
    variance       fraction of the layer's variance explained by the thresholded code (`causal_pass`)

On a dataset (RefCOCO/+/g, gRefCOCO, ReasonSeg) only pathway, dose and variance run: they need
images, instructions, target masks and ignore pixels. The conflict test and the concept edit need
the world's scene metadata (WORLD_ONLY_TESTS says why); causal.json records them as skipped, per
split and under "skipped".

Output folder (`run_causal_suite`):
    causal.json                every number: "acceptance" (below), then "splits" -> split -> test
    causal_pathway.csv         split, condition, giou, ciou, n_acc, t_acc, off_target_share, ...
    causal_conflict.csv        one row per conflict trial; causal_conflict_summary.csv per family
    causal_dose.csv            split, setting, ranking, direction, percent, giou, soft_iou
    causal_concept_edit.csv    one row per edited sample
    causal_pathway.png, causal_conflict.png, causal_dose_<split>.png

causal.json "acceptance": zero_codes_giou_drop[split] (unedited - codes_removed gIoU),
shuffled_codes_off_target_share[split] (and unedited_off_target_share[split]),
conflict_follow_codes_share[split | "all_splits"], deletion_cost_ratio_top10_vs_random10[split]
{provenance, attribution} (e_k present), variance_explained_thresholded[split].
"""

from __future__ import annotations

import dataclasses
import html
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analyses import causal_concept_edit as edit
from analyses import causal_conflict as conflict
from analyses import causal_dose as dose
from analyses import causal_pathway as pathway
from analyses.causal_pass import SplitPass, run_split_pass, source_samples
from analyses.plotting import GROUP_COLOURS, label_axes, new_figure, save_png, write_csv, write_json
from saekit.errors import UserError

CAUSAL_FILE = "causal.json"
CAUSAL_DIR = "causal"
"""Sub-folder of `segcompass analyze --out` the suite writes into."""
DEFAULT_SPLITS = ("testA", "multi")
WORLD_ONLY_TESTS: dict[str, str] = {
    "conflict": "needs the world's object inventory to name a second referent in the same image",
    "concept_edit": "needs the world's colour / shape labels to name atoms and to pick the edited object",
}
"""Tests a dataset split skips, and why."""


@dataclass(frozen=True)
class CausalConfig:
    """What the causal suite measures, on how many samples."""

    splits: tuple[str, ...] = DEFAULT_SPLITS
    """Splits of `data` (each gets its own greedy pass): the world's, or the dataset's own names."""
    n: int = 200
    """Samples per split (the first n of the split's stream for `seed`; of a dataset split, its first n)."""
    seed: int = 1
    """World seed of the samples (1: `segcompass eval`'s default; the demo evaluates seed 7)."""
    batch_size: int = 16
    """Samples per decoding / policy / head batch (16 = `segcompass eval`'s, so unedited scores match)."""
    max_new_tokens: int = 96
    """Longest greedy response."""
    conf_threshold: float = 0.5
    """Multi-object prompt: slots with confidence >= this make the mask (as `segcompass eval`)."""
    percents: tuple[float, ...] = dose.PERCENTS
    """Dose-response: shares (%) of each sample's pairs removed / kept; must hold 0, 10 and 100."""
    conflict_pairs: int = 200
    """Conflict test: at most this many pairs per split."""
    seed_random: int = 0
    """Seed of the shuffles, random rankings and conflict templates."""
    naming_min_count: int = 20
    """Concept edit: atoms active on fewer tokens are not named."""
    naming_f1: float = 0.5
    """Concept edit: a name is confident when its F1 is at least this."""
    data: str = "world"
    """Source of the samples: world, refcoco[+|g]:ROOT, grefcoco:ROOT or reasonseg:DIR (docs/real-data.md);
    a dataset runs pathway, dose and variance only."""
    split_by: str | None = None
    """RefCOCO-family refs file: unc, umd or google (default: unc; umd for refcocog)."""

    def __post_init__(self) -> None:
        from segcompass.data.sources import parse_data
        from segcompass.world.scenes import SPLITS

        spec = parse_data(self.data)
        if spec.weight != 1.0:
            raise UserError(f"causal: --data {self.data}: a weight is for training mixtures")
        if spec.kind == "world" and (unknown := [s for s in self.splits if s not in SPLITS]):
            raise UserError(f"causal: unknown split(s) {', '.join(unknown)}; choose from {', '.join(SPLITS)}")
        if not self.splits or self.n < 1 or self.batch_size < 1 or self.conflict_pairs < 0:
            raise UserError("causal: need at least one split, n >= 1, batch_size >= 1 and conflict_pairs >= 0")
        if not {0, 10, 100} <= set(self.percents) or sorted(self.percents) != list(self.percents):
            raise UserError(f"causal: percents must be increasing and hold 0, 10 and 100, got {self.percents}")

    @property
    def world(self) -> bool:
        """Whether the samples are the embedded world's (every test runs) rather than a dataset's."""
        from segcompass.data.sources import parse_data

        return parse_data(self.data).kind == "world"

    def record(self) -> dict[str, Any]:
        """JSON-able config for causal.json (a world run's without `data` / `split_by`: as before datasets)."""
        record = dataclasses.asdict(self)
        if self.world:
            del record["data"], record["split_by"]
        return record


def _conflict(model, sp: SplitPass, cfg: CausalConfig, progress: bool, run: dict) -> tuple[dict, pd.DataFrame]:
    """The conflict test on one world split: (summary, trials)."""
    pairs = conflict.conflict_pairs(sp.samples, seed=cfg.seed_random, max_pairs=cfg.conflict_pairs)
    if not pairs:
        return ({"n_pairs": 0, "skipped": "no single-target sample admits a second referent"},
                pd.DataFrame(columns=["pair", "lands", "clean"]))
    n_single = sum(len(s.targets) == 1 for s in sp.samples)
    trials = conflict.conflict_trials(model, sp, pairs, max_new_tokens=cfg.max_new_tokens, progress=progress, **run)
    return conflict.conflict_summary(trials, n_single), trials


def _split_tests(model, sp: SplitPass, cfg: CausalConfig, progress: bool) -> tuple[dict, dict[str, pd.DataFrame]]:
    """Pathway, conflict (world only), dose and variance on one split: (summary, tables)."""
    run = {"batch_size": cfg.batch_size, "conf_threshold": cfg.conf_threshold}
    seconds, t = {}, time.perf_counter()
    path = pathway.pathway_ablation(model, sp, seed=cfg.seed_random, progress=progress, **run)
    seconds["pathway"] = time.perf_counter() - t
    if cfg.world:
        t = time.perf_counter()
        conflict_summary, trials = _conflict(model, sp, cfg, progress, run)
        seconds["conflict"] = time.perf_counter() - t
    else:
        conflict_summary, trials = {"skipped": WORLD_ONLY_TESTS["conflict"]}, pd.DataFrame()
    t = time.perf_counter()
    curves = dose.dose_response(model, sp, percents=cfg.percents, seed=cfg.seed_random, progress=progress, **run)
    seconds["dose"] = time.perf_counter() - t
    summary = {"n_samples": len(sp.samples), "pathway": pathway.pathway_summary(path), "conflict": conflict_summary,
               "dose": dose.dose_summary(curves), "variance_explained": sp.variance.explained(),
               "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    table = pd.DataFrame([{"split": sp.split, "condition": c, **v} for c, v in summary["pathway"]["conditions"].items()])
    return summary, {"pathway": table, "conflict": trials.assign(split=sp.split) if len(trials) else trials,
                     "dose": curves.assign(split=sp.split)}


def acceptance(splits: dict[str, dict], conflict_trials: pd.DataFrame) -> dict[str, Any]:
    """The numbers issue 19 asks for, out of the per-split summaries (module docstring)."""
    def pick(fn):
        out = {}
        for split, s in splits.items():
            try:
                out[split] = fn(s)
            except (KeyError, IndexError):
                out[split] = None
        return out

    pooled = float((conflict_trials.lands == "codes").mean()) if len(conflict_trials) else None
    return {
        "zero_codes_giou_drop": pick(lambda s: s["pathway"]["giou_drop_codes_removed"]),
        "shuffled_codes_off_target_share": pick(lambda s: s["pathway"]["conditions"]["codes_shuffled"]["off_target_share"]),
        "unedited_off_target_share": pick(lambda s: s["pathway"]["conditions"]["unedited"]["off_target_share"]),
        "conflict_follow_codes_share": {**pick(lambda s: s["conflict"]["all"]["follows_codes"]), "all_splits": pooled},
        "deletion_cost_ratio_top10_vs_random10": pick(
            lambda s: s["dose"]["settings"]["e_present"]["ratio_top10_vs_random10"]),
        "variance_explained_thresholded": pick(lambda s: s["variance_explained"]["thresholded"]),
    }


def run_causal_suite(checkpoint, out_dir: str | Path, *, splits=DEFAULT_SPLITS, n: int = 200, seed: int = 1,
                     device: str = "cpu", progress: bool = False, **options) -> dict[str, Any]:
    """Every test of the module docstring; writes out_dir and returns causal.json's content.

    `checkpoint`: a folder or a loaded SegCompass; `options`: other `CausalConfig` fields (data, ...)."""
    cfg = CausalConfig(splits=tuple(splits), n=n, seed=seed, **options)
    return run_causal(checkpoint, out_dir, cfg, device=device, progress=progress)


def run_causal(checkpoint, out_dir: str | Path, cfg: CausalConfig, *, device: str = "cpu",
               progress: bool = False) -> dict[str, Any]:
    """`run_causal_suite` with a ready config."""
    from segcompass.model import load_segcompass

    model = load_segcompass(checkpoint, device=device) if isinstance(checkpoint, (str, Path)) else checkpoint
    model.eval()
    out_dir, seconds = Path(out_dir), {}
    passes, summaries, tables = {}, {}, {"pathway": [], "conflict": [], "dose": [], "concept_edit": []}
    for split in cfg.splits:
        t = time.perf_counter()
        samples = source_samples(cfg.data, split, cfg.n, seed=cfg.seed, split_by=cfg.split_by)
        passes[split] = run_split_pass(model, split, samples, batch_size=cfg.batch_size,
                                       max_new_tokens=cfg.max_new_tokens, progress=progress)
        seconds[f"pass_{split}"] = time.perf_counter() - t
        summaries[split], split_tables = _split_tests(model, passes[split], cfg, progress)
        for name, table in split_tables.items():
            tables[name].append(table)
    if cfg.world:
        t = time.perf_counter()
        _concept_edits(model, passes, cfg, summaries, tables["concept_edit"])
        seconds["concept_edit"] = time.perf_counter() - t
    else:
        for split in passes:
            summaries[split]["concept_edit"] = {"skipped": WORLD_ONLY_TESTS["concept_edit"]}
    joined = {name: pd.concat([t for t in parts if len(t)], ignore_index=True) if any(len(t) for t in parts)
              else pd.DataFrame() for name, parts in tables.items()}
    files = _write_tables(out_dir, joined, summaries)
    record = {"checkpoint": str(checkpoint) if isinstance(checkpoint, (str, Path)) else None,
              "routing": model.head_cfg.routing, "policy_image_keys": model.head_cfg.policy_image_keys,
              "config": cfg.record(),
              "acceptance": acceptance(summaries, joined["conflict"]),
              "splits": summaries, "files": files, "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    if not cfg.world:
        record["skipped"] = dict(WORLD_ONLY_TESTS)
    write_json(record, out_dir / CAUSAL_FILE)
    return record


def _concept_edits(model, passes: dict[str, SplitPass], cfg: CausalConfig, summaries: dict[str, dict],
                   tables: list[pd.DataFrame]) -> None:
    """Name concept atoms on every world split's pass, then edit each split: fills summaries and tables."""
    atoms = edit.name_concept_atoms(list(passes.values()), image_processor=model.loaded.image_processor,
                                    min_count=cfg.naming_min_count, f1_threshold=cfg.naming_f1)
    for split, sp in passes.items():
        part = [edit.concept_edit(model, sp, atoms, kind, batch_size=cfg.batch_size,
                                  conf_threshold=cfg.conf_threshold) for kind in edit.KINDS]
        table = pd.concat(part, ignore_index=True)
        summaries[split]["concept_edit"] = edit.concept_edit_summary(table, atoms)
        tables.append(table)


def _write_tables(out_dir: Path, tables: dict[str, pd.DataFrame], summaries: dict[str, dict]) -> dict[str, str]:
    """CSV tables and PNG figures; name -> file name (relative to out_dir)."""
    files = {}
    for name, table in tables.items():
        if len(table):
            files[f"{name}_csv"] = write_csv(table, out_dir / f"causal_{name}.csv").name
    conflicts = {s: v["conflict"] for s, v in summaries.items() if v["conflict"].get("n_pairs")}
    if conflicts:
        rows = [{"split": s, "family": f, "trials": kind, **v[kind]} for s, c in conflicts.items()
                for f, v in {"all": {"all": c["all"], "clean": c["clean"]}, **c["by_family"]}.items()
                for kind in ("all", "clean")]
        files["conflict_summary_csv"] = write_csv(pd.DataFrame(rows), out_dir / "causal_conflict_summary.csv").name
        files["conflict_png"] = save_png(plot_conflict(conflicts), out_dir / "causal_conflict.png").name
    if len(tables["pathway"]):
        files["pathway_png"] = save_png(plot_pathway(tables["pathway"]), out_dir / "causal_pathway.png").name
    for split in summaries:
        part = tables["dose"][tables["dose"].split == split] if len(tables["dose"]) else tables["dose"]
        if len(part):
            figure = plot_dose(part, title=f"Dose-response, {split} ({int(part.n_items.iloc[0])} single-target samples)")
            files[f"dose_{split}_png"] = save_png(figure, out_dir / f"causal_dose_{split}.png").name
    return files


# ---------------------------------------------------------------- figures

LANDING_COLOURS = {"follows_codes": "#2ca02c", "follows_state": "#1f77b4", "elsewhere": "#7f7f7f"}
RANKING_STYLE = {"provenance": ("#d62728", "o"), "attribution": ("#9467bd", "^"), "random": ("#7f7f7f", "s")}


def plot_pathway(table: pd.DataFrame, *, title: str = "Pathway ablation") -> Figure:
    """Grouped bars: gIoU per condition (x), one bar per split; table columns split, condition, giou."""
    conditions = list(dict.fromkeys(table.condition))
    splits = list(dict.fromkeys(table.split))
    fig, (ax,) = new_figure(1, width=max(7.0, 0.9 * len(conditions) * max(1, len(splits)) / 1.5), height=4.6)
    width = 0.8 / len(splits)
    x = np.arange(len(conditions))
    for i, split in enumerate(splits):
        part = table[table.split == split].set_index("condition").reindex(conditions)
        ax.bar(x + i * width - 0.4 + width / 2, part.giou.to_numpy(dtype=float) * 100, width,
               color=GROUP_COLOURS[i % len(GROUP_COLOURS)], label=split)
    ax.set_xticks(x, conditions, rotation=35, ha="right")
    label_axes(ax, "condition (what was removed or replaced)", "gIoU (%)", title)
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", title="split")
    return fig


def plot_conflict(summaries: dict[str, dict], *, title: str = "Conflict test: A's states, B's codes") -> Figure:
    """Stacked bars per (split, family of A): share following the codes, the state, or neither."""
    labels, shares = [], {k: [] for k in LANDING_COLOURS}
    for split, summary in summaries.items():
        groups = {"all": summary["all"], **{f: v["all"] for f, v in summary.get("by_family", {}).items()}}
        for family, entry in groups.items():
            labels.append(f"{split}\n{family} (n={entry['n_trials']})")
            for key in LANDING_COLOURS:
                value = entry[key]
                shares[key].append(0.0 if value is None or np.isnan(value) else 100 * value)
    fig, (ax,) = new_figure(1, width=max(6.0, 1.1 * len(labels)), height=4.6)
    bottom = np.zeros(len(labels))
    names = {"follows_codes": "lands on the codes' referent (B)", "follows_state": "lands on the state's referent (A)",
             "elsewhere": "elsewhere / empty"}
    for key, colour in LANDING_COLOURS.items():
        ax.bar(np.arange(len(labels)), shares[key], bottom=bottom, color=colour, label=names[key])
        bottom += np.asarray(shares[key])
    ax.set_xticks(np.arange(len(labels)), labels, fontsize="small")
    label_axes(ax, "split / family of A (trials: both directions)", "share of masks (%)", title)
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    return fig


def plot_dose(table: pd.DataFrame, *, title: str = "Dose-response") -> Figure:
    """Four panels (deletion / insertion x gIoU / heatmap soft IoU), a line per ranking and setting."""
    fig, axes = new_figure(4, width=4.0, height=4.2)
    panels = [(d, m) for d in ("deletion", "insertion") for m in ("giou", "soft_iou")]
    dashes = {"e_present": "-", "e_zeroed": "--"}
    for ax, (direction, metric) in zip(axes, panels):
        for (setting, ranking), part in table[table.direction == direction].groupby(["setting", "ranking"], sort=False):
            part = part.sort_values("percent")
            colour, marker = RANKING_STYLE[ranking]
            ax.plot(part.percent, 100 * part[metric], color=colour, marker=marker, linestyle=dashes.get(setting, ":"),
                    label=f"{ranking}, {setting.replace('_', ' ')}")
        ax.set_xscale("symlog", linthresh=1)
        verb = "removed" if direction == "deletion" else "kept"
        label_axes(ax, f"% of each sample's (token, atom) pairs {verb}",
                   "gIoU (%)" if metric == "giou" else "heatmap soft IoU (%)", direction.capitalize())
        ax.set_ylim(-2, 102)
        ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return fig


def index_html(folder: str | Path, href_prefix: str = "") -> str:
    """HTML links to a causal suite's JSON and figures in `folder` (empty when it has not run), for an index page."""
    folder = Path(folder)
    if not (folder / CAUSAL_FILE).is_file():
        return ""
    names = [CAUSAL_FILE] + sorted(p.name for p in folder.glob("causal_*.png"))
    links = "".join(f'<li><a href="{html.escape(href_prefix + name)}">{html.escape(name)}</a></li>' for name in names)
    return f"<h2>Causal suite</h2><ul>{links}</ul>"
