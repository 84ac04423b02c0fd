"""Warm start of the tiny policy: `tiny-llava` trained from scratch on the world's `train`
split by teacher forcing on '<think> {ground-truth CoT} </think> <REF_POS>×K'.

The loss covers the response tokens and the end-of-turn token after them (so the policy
learns to stop), never the image or prompt. Training data is a pure function of
(seed, step): sample i of step s is world sample `(s * batch + i) % n_train`, so a
resumed run sees exactly the batches an uninterrupted one would.

Output folder:
    cfg.json              the effective config (after --quick)
    checkpoint/           model.safetensors, optimizer.safetensors, state.json (atomic swap)
    model/                HF folder: `load_model("tiny-llava", model_path=...)` / from_pretrained
    eval.json             greedy decoding on `val` and its teacher-forced first errors per family
                          (see `segcompass.world.policy_eval`)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from saekit.atomic import (atomic_directory, atomic_write_json, load_optimizer_state, optimizer_state_tensors,
                           resolve_directory)
from saekit.errors import UserError
from saekit.run import RunConfig, apply_threads, check_resume, config_record, free_on_resume
from segcompass.world.prefetch import resolve_workers, step_batches
from segcompass.world.teacher import (CAPTION_PROMPT, Example, TeacherBatch, caption_example,  # noqa: F401
                                       reference_example, teacher_batch)
from segcompass.world.probes import (build_slot_probe, build_word_probe, separation_word_ids,
                                   word_separation_loss)

CHAT_WORDS: tuple[str, ...] = ("user", "assistant")
"""Words of LLaVA's chat template ('USER: <image>\\n… ASSISTANT:') the tokenizer must know."""
CHECKPOINT_DIR, MODEL_DIR, EVAL_FILE, CONFIG_FILE = "checkpoint", "model", "eval.json", "cfg.json"
WEIGHTS_FILE, OPTIMIZER_FILE, STATE_FILE = "model.safetensors", "optimizer.safetensors", "state.json"


