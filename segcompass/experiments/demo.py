"""`segcompass demo`: the whole embedded pipeline, end to end, on a laptop CPU.

    world -> warm-started tiny policy -> pretrained world SAM -> activation cache -> SAE -> SegCompass training
          -> evaluation -> prediction report -> index.html

Every stage writes into its own folder under `out` and is skipped when its result is
already there, so an interrupted demo picks up where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal



@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the embedded demo (the `--quick` variant is what CI runs)."""

    out: Path = Path("runs/demo")
    """Output folder; index.html at its top links every result."""
    quick: bool = False
    """A few-minute run with smaller everything (its numbers are only a smoke test)."""
    sae_layer: int = 2
    """Policy layer the SAE reads (of the tiny policy's 4)."""
    d_sae: int = 4096
    """SAE width for the world (the paper's 65536 is for 4096-wide 7B layers)."""
    sae_samples: int = 2000
    """World samples (image + instruction + chain of thought) whose activations train the SAE."""
    sae_tokens: int = 600_000
    """Tokens the SAE trains on (the cache is cycled)."""
    absence_steps: int = 400
    """Steps of the warm start's last phase (`warmstart --init-from ... --split train_absence`):
    the finished policy sees the no-target relation case twice as often, to sharpen its
    absence decision. 0 = skip."""
    absence_lr: float = 5e-4
    """Peak learning rate of that phase (the first phase peaks at 2e-3 and ends at 2e-4)."""
    sam_steps: int = 800
    """Promptable-segmentation pretraining steps of the world SAM (`segcompass sam-pretrain`)."""
    seg_steps: int = 1000
    """SegCompass training steps (`segcompass train --steps`)."""
    mode: Literal["seg", "rl", "rl+seg"] = "seg"
    """SegCompass training mode (`segcompass train --mode`)."""
    heatmap_dice_weight: float = 1.0
    """`segcompass train --heatmap-dice-weight` (paper: 0; the world's masks gain from it)."""
    hallucination_share: float = 0.0
    """`segcompass train --hallucination-share`: share of training samples replaced by a
    no-target instruction whose chain of thought names an absent object (`world.hallucinated_sample`).
    Mode seg only (the GRPO modes train on the policy's own rollouts)."""
    head_routing: Literal["paper", "concepts"] = "paper"
    """`segcompass train --head-routing`: what the slot mapper reads (raw states or SAE atoms only)."""
    eval_samples: int = 200
    """Samples per evaluation split."""
    causal_samples: int = 100
    """Samples per split (testA, multi) of the causal suite (`segcompass analyze --causal`); 0 = skip."""
    seed: int = 0
    """Seeds every stage."""

    def effective(self) -> "DemoConfig":
        if not self.quick:
            return self
        return dataclasses.replace(self, sae_samples=300, sae_tokens=120_000, sam_steps=60, seg_steps=60,
                                   eval_samples=40, d_sae=2048, absence_steps=min(self.absence_steps, 20),
                                   causal_samples=min(self.causal_samples, 8))


EVAL_SPLITS = ("val", "testA", "testB", "multi", "reason")
REASONING_JSON = "reasoning_to_mask.json"
"""`analyses.reasoning_to_mask` output in the analyses folder (the evaluation's masks vs its CoTs)."""


def _stage(name: str, done: bool) -> bool:
    print(f"\n== {name}" + (" (done, skipped)" if done else ""), flush=True)
    return not done


def run_demo(cfg: DemoConfig) -> Path:
    cfg = cfg.effective()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    policy_dir = _warmstart(cfg, out / "warmstart")
    policy_dir = _absence_phase(cfg, out / "warmstart-absence", policy_dir.parent)
    timings["warmstart"] = time.perf_counter() - t0
    t = time.perf_counter()
    sam_dir = _sam(cfg, out / "sam")
    timings["sam"] = time.perf_counter() - t
    t = time.perf_counter()
    sae_dir = _sae(cfg, out, policy_dir)
    timings["sae"] = time.perf_counter() - t
    t = time.perf_counter()
    checkpoint = _segcompass(cfg, out / "segcompass", policy_dir, sae_dir, sam_dir)
    timings["segcompass"] = time.perf_counter() - t
    t = time.perf_counter()
    _evaluate(cfg, out / "eval", checkpoint)
    timings["eval"] = time.perf_counter() - t
    t = time.perf_counter()
    analyses = _analyses(cfg, out / "analyses", checkpoint)
    timings["analyses"] = time.perf_counter() - t
    t = time.perf_counter()
    _causal(cfg, out / "analyses", checkpoint)
    timings["causal suite"] = time.perf_counter() - t
    reports = _reports(out / "predict", checkpoint, _atom_names(out / "analyses"))
    timings["total"] = time.perf_counter() - t0
    index = _index(out, cfg, reports, timings, analyses)
    print(f"\nresults table:\n{(out / 'eval' / 'metrics.md').read_text()}")
    print(f"index page: {index.resolve()}")
    return index


