"""`segcompass ablate --study modes|reward|group-size|backbone`: the paper's ablations on the
embedded world, at a fixed compute budget.

    modes       Table 4   seg / rl / rl+seg
    reward      Table 6   format only / mask only / 0.3 format + 0.7 mask   (rl+seg)
    group-size  Figure 6  G = 2, 4, 8 with the same rollouts per step     (rl+seg)
    backbone    Table 5   SAM sam-tiny-16 / sam-tiny-32 (4x the image tokens of the decoder)

Fixed budget: every run takes `steps` optimizer steps over `sequences` sequences per step
(seg: `sequences` teacher-forced samples; GRPO: `sequences / G` prompts x G rollouts), from
the same warm-started policy, SAE and seed. Wall-clock differs (rollouts cost generation
and a reference pass) and is reported. Every run is then evaluated greedily on the same
world samples (`segcompass.evaluate`).

Output (cfg.out/<study>/):
    <run>/          the run's training folder (resumable) and result.json once evaluated
    results.csv     one row per run
    results.md      the same table, metrics in percent
A finished run (result.json present) is skipped, so an interrupted study continues.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from saekit.atomic import atomic_write_json, atomic_write_text
from saekit.errors import UserError

STUDIES = ("modes", "reward", "group-size", "backbone")
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class AblateConfig:
    """One ablation study on the embedded world."""

    study: Literal["modes", "reward", "group-size", "backbone"]
    """Which ablation: modes (Table 4), reward (Table 6), group-size (Figure 6), backbone (Table 5)."""
    policy: Path
    """Warm-started policy folder (`segcompass warmstart` output)."""
    sae: Path
    """SAE folder trained on the policy's layer `sae_layer`."""
    sam_path: Path | None = None
    """Pretrained world SAM (`segcompass sam-pretrain` output); None trains sam-tiny-16 from scratch."""
    out: Path = Path("runs/ablate")
    """Output folder; the study writes into out/<study>/."""
    sae_layer: int = 2
    """Policy layer the SAE reads."""
    steps: int = 500
    """Optimizer steps per run (the fixed budget, with `sequences`); enough for the heads to
    learn to ground."""
    sequences: int = 16
    """Sequences per step: seg samples, or GRPO prompts x group size."""
    group_size: int = 8
    """G of the GRPO runs (the group-size study varies it)."""
    policy_lr_mult: float = 1.0
    """`TrainConfig.policy_lr_mult` of every run (the policy's learning rate over the base 2e-5)."""
    heatmap_dice_weight: float = 1.0
    """`TrainConfig.heatmap_dice_weight` of every run (1.0, as the demo trains the world)."""
    data: tuple[str, ...] = ("world",)
    """Training sources of every run (`segcompass train --data`, docs/real-data.md)."""
    eval_data: str = "world"
    """Evaluation source (`segcompass eval --data`); its own split names in --eval-splits."""
    eval_n: int = 100
    """Samples per evaluation split."""
    eval_splits: tuple[str, ...] = ("testA", "testB", "multi", "reason")
    """Splits every run is evaluated on (`reason` is the zero-shot one)."""
    eval_seed: int = 7
    """World seed of the evaluation samples."""
    seed: int = 0
    """Seed of every run (initialisation, data order, rollouts)."""
    threads: int = 0
    """torch CPU threads; 0 = all cores."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu', 'cuda', ..."""

    def __post_init__(self) -> None:
        if self.study not in STUDIES:
            raise UserError(f"ablate: unknown study {self.study!r}; choose one of {', '.join(STUDIES)}")
        if self.steps < 1 or self.eval_n < 1 or self.sequences < 2:
            raise UserError(f"ablate: need --steps >= 1, --eval-n >= 1, --sequences >= 2 "
                            f"(got {self.steps}, {self.eval_n}, {self.sequences})")


class Run(NamedTuple):
    """One row of a study: its name and the TrainConfig fields it sets."""

    name: str
    settings: dict[str, Any]