@dataclass(frozen=True, kw_only=True)
class WarmstartConfig(RunConfig):
    """Teacher-forced warm start of the tiny policy on the embedded world."""

    out: Path = free_on_resume(Path("runs/warmstart"))
    """Output folder (checkpoint/, model/, eval.json)."""
    n_train: int = 0
    """Distinct `train` samples, cycled; 0 = steps × batch_size (all new)."""
    steps: int = 4000
    """Optimizer steps of the LLM stage."""
    batch_size: int = 32
    """Samples per step."""
    caption_fraction: float = 0.25
    """Batch share of the caption task (name every object)."""
    patch_loss_weight: float = 1.0
    """Weight of the image tokens' word probe (training only); 0 = off."""
    slot_loss_weight: float = 1.0
    """Weight of the <REF_POS> states' target probe (training only); 0 = off."""
    word_separation_weight: float = 1.0
    """Weight of the term keeping world words' tied embeddings apart; 0 = off."""
    word_separation_margin: float = 0.3
    """Cosine similarity above which word embeddings are pushed apart."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, cosine decay to 10%)."""
    warmup_steps: int = 60
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    image_size: int = 64
    """Image side the vision tower sees."""
    patch_size: int = 8
    """Vision patch side."""
    hidden_size: int = 128
    """Language model width."""
    n_layers: int = 4
    """Language model decoder blocks."""
    n_heads: int = 4
    """Language model attention heads."""
    intermediate_size: int = 0
    """Language model MLP width; 0 = 2 × hidden_size (faster than 4×)."""
    rope_theta: float = 1e6
    """Rotary base; large, so words match image tokens far back by content."""
    vision_hidden_size: int = 128
    """Vision tower width (narrower reads shape worse)."""
    vision_layers: int = 3
    """Vision tower blocks; LLaVA reads the second-to-last, so 3 gives 2 effective."""
    vision_steps: int = 1500
    """Stage 0: steps training the vision tower alone on what each patch shows; 0 = skip."""
    vision_lr: float = 2e-3
    """Peak learning rate of stage 0."""
    vision_position_weight: float = 1.0
    """Weight of stage 0's patch-position loss (spatial words); 0 = off."""
    vision_centre_weight: float = 0.25
    """Weight of stage 0's loss on each patch's object centre; 0 = off."""
    probe_object_position: bool = True
    """Probe object patches with their object's position words."""
    freeze_vision: bool = True
    """Freeze the vision tower after stage 0 (then only projector and LLM train)."""
    tie_embeddings: bool = True
    """Tie input embeddings and output head (read words = written words)."""
    split: str = "train"
    """World split of the LLM stage (`train_absence`: a last phase from `init_from`)."""
    init_from: Path | None = None
    """A finished warm start's folder to continue from (fresh optimizer, no stage 0)."""
    quick: bool = free_on_resume(False)
    """Short run for CI and demos."""
    eval_samples: int = free_on_resume(1000)
    """`val` samples decoded at the end."""
    checkpoint_every: int = free_on_resume(200)
    """Save a resumable checkpoint every this many steps (and at the end)."""
    data_workers: int = free_on_resume(-1)
    """Processes building the next batches (same result); -1 = auto (4 on CUDA, else 0)."""

    def __post_init__(self) -> None:
        if min(self.vision_steps, self.vision_position_weight, self.vision_centre_weight) < 0 or self.vision_lr <= 0:
            raise UserError("warmstart: --vision-steps, --vision-position-weight and --vision-centre-weight must be "
                            ">= 0 and --vision-lr > 0")
        for name in ("steps", "batch_size", "hidden_size", "n_layers", "n_heads", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"warmstart: --{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.data_workers < -1:
            raise UserError(f"warmstart: --data-workers must be >= -1 (-1 = auto), got {self.data_workers}")
        if self.n_train < 0 or self.eval_samples < 0 or self.warmup_steps < 0:
            raise UserError("warmstart: --n-train, --eval-samples and --warmup-steps must be >= 0")
        if self.image_size % self.patch_size:
            raise UserError(f"warmstart: --image-size {self.image_size} is not a multiple of "
                            f"--patch-size {self.patch_size}")
        if self.intermediate_size < 0:
            raise UserError(f"warmstart: --intermediate-size must be >= 0, got {self.intermediate_size}")
        if self.patch_loss_weight < 0 or self.slot_loss_weight < 0:
            raise UserError(f"warmstart: --patch-loss-weight and --slot-loss-weight must be >= 0, got "
                            f"{self.patch_loss_weight}, {self.slot_loss_weight}")
        if not 0 <= self.caption_fraction < 1:
            raise UserError(f"warmstart: --caption-fraction must lie in [0, 1), got {self.caption_fraction}")
        if self.lr <= 0:
            raise UserError(f"warmstart: --lr must be > 0, got {self.lr}")
        from segcompass.world.scenes import SPLITS

        if self.split not in SPLITS:
            raise UserError(f"warmstart: unknown --split {self.split!r}; choose one of {', '.join(SPLITS)}")
        if self.init_from is not None and not checkpoint_exists(Path(self.init_from) / CHECKPOINT_DIR):
            raise UserError(f"warmstart: --init-from {self.init_from} holds no warm-start checkpoint "
                            f"({CHECKPOINT_DIR}/{STATE_FILE})")
        if self.word_separation_weight < 0 or not 0 <= self.word_separation_margin < 1:
            raise UserError(f"warmstart: need --word-separation-weight >= 0 and 0 <= --word-separation-margin < 1, "
                            f"got {self.word_separation_weight}, {self.word_separation_margin}")

    def effective(self) -> "WarmstartConfig":
        """The config that actually runs: QUICK_OVERRIDES applied when `quick`."""
        return dataclasses.replace(self, **QUICK_OVERRIDES) if self.quick else self

    @property
    def train_pool(self) -> int:
        return self.n_train or self.steps * self.batch_size


QUICK_OVERRIDES: dict = {"steps": 70, "vision_steps": 150, "eval_samples": 100, "checkpoint_every": 35}
"""What --quick changes (everything else as given)."""


def policy_vocabulary() -> list[str]:
    """Words of world instructions and CoTs, the prompt template and the chat template."""
    from segcompass.world.scenes import world_vocabulary
    from segcompass.template import prompt_vocabulary

    return sorted({*world_vocabulary(), *prompt_vocabulary(), *CHAT_WORDS, *CAPTION_PROMPT.split()})


def build_policy(cfg: WarmstartConfig):
    """A fresh, seeded tiny-llava policy with the world vocabulary and the template's special tokens."""
    from saekit.tiny import build_tiny_llava
    from segcompass.template import SPECIAL_TOKENS

    loaded = build_tiny_llava(
        policy_vocabulary(), extra_special_tokens=SPECIAL_TOKENS, image_size=cfg.image_size,
        patch_size=cfg.patch_size, hidden_size=cfg.hidden_size, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
        intermediate_size=cfg.intermediate_size or 2 * cfg.hidden_size, rope_theta=cfg.rope_theta,
        vision_hidden_size=cfg.vision_hidden_size, vision_layers=cfg.vision_layers, seed=cfg.seed)
    if cfg.tie_embeddings:
        model = loaded.model
        model.config.tie_word_embeddings = model.config.text_config.tie_word_embeddings = True
        model.lm_head.weight = model.get_input_embeddings().weight
    return loaded


class Losses(NamedTuple):
    """The warm start's objective and its parts."""

    total: torch.Tensor
    """response + patch_loss_weight × patch (scalar, differentiable)."""
    response: torch.Tensor
    """Mean next-token cross-entropy over the supervised response positions."""
    patch: torch.Tensor
    """Mean cross-entropy of the word probe over image tokens and fields (`segcompass.world.probes`)."""
    slot: torch.Tensor
    """Mean cross-entropy of the concentration-token probe over <REF_POS> tokens and fields."""
    separation: torch.Tensor
    """Word-separation penalty on the embeddings (`word_probe.word_separation_loss`)."""


def teacher_losses(model: torch.nn.Module, probes: torch.nn.ModuleDict, batch: TeacherBatch,
                   patch_weight: float, slot_weight: float, separation_weight: float = 0.0,
                   separation_margin: float = 0.3, separation_ids: torch.Tensor | None = None) -> Losses:
    """One forward pass: response cross-entropy; the word probe's loss on the image tokens'
    input embeddings (hidden_states[0], what the LLM receives from the vision tower); the
    slot probe's loss on the <REF_POS> tokens' last-layer states (what the head reads)."""
    out = model(**batch.model_inputs, output_hidden_states=patch_weight > 0 or slot_weight > 0)
    # position t-1 predicts token t: (B, T-1, V) against (B, T-1)
    response = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1),
                                                 batch.labels[:, 1:].flatten(), ignore_index=-100)
    words = model.get_input_embeddings().weight
    patch = slot = torch.zeros((), device=response.device)
    if patch_weight > 0:
        is_image = batch.model_inputs["input_ids"] == model.config.image_token_id  # (B, T)
        n_batch, n_patches = batch.patch_targets.shape[0], batch.patch_targets.shape[2]
        image_states = out.hidden_states[0][is_image].view(n_batch, n_patches, -1)  # (B*G², D) -> (B, G², D)
        patch = probes["patch"].loss(image_states, words, batch.patch_targets)
    if slot_weight > 0 and len(batch.slot_rows):
        states = out.hidden_states[-1][batch.slot_rows, batch.slot_positions]  # (N, D)
        slot = probes["slot"].loss(states[None], words, batch.slot_labels.T[None])  # (1, N, D) vs (1, 2, N)
    separation = torch.zeros((), device=response.device)
    if separation_weight > 0:
        if separation_ids is None:
            raise ValueError("teacher_losses: separation_weight > 0 needs separation_ids (word_probe.separation_word_ids)")
        separation = word_separation_loss(words, separation_ids, separation_margin)
    return Losses(response + patch_weight * patch + slot_weight * slot + separation_weight * separation,
                  response, patch, slot, separation)