def _warmstart(cfg: DemoConfig, out: Path) -> Path:
    from segcompass.world.warmstart import MODEL_DIR, WarmstartConfig, train

    model_dir = out / MODEL_DIR
    if _stage("warm start of the tiny policy", (out / "eval.json").is_file()):
        train(WarmstartConfig(out=out, quick=cfg.quick, seed=cfg.seed))
    return model_dir


def _absence_phase(cfg: DemoConfig, out: Path, warmstart: Path) -> Path:
    """The warm start's last phase; returns the policy every later stage uses."""
    from segcompass.world.warmstart import MODEL_DIR, WarmstartConfig, train

    if not cfg.absence_steps:
        return warmstart / MODEL_DIR
    if _stage("warm start, last phase: absence of a related object", (out / "eval.json").is_file()):
        train(WarmstartConfig(out=out, init_from=warmstart, split="train_absence", steps=cfg.absence_steps,
                              lr=cfg.absence_lr, warmup_steps=min(20, cfg.absence_steps), seed=cfg.seed,
                              eval_samples=100 if cfg.quick else WarmstartConfig.eval_samples))
    return out / MODEL_DIR


def _sam(cfg: DemoConfig, out: Path) -> Path:
    from segcompass.world.sam_pretrain import REPORT_FILE, SAM_DIR, SamPretrainConfig, pretrain_sam

    if _stage("pretraining of the world SAM", (out / REPORT_FILE).is_file()):
        pretrain_sam(SamPretrainConfig(out=out, steps=cfg.sam_steps, prompts_per_image=2, seed=cfg.seed,
                                       eval_samples=40 if cfg.quick else 200))
    return out / SAM_DIR


def _sae(cfg: DemoConfig, out: Path, policy_dir: Path) -> Path:
    from saekit.cache import CacheConfig, build_cache
    from saekit.sae.config import SAETrainConfig
    from saekit.sae.data import training_data
    from saekit.sae.training import train_sae
    from segcompass.world.scenes import export_jsonl, generate

    data = out / "world-sae" / "data.jsonl"
    if _stage("world samples for the SAE", data.is_file()):
        export_jsonl(generate("train", cfg.sae_samples, seed=cfg.seed + 100), data.parent)
    cache = out / "cache"
    if _stage("activation cache", (cache / "manifest.json").is_file() and _complete(cache)):
        build_cache(CacheConfig(model="tiny-llava", model_path=policy_dir, data=data,
                                layers=(cfg.sae_layer,), out=cache, batch_size=32))
    sae_dir = out / "sae"
    print("\n== SAE training (resumes / skips by itself)")
    sae_cfg = SAETrainConfig(out=sae_dir, cache=cache, layer=cfg.sae_layer, d_sae=cfg.d_sae,
                             batch_size=2048, training_tokens=cfg.sae_tokens, lr=1e-3, warmup_steps=20,
                             log_every=20, checkpoint_every=100, seed=cfg.seed)
    train_sae(sae_cfg, training_data(sae_cfg))
    return sae_dir


def _complete(cache: Path) -> bool:
    return json.loads((cache / "manifest.json").read_text()).get("complete", False)


def _segcompass(cfg: DemoConfig, out: Path, policy_dir: Path, sae_dir: Path, sam_dir: Path) -> Path:
    from segcompass.training.supervised import TrainConfig, train

    final = out / "final"
    if _stage(f"SegCompass training (mode {cfg.mode})", (final / "segcompass.json").is_file()):
        train(TrainConfig(policy=policy_dir, sae=sae_dir, sam_path=sam_dir, out=out, sae_layer=cfg.sae_layer,
                          mode=cfg.mode, steps=cfg.seg_steps, heatmap_dice_weight=cfg.heatmap_dice_weight,
                          hallucination_share=cfg.hallucination_share if cfg.mode == "seg" else 0.0,
                          head_routing=cfg.head_routing,
                          seed=cfg.seed))
    return final


