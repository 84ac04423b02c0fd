"""Resumable training checkpoints: one folder per checkpoint, safetensors + JSON, no pickles.

    out/checkpoints/step_00001000/
        sae_weights.safetensors     training weights (input scale not folded in)
        optimizer.safetensors       AdamW state: "<param>.exp_avg", "<param>.exp_avg_sq", "<param>.step"
        trainer_state.safetensors   "since_fired" (d_sae,) int64, "torch_rng_state" (+ "cuda_rng_state")
        trainer_state.json          step, tokens, input scale, data position, config record

A checkpoint is written into `step_XXXXXXXX.tmp/` and renamed into place, so a folder
without the suffix is always complete; older checkpoints are removed after the rename.
The data position is the number of batches consumed: the data stream is a
deterministic function of (seed, start batch), so a resumed run sees the batches an
uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import save_file

from saekit.atomic import atomic_directory
from saekit.errors import UserError
from saekit.integrity import load_safetensors, read_json_object
from saekit.sae.model import SparseAutoencoder

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_NAME = "step_{:08d}"
WEIGHTS_FILE = "sae_weights.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_TENSORS_FILE = "trainer_state.safetensors"
STATE_JSON_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = "saekit-sae-checkpoint"


class TrainerState(NamedTuple):
    """Everything besides weights and optimiser needed to continue a run."""

    step: int
    """Optimisation steps done (= batches consumed)."""
    tokens: int
    """Training tokens seen."""
    input_scale: float
    """Normalisation factor applied to every batch (1.0 for normalize=none)."""
    since_fired: torch.Tensor
    """(d_sae,) int64 tokens since each latent last fired."""
    config: dict[str, Any]
    """The run's config record (checked on resume)."""


def _named_params(sae: SparseAutoencoder) -> dict[str, torch.nn.Parameter]:
    return dict(sae.named_parameters())


def optimizer_tensors(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat `<param>.<key>` tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, param in _named_params(sae).items():
        for key, value in optimizer.state.get(param, {}).items():
            out[f"{name}.{key}"] = value.detach().reshape(value.shape).contiguous().cpu()
    return out


def load_optimizer_tensors(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors` (keeps the optimiser's param groups / hyper-parameters)."""
    # AdamW keeps `step` on the parameter's device for its fused kernel, else on the CPU
    step_on_device = bool(optimizer.defaults.get("fused") or optimizer.defaults.get("capturable"))
    for name, param in _named_params(sae).items():
        state = {key.split(".", 1)[1]: value for key, value in tensors.items()
                 if key.split(".", 1)[0] == name}
        optimizer.state[param] = {
            key: value.to(param.device) if key != "step" or step_on_device else value
            for key, value in state.items()}


def save_checkpoint(out: Path, sae: SparseAutoencoder, optimizer: torch.optim.Optimizer,
                    state: TrainerState) -> Path:
    """Write a checkpoint folder atomically and remove the older ones; returns its path."""
    root = Path(out) / CHECKPOINT_DIR
    final = root / CHECKPOINT_NAME.format(state.step)
    with atomic_directory(final) as tmp:
        weights = {name: p.detach().contiguous().cpu() for name, p in _named_params(sae).items()}
        save_file(weights, str(tmp / WEIGHTS_FILE))
        save_file(optimizer_tensors(sae, optimizer), str(tmp / OPTIMIZER_FILE))
        rng = {"since_fired": state.since_fired.cpu().contiguous(), "torch_rng_state": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda_rng_state"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / STATE_TENSORS_FILE))
        record = {"format": CHECKPOINT_FORMAT, "step": state.step, "tokens": state.tokens,
                  "input_scale": state.input_scale, "data_position": {"start_batch": state.step},
                  "scheduler": {"step": state.step}, "config": state.config}
        (tmp / STATE_JSON_FILE).write_text(json.dumps(record, indent=2) + "\n")
    for old in root.iterdir():
        if old != final and old.name.startswith("step_"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder in `out`, or None."""
    root = Path(out) / CHECKPOINT_DIR
    if not root.is_dir():
        return None
    done = sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith("step_") and not p.name.endswith((".tmp", ".old")))
    return done[-1] if done else None


def load_checkpoint(folder: Path, sae: SparseAutoencoder,
                    optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore weights, optimiser and RNG from `folder`; returns the trainer state."""
    fix = f"delete {folder} to start from the one before it (or from scratch)"
    record = read_json_object(folder / STATE_JSON_FILE, fields={
        "step": int, "tokens": int, "input_scale": (int, float), "config": dict}, fix=fix)
    if record.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{folder / STATE_JSON_FILE}: not a saekit training checkpoint")
    weights = load_safetensors(folder / WEIGHTS_FILE, fix=fix)
    params = _named_params(sae)
    if set(weights) != set(params) or any(weights[k].shape != params[k].shape for k in params):
        raise UserError(f"{folder}: weights do not match the configured SAE "
                        f"(d_sae/d_in changed?); resume with the same settings or choose a new --out")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    load_optimizer_tensors(sae, optimizer, load_safetensors(folder / OPTIMIZER_FILE, fix=fix))
    tensors = load_safetensors(folder / STATE_TENSORS_FILE, fix=fix)
    torch.set_rng_state(tensors["torch_rng_state"])
    if "cuda_rng_state" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda_rng_state"])
    return TrainerState(step=int(record["step"]), tokens=int(record["tokens"]),
                        input_scale=float(record["input_scale"]),
                        since_fired=tensors["since_fired"].to(params["W_enc"].device),
                        config=record["config"])
