"""The sparse autoencoder: an inference module with sae-lens's parameter names and shapes.

    pre = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc       (N, d_sae)
    f   = ReLU(pre)                                    standard
        = ReLU(top-k of pre), zero elsewhere           topk
        = ReLU(pre) · [pre > θ]                        jumprelu (θ: per-latent threshold)
    x̂   = f W_dec + b_dec                              (N, d_in)

These are exactly sae-lens 6's `StandardSAE` / `TopKSAE` (with
`rescale_acts_by_decoder_norm=False`) / `JumpReLUSAE`, so a saved folder gives the same
encodings in both libraries. BatchTopK and Matryoshka-BatchTopK SAEs are JumpReLU SAEs
at inference (θ = the threshold learned in training), as sae-lens saves them;
`INFERENCE_ARCHITECTURE` maps each training architecture to its module. saekit trains
with `apply_b_dec_to_input=False` (the recipe's f = ReLU(x W_enc + b_enc)); the flag
exists to read folders sae-lens wrote.
Training machinery (losses, fast backward, optimiser) lives in `saekit.sae.training`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn


InferenceArchitecture = Literal["standard", "topk", "jumprelu"]
INFERENCE_ARCHITECTURE: dict[str, InferenceArchitecture] = {
    "standard": "standard", "topk": "topk", "jumprelu": "jumprelu",
    "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
"""Training architecture -> the inference module (and sae-lens cfg.json architecture) it saves as."""


class SparseAutoencoder(nn.Module):
    """A standard (ReLU), TopK or JumpReLU SAE over d_in-wide activations."""

    def __init__(self, *, d_in: int, d_sae: int, architecture: InferenceArchitecture = "standard",
                 k: int | None = None, apply_b_dec_to_input: bool = False,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        super().__init__()
        if architecture not in ("standard", "topk", "jumprelu"):
            raise ValueError(f"unknown SAE architecture {architecture!r}")
        if architecture == "topk" and (k is None or not 1 <= k <= d_sae):
            raise ValueError(f"a topk SAE needs 1 <= k <= d_sae, got k={k}")
        self.d_in, self.d_sae = d_in, d_sae
        self.architecture: InferenceArchitecture = architecture
        self.k = k if architecture == "topk" else None
        self.apply_b_dec_to_input = apply_b_dec_to_input
        kw = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(d_in, **kw))
        if architecture == "jumprelu":  # only then: standard/topk state dicts stay sae-lens's
            self.threshold = nn.Parameter(torch.zeros(d_sae, **kw))

    @torch.no_grad()
    def init_weights_(self, generator: torch.Generator, decoder_norm: float | None = None) -> None:
        """sae-lens's initialisation: uniform random decoder rows rescaled to norm
        `decoder_norm` (default 0.1 for standard and jumprelu, sae-lens's heuristic; 1 for
        topk, whose decoder rows are kept at unit norm), encoder = decoder transposed, zero biases.
        Drawn in float64 on the CPU from `generator`, so a seed gives the same SAE on
        every device."""
        norm = decoder_norm if decoder_norm is not None else (1.0 if self.architecture == "topk" else 0.1)
        w = torch.rand(self.d_sae, self.d_in, generator=generator, dtype=torch.float64) * 2 - 1
        w = w / w.norm(dim=1, keepdim=True) * norm  # (d_sae, d_in)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def hidden_pre(self, x: Tensor) -> Tensor:
        """(N, d_in) -> (N, d_sae) encoder pre-activations."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x, self.W_enc)

    def activate(self, pre: Tensor) -> Tensor:
        """(N, d_sae) pre-activations -> (N, d_sae) latent activations f."""
        if self.architecture == "standard":
            return torch.relu(pre)
        if self.architecture == "jumprelu":  # as sae-lens's JumpReLUSAE.encode
            return torch.relu(pre) * (pre > self.threshold).to(pre.dtype)
        values, indices = pre.topk(self.k, dim=-1, sorted=False)  # (N, k)
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def encode(self, x: Tensor) -> Tensor:
        """(N, d_in) -> (N, d_sae) dense latent activations. See `saekit.sae.encode` for
        the chunked sparse encoder."""
        return self.activate(self.hidden_pre(x))

    def decode(self, f: Tensor) -> Tensor:
        """(N, d_sae) -> (N, d_in) reconstruction."""
        return torch.addmm(self.b_dec, f, self.W_dec)

    def forward(self, x: Tensor) -> Tensor:
        """(N, d_in) -> (N, d_in) reconstruction."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def fold_input_scale_(self, scale: float) -> None:
        """Make the SAE take raw x where it was trained on scale·x (sae-lens's
        `fold_activation_norm_scaling_factor`): the latents are unchanged, the output is
        the reconstruction of x rather than of scale·x. A JumpReLU threshold is in units
        of the pre-activations, which do not change."""
        self.W_enc.mul_(scale)
        self.W_dec.div_(scale)
        self.b_dec.div_(scale)

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"{self.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}"
