"""SAE training configuration: the SAE-V recipe by default, every choice a documented field.

Defaults follow the recipe the paper uses (SAE-V style, see shared notes): a ReLU SAE with
d_sae = 65536, loss = Σ_d (x̂ − x)² + α·Σ_i f_i·‖W_dec,i‖₂ with α = 5, AdamW at lr 5e-5,
linear warm-up then cosine decay to 0.1×lr, gradient-norm clip 1.0.

Memory at d_sae = 65536 (fp32): parameters 2·d_in·d_sae·4 B (2 GiB at d_in 4096), their
gradients as much again, AdamW's two moments twice that (6 GiB for parameters + Adam at
d_in 4096, 8 GiB with gradients), plus two (batch_size × d_sae) activation buffers
(2 GiB at batch 4096). `memory_estimate` prints this before training starts.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, NamedTuple

from saekit.inputs import token_type_codes
from saekit.errors import UserError
from saekit.run import free_on_resume

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu", "matryoshka"]
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
"""Architectures trained by the sparse TopK fast path (`saekit.sae.sparse_step`), with AuxK."""
Normalization = Literal["none", "expected_average_only_in"]
GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class SAETrainConfig:
    """What to train on, the SAE's shape, and the optimisation recipe."""

    out: Path = free_on_resume()
    """Output folder (sae-lens files, saekit.json, metrics.jsonl); re-running resumes."""
    cache: Path | None = None
    """Activation cache to train from (default: capture from --model and --data)."""
    model: str | None = None
    """Model preset to capture from (e.g. llava-1.5-7b)."""
    model_path: Path | None = None
    """Model weights folder (default: the HF cache)."""
    data: Path | None = None
    """Image-text data to capture: .jsonl (plain or OBELICS) or a saved dataset."""
    layer: int | None = None
    """Layer L = HF hidden_states[L] (default: the cache's or the preset's)."""
    token_types: tuple[str, ...] = ("image", "prompt", "response")
    """Token types to train on, of image, prompt, response, special (BOS is an outlier)."""
    architecture: Architecture = "standard"
    """standard: ReLU+L1 (paper); topk/batchtopk/matryoshka: +AuxK; jumprelu: +L0"""
    d_sae: int = 65536
    """Number of SAE latents (the memory it needs is printed before training)."""
    k: int = 64
    """TopK family: latents per token."""
    matryoshka_widths: tuple[int, ...] | None = None
    """matryoshka: nested widths (d_sae/16, /4, /1)."""
    topk_threshold_lr: float = 0.01
    """batchtopk: threshold EMA rate."""
    l0_coefficient: float = 1.0
    """jumprelu: weight of the L0 penalty."""
    l0_warmup_steps: int = 0
    """jumprelu: L0 weight warm-up steps."""
    bandwidth: float = 0.05
    """jumprelu: STE bandwidth ε."""
    threshold_init: float = 0.01
    """jumprelu: initial threshold θ."""
    l1_coefficient: float = 5.0
    """standard: α of the sparsity term α·Σ_i f_i·‖W_dec,i‖₂."""
    lr: float = 5e-5
    """Peak AdamW learning rate."""
    warmup_steps: int = 500
    """Linear warm-up steps."""
    lr_end_ratio: float = 0.1
    """Cosine decay ends at lr_end_ratio·lr."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    adam_beta1: float = 0.9
    """AdamW β1."""
    adam_beta2: float = 0.999
    """AdamW β2."""
    weight_decay: float = 0.0
    """AdamW weight decay (the sparsity term already penalises decoder norms)."""
    batch_size: int = 4096
    """Tokens per step."""
    training_tokens: int = 100_000_000
    """Tokens to train on; a cache is cycled, a capture stops if the data ends."""
    normalize: Normalization = "expected_average_only_in"
    """Scale inputs so E‖x‖ = sqrt(d_in) (as sae-lens); none: raw."""
    norm_estimate_batches: int = 16
    """Batches estimating scale and mean."""
    init_b_dec: Literal["mean", "zeros"] = "mean"
    """Initial decoder bias (mean: FVU starts at 1)."""
    aux_k: int | None = None
    """topk: dead latents in AuxK (default: d_in // 2)."""
    aux_coefficient: float = 1 / 32
    """topk: AuxK loss weight."""
    dead_tokens_window: int = 10_000_000
    """Tokens without firing = dead."""
    log_every: int = free_on_resume(100)
    """Steps between metrics lines."""
    checkpoint_every: int = free_on_resume(1000)
    """Steps between resumable checkpoints; 0 = only the final files."""
    keep_checkpoints: bool = free_on_resume(False)
    """Keep checkpoints/ at the end (they hold optimiser state)."""
    seed: int = 0
    """Seed of the weight initialisation and the data shuffling."""
    device: str = free_on_resume("auto")
    """auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """bfloat16 halves memory on a GPU (on a CPU it is slow)."""
    samples_per_forward: int = 8
    """Capture: samples per forward pass."""
    strict: bool = False
    """Capture: stop at a missing or unreadable image instead of skipping it."""

    def __post_init__(self) -> None:
        _check_positive(self, ("d_sae", "k", "batch_size", "training_tokens", "log_every",
                               "norm_estimate_batches", "dead_tokens_window", "samples_per_forward"))
        _check_non_negative(self, ("l1_coefficient", "warmup_steps", "grad_clip", "weight_decay",
                                   "aux_coefficient", "checkpoint_every", "l0_coefficient",
                                   "l0_warmup_steps", "threshold_init"))
        if not 0 < self.topk_threshold_lr <= 1:
            raise UserError(f"topk_threshold_lr must be in (0, 1], got {self.topk_threshold_lr}")
        if not self.bandwidth > 0:
            raise UserError(f"bandwidth must be > 0, got {self.bandwidth}")
        if self.matryoshka_widths is not None:
            widths = list(self.matryoshka_widths)
            if (not widths or widths[0] < 1 or widths[-1] > self.d_sae
                    or any(a >= b for a, b in zip(widths, widths[1:]))):
                raise UserError(f"matryoshka_widths must increase strictly within 1..d_sae "
                                f"({self.d_sae}), got {widths}")
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.lr_end_ratio <= 1:
            raise UserError(f"lr_end_ratio must be in [0, 1], got {self.lr_end_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.architecture in TOPK_FAMILY and self.k > self.d_sae:
            raise UserError(f"k ({self.k}) must not exceed d_sae ({self.d_sae})")
        if self.aux_k is not None and self.aux_k < 1:
            raise UserError(f"aux_k must be >= 1, got {self.aux_k}")
        if self.total_steps < 1:
            raise UserError(f"training_tokens ({self.training_tokens}) must be at least one "
                            f"batch ({self.batch_size} tokens)")
        if self.warmup_steps >= self.total_steps:
            raise UserError(f"warmup_steps ({self.warmup_steps}) must be smaller than the number "
                            f"of steps ({self.total_steps} = training_tokens // batch_size); "
                            "lower --warmup-steps or raise --training-tokens")
        if self.cache is None and (self.model is None or self.data is None):
            raise UserError("give --cache DIR, or --model NAME and --data DATA to capture on the fly")
        if self.cache is not None and (self.data is not None or self.model_path is not None):
            raise UserError("--cache already fixes model and data: drop --data / --model-path")
        token_type_codes(self.token_types)  # validates the names
        if self.layer is not None and self.layer < 1:
            raise UserError(f"layer must be >= 1 (HF hidden_states index), got {self.layer}")

    @property
    def levels(self) -> tuple[int, ...]:
        """Matryoshka level widths ending at d_sae (the outer level is the whole SAE)."""
        if self.architecture != "matryoshka":
            return (self.d_sae,)
        widths = self.matryoshka_widths or (self.d_sae // 16, self.d_sae // 4)
        return tuple(w for w in dict.fromkeys(widths) if 0 < w < self.d_sae) + (self.d_sae,)

    @property
    def total_steps(self) -> int:
        """Optimisation steps of the full run."""
        return self.training_tokens // self.batch_size


def _check_positive(cfg: SAETrainConfig, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise UserError(f"{name} must be >= 1, got {getattr(cfg, name)}")


def _check_non_negative(cfg: SAETrainConfig, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(cfg, name) < 0:
            raise UserError(f"{name} must be >= 0, got {getattr(cfg, name)}")


class MemoryEstimate(NamedTuple):
    """Bytes the training run holds on its device (excluding the data reader and model)."""

    parameters: int
    """W_enc, b_enc, W_dec, b_dec."""
    gradients: int
    """One gradient per parameter."""
    adam: int
    """AdamW's first and second moments."""
    activations: int
    """Per-batch buffers: (batch, d_sae) pre-activations and their gradient, (batch, d_in) rows."""

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.adam + self.activations

    def describe(self) -> str:
        gib = lambda n: f"{n / GIB:.3g} GiB"  # noqa: E731
        return (f"memory estimate: {gib(self.total)} = parameters {gib(self.parameters)} + "
                f"gradients {gib(self.gradients)} + Adam state {gib(self.adam)} + "
                f"batch activations {gib(self.activations)}")


def memory_estimate(d_in: int, d_sae: int, batch_size: int, architecture: Architecture = "standard",
                    bytes_per_value: int = 4) -> MemoryEstimate:
    """Device memory of training an SAE of this shape (weights, gradients, AdamW, one batch).

    The TopK family's sparse path holds one (batch, d_sae) pre-activation buffer and the
    top-k selections; jumprelu keeps autograd's activations (about five such tensors).
    """
    thresholds = d_sae if architecture not in ("standard", "topk") else 0  # JumpReLU's θ
    n_params = 2 * d_in * d_sae + d_sae + d_in + thresholds
    wide_buffers = {"standard": 2, "jumprelu": 5}.get(architecture, 1)
    rows = batch_size * (wide_buffers * (d_sae + 1) + 4 * (d_in + 1))
    return MemoryEstimate(parameters=n_params * bytes_per_value, gradients=n_params * bytes_per_value,
                          adam=2 * n_params * bytes_per_value, activations=rows * bytes_per_value)