def lr_factor(step: int, cfg: WarmstartConfig) -> float:
    """Linear warm-up to 1, then cosine down to 0.1 at the last step."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def step_examples(cfg: WarmstartConfig, step: int) -> list[Example]:
    """The examples of optimizer step `step` (a pure function of cfg and step): world `train`
    samples `step * batch + i`; the first `round(caption_fraction * batch)` become captions."""
    from segcompass.world.scenes import make_sample

    start = step * cfg.batch_size
    n_caption = round(cfg.caption_fraction * cfg.batch_size)
    samples = [make_sample(cfg.split, (start + i) % cfg.train_pool, cfg.seed) for i in range(cfg.batch_size)]
    grid = cfg.image_size // cfg.patch_size
    return [caption_example(s, grid, cfg.probe_object_position) if i < n_caption
            else reference_example(s, grid, cfg.probe_object_position) for i, s in enumerate(samples)]


class WarmstartResult(NamedTuple):
    """Where a warm start left its outputs."""

    model_dir: Path
    """HF folder of the trained policy."""
    eval: dict
    """Contents of eval.json (empty when eval_samples is 0)."""
    wall_s: float
    """Seconds spent in this call (training + evaluation)."""


def train(cfg: WarmstartConfig, *, progress: bool = True, stop_after: int | None = None) -> WarmstartResult:
    """Run (or resume) a warm start; `stop_after` ends early after that many total steps
    with a checkpoint and no final model (for testing resume)."""
    from tqdm.auto import tqdm

    from saekit.models import resolve_device

    start_time = time.perf_counter()
    cfg = cfg.effective()
    apply_threads(cfg.threads)
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / CONFIG_FILE, config_record(cfg, free=True))
    torch.manual_seed(cfg.seed)
    loaded = build_policy(cfg)
    model = loaded.model.to(device).train()
    probes = torch.nn.ModuleDict({"patch": build_word_probe(loaded.tokenizer, cfg.hidden_size, cfg.seed + 1),
                                  "slot": build_slot_probe(loaded.tokenizer, cfg.hidden_size, cfg.seed + 2)})
    # The probes train with the policy; they are checkpointed (for exact resume) but never exported.
    modules = torch.nn.ModuleDict({"policy": model, "probe": probes.to(device)})
    resuming = cfg.resume and checkpoint_exists(out / CHECKPOINT_DIR)
    if cfg.init_from is not None and not resuming:
        vision = load_initial_weights(Path(cfg.init_from), cfg, modules)
    else:
        vision = {} if resuming else _vision_stage(cfg, loaded, device, progress)
    if cfg.freeze_vision and (cfg.vision_steps or cfg.init_from is not None):
        model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in modules.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    if resuming:
        step, vision = load_checkpoint(out / CHECKPOINT_DIR, cfg, modules, optimizer, scheduler)
    else:  # stage 0 is not repeated after an interruption
        step = 0
        save_checkpoint(out / CHECKPOINT_DIR, cfg, modules, optimizer, scheduler, 0, vision)
    separation_ids = torch.tensor(separation_word_ids(loaded.tokenizer), device=device)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = tqdm(range(step, end), initial=step, total=cfg.steps, desc="warmstart", disable=not progress)
    batches = step_batches(functools.partial(_step_batch, cfg, loaded), step, end,
                           resolve_workers(cfg.data_workers, device))
    for step, batch in zip(bar, batches):
        losses = teacher_losses(model, probes, batch.to(device),
                                cfg.patch_loss_weight, cfg.slot_loss_weight, cfg.word_separation_weight,
                                cfg.word_separation_margin, separation_ids)
        optimizer.zero_grad(set_to_none=True)
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{losses.response.item():.3f}", patch=f"{losses.patch.item():.3f}",
                        slot=f"{losses.slot.item():.3f}", sep=f"{losses.separation.item():.3f}",
                        lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
            save_checkpoint(out / CHECKPOINT_DIR, cfg, modules, optimizer, scheduler, step + 1, vision)
    bar.close()
    model.eval()
    if end < cfg.steps:
        return WarmstartResult(out / MODEL_DIR, {}, time.perf_counter() - start_time)
    return _finish(cfg, loaded, out, start_time, progress, vision)


ARCHITECTURE_FIELDS: tuple[str, ...] = ("image_size", "patch_size", "hidden_size", "n_layers", "n_heads",
                                        "intermediate_size", "rope_theta", "vision_hidden_size", "vision_layers",
                                        "tie_embeddings")
"""WarmstartConfig fields that shape the weights: `init_from` needs them equal."""


def load_initial_weights(source: Path, cfg: WarmstartConfig, modules: torch.nn.ModuleDict) -> dict:
    """Load a finished warm start's policy and probes (`source/checkpoint`) into `modules`;
    returns its stage-0 record, tagged with where it came from."""
    from safetensors.torch import load_file

    directory = resolve_directory(source / CHECKPOINT_DIR, STATE_FILE)
    state = json.loads((directory / STATE_FILE).read_text())
    theirs, mine = state["config"], config_record(cfg)
    if changed := [k for k in ARCHITECTURE_FIELDS if theirs.get(k, "<absent>") != mine[k]]:
        raise UserError(f"warmstart: --init-from {source} has another architecture "
                        f"({', '.join(f'{k}: {theirs.get(k)} vs {mine[k]}' for k in changed)})")
    if state["step"] < theirs["steps"]:
        raise UserError(f"warmstart: --init-from {source} is unfinished (step {state['step']} of {theirs['steps']})")
    device = next(modules.parameters()).device
    modules.load_state_dict({k: v.to(device) for k, v in load_file(directory / WEIGHTS_FILE).items()})
    return {**state.get("vision_pretraining", {}), "init_from": str(source), "init_from_steps": state["step"]}


def _step_batch(cfg: WarmstartConfig, loaded, step: int) -> TeacherBatch:
    return teacher_batch(loaded, step_examples(cfg, step))


def _vision_stage(cfg: WarmstartConfig, loaded, device, progress: bool) -> dict:
    """Stage 0 (see `segcompass.world.vision_pretrain`); returns its held-out patch accuracy."""
    if not cfg.vision_steps:
        return {}
    from segcompass.world.vision_pretrain import pretrain_vision_tower

    result = pretrain_vision_tower(loaded, steps=cfg.vision_steps, batch_size=cfg.batch_size, lr=cfg.vision_lr,
                                   grid=cfg.image_size // cfg.patch_size, seed=cfg.seed, device=device,
                                   progress=progress, position_weight=cfg.vision_position_weight,
                                   centre_weight=cfg.vision_centre_weight,
                                   data_workers=resolve_workers(cfg.data_workers, device))
    loaded.model.train()
    return {"steps": result.steps, "patch_accuracy": result.accuracy}


def _finish(cfg: WarmstartConfig, loaded, out: Path, start_time: float, progress: bool,
            vision: dict) -> WarmstartResult:
    """Save the HF folder, decode `val` greedily, write eval.json."""
    from saekit.models import save_pretrained

    model_dir = save_pretrained(loaded, out / MODEL_DIR)
    train_s = time.perf_counter() - start_time
    report: dict = {}
    if cfg.eval_samples:
        from segcompass.world.policy_eval import evaluate_policy

        report = evaluate_policy(loaded, "val", cfg.eval_samples, seed=cfg.seed + 1, progress=progress,
                                 grid=cfg.image_size // cfg.patch_size)
    report |= {"vision_pretraining": vision, "train_wall_s": round(train_s, 1), "total_wall_s": round(time.perf_counter() - start_time, 1),
               "load_average_1min": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads()}
    atomic_write_json(out / EVAL_FILE, report)
    return WarmstartResult(model_dir, report, time.perf_counter() - start_time)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: Path, cfg: WarmstartConfig, model, optimizer, scheduler, step: int,
                    vision: dict) -> None:
    """Write weights, optimizer state, RNG and step to a temporary folder, then swap it in.

    A crash at any moment leaves either the previous checkpoint (possibly as
    `checkpoint.old`) or the new one, never a half-written folder under the final name.
    """
    from safetensors.torch import save_file

    with atomic_directory(directory) as tmp:
        # clone: tied weights share storage, which safetensors refuses to write twice
        save_file({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, tmp / WEIGHTS_FILE)
        tensors, groups = optimizer_state_tensors(optimizer)
        save_file(tensors, tmp / OPTIMIZER_FILE)
        save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
        state = {"step": step, "param_groups": groups, "scheduler": scheduler.state_dict(),
                 "config": config_record(cfg), "vision_pretraining": vision}
        atomic_write_json(tmp / STATE_FILE, state)


def checkpoint_exists(directory: Path) -> bool:
    """A complete checkpoint is at `directory` (or at its `.old` twin after an interrupted swap)."""
    return resolve_directory(directory, STATE_FILE) is not None


def load_checkpoint(directory: Path, cfg: WarmstartConfig, model, optimizer, scheduler) -> tuple[int, dict]:
    """Restore a checkpoint into model/optimizer/scheduler/RNG; returns its step and stage-0 record."""
    from saekit.integrity import load_safetensors, read_json_object

    directory = resolve_directory(directory, STATE_FILE)
    fix = f"delete {directory} to start again, or use --no-resume"
    state = read_json_object(directory / STATE_FILE, fields={
        "step": int, "config": dict, "param_groups": list, "scheduler": dict}, fix=fix)
    check_resume(state["config"], cfg, f"warmstart: {directory}")
    device = next(model.parameters()).device
    weights = load_safetensors(directory / WEIGHTS_FILE, fix=fix)
    model.load_state_dict({k: v.to(device) for k, v in weights.items()})
    load_optimizer_state(optimizer, load_safetensors(directory / OPTIMIZER_FILE, fix=fix),
                         state["param_groups"], device)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(load_safetensors(directory / "rng.safetensors", fix=fix)["torch_rng"])
    return int(state["step"]), state.get("vision_pretraining", {})
