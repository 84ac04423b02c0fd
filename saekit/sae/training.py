"""Train an SAE on a stream of activation batches: AdamW, warm-up + cosine schedule,
gradient clipping, metrics, checkpoints and resume, and the final sae-lens folder.

`train_sae(cfg, data)` is the whole job. A run is a deterministic function of the config
and the data stream (`TrainingData.batches(start_batch)`), so re-running it on the same
`out` folder resumes from the newest checkpoint and ends with the same bytes an
uninterrupted run writes.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor

from saekit.errors import UserError
from saekit.run import MetricsLog, check_resume, config_record
from saekit.sae.checkpoint import (CHECKPOINT_DIR, TrainerState, latest_checkpoint, load_checkpoint,
                                   save_checkpoint)
from saekit.sae.config import TOPK_FAMILY, SAETrainConfig, memory_estimate
from saekit.sae.io import SAEKIT_INFO_FILENAME, read_sae_info, save_sae
from saekit.sae.losses import StepStats
from saekit.sae.model import INFERENCE_ARCHITECTURE, SparseAutoencoder
from saekit.sae.steps import SPARSITY_METRIC, after_optimizer_step, build_step, new_sae

METRICS_FILE = "metrics.jsonl"


class TrainingData(NamedTuple):
    """Where the activations come from, as the trainer needs it."""

    batches: Callable[[int], Iterator[Tensor]]
    """start_batch -> iterator of raw (batch_size, d_in) batches, the same stream for the same start."""
    d_in: int
    """Width of the activations."""
    record: dict[str, Any]
    """What they are: {"model": {...}, "layer": {...layer_metadata}, "token_types": [...],
    "compat": {...} (`saekit.compat`, the SAE's own record), "data": {...}}."""


def lr_at(cfg: SAETrainConfig, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up to lr, then a cosine from lr
    to lr_end_ratio·lr reached at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.total_steps - 1 - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    end = cfg.lr * cfg.lr_end_ratio
    return end + (cfg.lr - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class SAETrainer:
    """One SAE with its optimiser and the per-step machinery (no I/O)."""

    def __init__(self, cfg: SAETrainConfig, d_in: int, device: torch.device):
        self.cfg, self.device = cfg, device
        dtype = getattr(torch, cfg.dtype)
        self.sae = new_sae(cfg, d_in, dtype, device)
        self.optimizer = torch.optim.AdamW(
            [p for p in self.sae.parameters() if p.requires_grad], lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, fused=True)
        self.aux_k = cfg.aux_k or max(d_in // 2, 1)
        self.step_fn = build_step(cfg, self.sae, self.aux_k)
        self.step = 0
        self.tokens = 0
        self.input_scale = 1.0
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.int64, device=device)

    def dead(self) -> Tensor:
        """(d_sae,) bool: latents silent for at least `dead_tokens_window` tokens."""
        return self.since_fired >= self.cfg.dead_tokens_window

    def train_step(self, batch: Tensor, *, want_l0: bool = False) -> StepStats:
        """One optimisation step on a raw (n, d_in) batch."""
        x = batch.to(self.device, self.sae.W_enc.dtype, non_blocking=True)
        if self.input_scale != 1.0:
            x = x * self.input_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, self.step)
        stats = self.step_fn(x, self.dead(), self.step, want_l0)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        after_optimizer_step(self.cfg, self.sae)
        self.since_fired.add_(x.shape[0]).masked_fill_(stats.fired, 0)
        self.step += 1
        self.tokens += x.shape[0]
        return stats

    def metrics(self, stats: StepStats) -> dict[str, Any]:
        """The metrics line of the step just taken."""
        line = {"step": self.step, "tokens": self.tokens, "loss": stats.loss.item(),
                "mse": stats.mse.item(), "fvu": stats.fvu.item(),
                "l0": stats.l0.item() if stats.l0 is not None else None,
                "dead_fraction": self.dead().float().mean().item(),
                "lr": self.optimizer.param_groups[0]["lr"]}
        line[SPARSITY_METRIC.get(self.cfg.architecture, "aux_loss")] = stats.sparsity.item()
        if self.cfg.architecture in ("batchtopk", "matryoshka"):
            line["threshold"] = self.sae.threshold[0].item()
        return line

    def state(self, record: dict[str, Any]) -> TrainerState:
        return TrainerState(self.step, self.tokens, self.input_scale, self.since_fired, record)

    def restore(self, state: TrainerState) -> None:
        self.step, self.tokens, self.input_scale = state.step, state.tokens, state.input_scale
        self.since_fired = state.since_fired


class InputStats(NamedTuple):
    """What the first batches say about the activations."""

    scale: float
    """s with E‖s·x‖ = sqrt(d_in) (expected_average_only_in), or 1.0 (none)."""
    mean: Tensor
    """(d_in,) float64 mean of s·x."""


@torch.no_grad()
def estimate_input_stats(cfg: SAETrainConfig, data: TrainingData) -> InputStats:
    """Normalisation scale and mean from the first `norm_estimate_batches` batches (the
    scale as sae-lens's expected_average_only_in)."""
    norm_sum, row_sum, count = 0.0, torch.zeros(data.d_in, dtype=torch.float64), 0
    for batch in islice(data.batches(0), cfg.norm_estimate_batches):
        batch = batch.double().cpu()
        norm_sum += batch.norm(dim=-1).sum().item()
        row_sum += batch.sum(dim=0)
        count += batch.shape[0]
    if count == 0 or norm_sum == 0:
        raise UserError("no activations to estimate the normalisation from: the data is empty")
    scale = math.sqrt(data.d_in) / (norm_sum / count) if cfg.normalize != "none" else 1.0
    return InputStats(scale, row_sum / count * scale)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _open_run(cfg: SAETrainConfig, data: TrainingData, progress: bool) -> SAETrainer:
    """A trainer at the newest checkpoint in `cfg.out`, or fresh (with its input scale)."""
    from saekit.models import resolve_device

    device = resolve_device(cfg.device)
    if cfg.dtype == "bfloat16" and device.type == "cpu":
        raise UserError("dtype bfloat16 on a CPU: bf16 matmuls are ~300x slower there; use float32")
    trainer = SAETrainer(cfg, data.d_in, device)
    folder = latest_checkpoint(cfg.out)
    if folder is not None:
        state = load_checkpoint(folder, trainer.sae, trainer.optimizer)
        check_resume(state.config, cfg, f"train: {folder}")
        trainer.restore(state)
        _say(progress, f"resuming from {folder} (step {state.step} of {cfg.total_steps})")
    else:  # a fresh run: its first batches fix the input scale and the initial b_dec
        stats = estimate_input_stats(cfg, data)
        trainer.input_scale = stats.scale
        if cfg.init_b_dec == "mean":
            with torch.no_grad():
                trainer.sae.b_dec.copy_(stats.mean)
    return trainer


def train_sae(cfg: SAETrainConfig, data: TrainingData, *, progress: bool = True) -> Path:
    """Train (or resume, or find finished) the SAE of `cfg` on `data`; returns `cfg.out`."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    record = config_record(cfg)
    info = read_sae_info(out)
    if info.get("complete"):
        check_resume(info["training"]["config"], cfg, f"train: {out / SAEKIT_INFO_FILENAME}")
        if not cfg.keep_checkpoints:  # a run killed between the final save and this cleanup
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        _say(progress, f"{out} already holds the finished SAE")
        return out
    trainer = _open_run(cfg, data, progress)
    estimate = memory_estimate(data.d_in, cfg.d_sae, cfg.batch_size, cfg.architecture,
                               torch.finfo(trainer.sae.W_enc.dtype).bits // 8)
    _say(progress, f"SAE {cfg.architecture} d_in {data.d_in} -> d_sae {cfg.d_sae} on "
                   f"{trainer.device}: {estimate.describe()}")
    metrics = MetricsLog(out / METRICS_FILE, trainer.step)
    _loop(cfg, data, trainer, metrics, record, progress)
    _finish(cfg, data, trainer, metrics, record)
    _say(progress, f"SAE saved to {out} ({trainer.step} steps, {trainer.tokens} tokens)")
    return out


def _loop(cfg: SAETrainConfig, data: TrainingData, trainer: SAETrainer, metrics: MetricsLog,
          record: dict[str, Any], progress: bool) -> None:
    from tqdm import tqdm

    total = cfg.total_steps
    bar = tqdm(total=total, initial=trainer.step, unit="step", desc=f"train SAE {cfg.d_sae}",
               disable=not progress, dynamic_ncols=True)
    started, start_tokens = time.perf_counter(), trainer.tokens
    with bar:
        for batch in islice(data.batches(trainer.step), total - trainer.step):
            step = trainer.step + 1
            log_now = step % cfg.log_every == 0 or step == total
            stats = trainer.train_step(batch, want_l0=log_now)
            if log_now:
                line = trainer.metrics(stats)
                metrics.append(line)
                rate = (trainer.tokens - start_tokens) / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{line['loss']:.4g}", l0=f"{line['l0']:.1f}",
                                fvu=f"{line['fvu']:.3f}", tok_s=f"{rate:.0f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                save_checkpoint(cfg.out, trainer.sae, trainer.optimizer, trainer.state(record))
            bar.update(1)
    if trainer.step < total:
        _say(progress, f"warning: the data ran out after {trainer.step} of {total} steps "
                       f"({trainer.tokens} tokens); saving the SAE as trained so far")


def _finish(cfg: SAETrainConfig, data: TrainingData, trainer: SAETrainer, metrics: MetricsLog,
            record: dict[str, Any]) -> None:
    """Fold the input scale into a copy of the weights, write the folder, drop checkpoints."""
    sae = SparseAutoencoder(d_in=data.d_in, d_sae=cfg.d_sae, k=cfg.k, dtype=trainer.sae.W_enc.dtype,
                            architecture=INFERENCE_ARCHITECTURE[cfg.architecture])
    sae.load_state_dict({k: v.detach().cpu() for k, v in trainer.sae.state_dict().items()})
    sae.fold_input_scale_(trainer.input_scale)
    metadata, info = _saved_records(cfg, data, trainer, metrics.last, record)
    save_sae(sae, cfg.out, metadata=metadata, info=info)
    if not cfg.keep_checkpoints:
        shutil.rmtree(Path(cfg.out) / CHECKPOINT_DIR, ignore_errors=True)


def _saved_records(cfg: SAETrainConfig, data: TrainingData, trainer: SAETrainer,
                   last_metrics: dict[str, Any] | None, record: dict[str, Any]
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(cfg.json metadata, saekit.json record) of the finished SAE."""
    import saekit

    model, layer = data.record.get("model", {}), data.record.get("layer", {})
    normalization = {"method": cfg.normalize, "input_scale": trainer.input_scale,
                     "folded_into_weights": True}
    metadata = {
        "model_name": model.get("hub_id") or model.get("name"),
        "hook_name": layer.get("transformer_lens_hook"), "hook_head_index": None,
        "saekit_model_preset": model.get("name"), "saekit_layer": layer.get("layer"),
        "hf_hidden_states_index": layer.get("hf_hidden_states_index"),
        "saekit_module_path": layer.get("module_path"),
        "saekit_token_types": list(cfg.token_types), "saekit_normalization": normalization,
        "saekit_training_tokens": trainer.tokens, "training_architecture": cfg.architecture,
    }
    info = {
        "saekit_version": saekit.__version__, "architecture": cfg.architecture,
        "d_in": data.d_in, "d_sae": cfg.d_sae, "k": cfg.k if cfg.architecture in TOPK_FAMILY else None,
        "model": model, "layer": layer, "token_types": list(cfg.token_types),
        "compat": data.record.get("compat"),
        "data": data.record.get("data", {}), "normalization": normalization,
        "training": {"steps": trainer.step, "tokens": trainer.tokens,
                     "final_metrics": last_metrics, "config": record},
        "complete": True,
    }
    return metadata, info