def _evaluate(cfg: DemoConfig, out: Path, checkpoint: Path) -> dict:
    from segcompass.evaluate import evaluate_to_dir

    if _stage("evaluation (greedy decoding)", (out / "metrics.json").is_file()):
        evaluate_to_dir(checkpoint, EVAL_SPLITS, cfg.eval_samples, out, seed=cfg.seed + 7)
    return json.loads((out / "metrics.json").read_text())


def _analyses(cfg: DemoConfig, out: Path, checkpoint: Path) -> dict:
    from analyses.run_all import SUMMARY_FILE, run_all

    if _stage("analyses: Figures 4, 5, 8, faithfulness, concept naming", (out / SUMMARY_FILE).is_file()):
        run_all(checkpoint, out, split="val", n=16 if cfg.quick else 48, seed=cfg.seed + 7,
                faith_items=8 if cfg.quick else 24, progress=True)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    print("acceptance (issue 6):", json.dumps(summary["acceptance"], indent=1))
    if _stage("does the mask follow the reasoning? (eval predictions judged)", (out / REASONING_JSON).is_file()):
        from analyses.reasoning_to_mask import write_reasoning_report

        write_reasoning_report(out.parent / "eval", out)
    reasoning = json.loads((out / REASONING_JSON).read_text())
    print("mask vs reasoning:", json.dumps(reasoning, indent=1))
    summary["files"]["reasoning_to_mask"] = {"png": REASONING_JSON.replace(".json", ".png")}
    return summary


def _atom_names(analyses: Path) -> dict[int, str]:
    """Concept names of the SAE atoms (`analyses.run_all` writes names.csv) for the reports."""
    from analyses.concept_naming import load_atom_labels

    names = analyses / "names.csv"
    return load_atom_labels(names) if names.is_file() else {}


def _reports(out: Path, checkpoint: Path, atom_names: dict[int, str] | None = None) -> list[Path]:
    from segcompass.world.scenes import generate
    from segcompass.model import load_segcompass
    from segcompass.report import predict_report

    reports, model = [], None
    for sample in generate("val", 3, seed=12345):
        folder = out / sample.sample_id
        if _stage(f"prediction report {sample.sample_id}", (folder / "report.html").is_file()):
            model = model or load_segcompass(checkpoint)
            predict_report(model, sample.image, sample.instruction, folder, multi=sample.multi_prompt,
                           atom_names=atom_names)
        reports.append(folder / "report.html")
    return reports


def _causal(cfg: DemoConfig, out: Path, checkpoint: Path) -> None:
    """The causal suite on testA and multi: do the masks come from the SAE atoms?"""
    from analyses.causal import CAUSAL_DIR, CAUSAL_FILE, run_causal_suite

    if cfg.causal_samples and _stage("causal suite (pathway, conflict, dose-response, concept edits)",
                                     (out / CAUSAL_DIR / CAUSAL_FILE).is_file()):
        run_causal_suite(checkpoint, out / CAUSAL_DIR, splits=("testA", "multi"), n=cfg.causal_samples,
                         seed=cfg.seed + 7, progress=True)


def _index(out: Path, cfg: DemoConfig, reports: list[Path], timings: dict, analyses: dict | None = None) -> Path:
    from segcompass.experiments.index_page import write_index

    return write_index(out, quick=cfg.quick, routing=cfg.head_routing, reports=reports, timings=timings,
                       files=(analyses or {}).get("files", {}), policy_summary=_policy_summary(out))


def _policy_summary(out: Path) -> str:
    """Format-valid and target-correct rates of each warm-start phase, overall and per family."""
    parts = []
    for phase in ("warmstart", "warmstart-absence"):
        path = out / phase / "eval.json"
        if path.is_file():
            groups = json.loads(path.read_text()).get("groups", {})
            parts.append(f"{phase}:\n" + "\n".join(
                f"  {name:<20} n={g['n']:<4} format-valid {100 * g['format_valid']:5.1f}%  "
                f"target-correct {100 * g['target_correct']:5.1f}%" for name, g in groups.items()))
    return "\n".join(parts) or "(no warm-start evaluation)"