def _grpo(cfg: AblateConfig, group_size: int, **extra) -> dict[str, Any]:
    if cfg.sequences % group_size:
        raise UserError(f"ablate: --sequences {cfg.sequences} is not a multiple of group size {group_size}")
    return {"group_size": group_size, "rl_prompts": cfg.sequences // group_size, **extra}


def study_runs(cfg: AblateConfig) -> list[Run]:
    """The runs of `cfg.study`, each as TrainConfig overrides."""
    rl_seg = {"mode": "rl+seg", **_grpo(cfg, cfg.group_size)}
    if cfg.study == "modes":
        return [Run("seg", {"mode": "seg", "batch_size": cfg.sequences}),
                Run("rl", {"mode": "rl", **_grpo(cfg, cfg.group_size)}),
                Run("rl+seg", rl_seg)]
    if cfg.study == "reward":
        return [Run("format-only", {**rl_seg, "format_reward_weight": 1.0, "mask_reward_weight": 0.0}),
                Run("mask-only", {**rl_seg, "format_reward_weight": 0.0, "mask_reward_weight": 1.0}),
                Run("format+mask", {**rl_seg, "format_reward_weight": 0.3, "mask_reward_weight": 0.7})]
    if cfg.study == "group-size":
        return [Run(f"G={g}", {"mode": "rl+seg", **_grpo(cfg, g)}) for g in (2, 4, 8) if cfg.sequences % g == 0]
    # both backbones from scratch: a pretrained --sam-path fits one preset only
    return [Run(preset, {**rl_seg, "sam_preset": preset, "sam_path": None}) for preset in ("sam-tiny-16", "sam-tiny-32")]


def train_config(cfg: AblateConfig, run: Run):
    from segcompass.training.supervised import TrainConfig

    return TrainConfig(policy=cfg.policy, sae=cfg.sae, out=Path(cfg.out) / cfg.study / _folder(run.name),
                       sae_layer=cfg.sae_layer, steps=cfg.steps, seed=cfg.seed, threads=cfg.threads,
                       device=cfg.device, checkpoint_every=max(1, cfg.steps // 4),
                       log_every=max(1, cfg.steps // 50), policy_lr_mult=cfg.policy_lr_mult,
                       heatmap_dice_weight=cfg.heatmap_dice_weight, data=tuple(cfg.data),
                       **{"sam_path": cfg.sam_path, **run.settings})


def _folder(name: str) -> str:
    return name.replace("+", "_plus_").replace("=", "")


def rollouts_to_convergence(losses: list[tuple[int, float]], rollouts_per_step: int, *, window: int = 10,
                            tolerance: float = 0.05) -> int | None:
    """Figure 6's 'samples to convergence': rollouts up to the first logged step from which the
    loss's rolling mean (over `window` records) stays within `tolerance` of its final value."""
    if len(losses) < window:
        return None
    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    means = [sum(values[i - window + 1:i + 1]) / window for i in range(window - 1, len(values))]
    final = means[-1]
    inside = [abs(m - final) <= tolerance * max(abs(final), 1e-8) for m in means]
    first = len(inside) - 1
    while first > 0 and inside[first - 1]:
        first -= 1
    return steps[first + window - 1] * rollouts_per_step


def _losses(metrics: Path) -> list[tuple[int, float]]:
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r and r.get("loss") is not None]


def run_one(cfg: AblateConfig, run: Run, *, progress: bool = True) -> dict[str, Any]:
    """Train (or resume) one run, evaluate it greedily, and return its result row."""
    from segcompass.evaluate import run_evaluation
    from segcompass.model import load_segcompass
    from segcompass.training.supervised import train

    train_cfg = train_config(cfg, run)
    t0 = time.perf_counter()
    final = train(train_cfg, progress=progress)
    train_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    results = run_evaluation(load_segcompass(final, device=_device(cfg)), cfg.eval_splits, cfg.eval_n, cfg.eval_seed,
                             progress=progress, data=cfg.eval_data)
    scores = {split: result.scores for split, result in results.items()}
    sequences_per_step = train_cfg.batch_size if train_cfg.mode == "seg" else train_cfg.rl_prompts * train_cfg.group_size
    row = {"study": cfg.study, "run": run.name, "mode": train_cfg.mode,
           "group_size": train_cfg.group_size if train_cfg.mode != "seg" else None,
           "format_weight": train_cfg.format_reward_weight, "mask_weight": train_cfg.mask_reward_weight,
           "sam_preset": train_cfg.sam_preset, "policy_lr": train_cfg.lr * train_cfg.policy_lr_mult,
           "steps": train_cfg.steps, "sequences_per_step": sequences_per_step,
           "rollouts": train_cfg.steps * sequences_per_step if train_cfg.mode != "seg" else 0,
           "rollouts_to_convergence": (rollouts_to_convergence(_losses(Path(train_cfg.out) / "metrics.jsonl"),
                                                               sequences_per_step)
                                       if train_cfg.mode != "seg" else None),
           "train_s": round(train_s, 1), "eval_s": round(time.perf_counter() - t1, 1)}
    for split, s in scores.items():
        row.update({f"{split}/giou": s.giou, f"{split}/ciou": s.ciou})
        if s.n_no_target:
            row[f"{split}/n_acc"] = s.n_acc
    return row


def _device(cfg: AblateConfig):
    from saekit.models import resolve_device

    return resolve_device(cfg.device)


def run_study(cfg: AblateConfig, *, progress: bool = True) -> Path:
    """Run every run of the study (skipping finished ones) and write results.csv / results.md."""
    folder = Path(cfg.out) / cfg.study
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in study_runs(cfg):
        result = folder / _folder(run.name) / RESULT_FILE
        if result.is_file():
            rows.append(json.loads(result.read_text()))
            continue
        print(f"== ablate {cfg.study}: {run.name}", flush=True)
        row = run_one(cfg, run, progress=progress)
        atomic_write_json(result, _jsonable(row))
        rows.append(_jsonable(row))
    atomic_write_text(folder / "results.csv", results_csv(rows))
    atomic_write_text(folder / "results.md", results_table(rows, cfg))
    return folder


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def results_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def results_table(rows: list[dict[str, Any]], cfg: AblateConfig) -> str:
    """Markdown: one row per run, gIoU / cIoU per split in percent, wall-clock."""
    splits = [s for s in cfg.eval_splits if any(f"{s}/giou" in r for r in rows)]
    head = ["run", *[f"{s} gIoU" for s in splits], *[f"{s} cIoU" for s in splits], "train s"]
    lines = [f"Study `{cfg.study}`: {cfg.steps} steps x {cfg.sequences} sequences per run, "
             f"{cfg.eval_n} greedy-decoded samples per split (world seed {cfg.eval_seed}).", "",
             "| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for row in rows:
        cells = [row["run"], *[_pct(row.get(f"{s}/giou")) for s in splits],
                 *[_pct(row.get(f"{s}/ciou")) for s in splits], f"{row['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"
