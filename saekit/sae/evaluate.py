"""`saekit eval`: how well an SAE reconstructs a layer and what it costs the model.

Over an activation cache: MSE, explained variance, cosine similarity, norms, L0/L1, and
each latent's firing density, with dead and dense latents, overall and per token type
(`saekit.sae.metrics`, sae-lens's definitions). Over a model and image-text data: the
next-token loss with the reconstruction spliced in against the clean model and the layer
zero- or mean-ablated, per token type (`saekit.sae.downstream`). Writes

    OUT/eval.json                    every number
    OUT/density.png                  histogram of log10 feature density (live latents)
    OUT/feature_density.safetensors  (d_sae,) density per token group ("all", "image", ...)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file

from saekit.atomic import atomic_file, atomic_write_bytes
from saekit.errors import UserError
from saekit.inputs import token_type_codes
from saekit.sae.metrics import SparsityStats

EVAL_FILE, DENSITY_PNG, DENSITY_FILE = "eval.json", "density.png", "feature_density.safetensors"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """What to evaluate the SAE on."""

    sae: Path
    """SAE folder (saekit or sae-lens format)."""
    cache: Path | None = None
    """Activation cache for the reconstruction and sparsity metrics."""
    data: Path | None = None
    """Image-text data (.jsonl or saved dataset) for the downstream loss."""
    model: str | None = None
    """Model preset for the downstream loss (default: the SAE's)."""
    model_path: Path | None = None
    """Model weights folder (default: the HF cache; tiny presets build in-process)."""
    out: Path | None = None
    """Output folder (default: SAE/eval)."""
    layer: int | None = None
    """Layer L = HF hidden_states[L] (default: the SAE's)."""
    token_types: tuple[str, ...] | None = None
    """Token types to evaluate (default: those the SAE was trained on)."""
    max_tokens: int | None = None
    """Cache tokens to read (default: all)."""
    max_samples: int = 64
    """Downstream: samples to run."""
    batch_size: int = 8
    """Downstream: samples per forward pass."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens is dense."""
    chunk_tokens: int = 4096
    """Tokens encoded at once."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, ..."""

    def __post_init__(self) -> None:
        if self.cache is None and self.data is None:
            raise UserError("give --cache CACHE (reconstruction metrics) and/or --data DATA "
                            "(downstream loss)")
        for name in ("max_samples", "batch_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0 < self.dense_threshold <= 1:
            raise UserError(f"dense_threshold must be in (0, 1], got {self.dense_threshold}")
        if self.token_types is not None:
            token_type_codes(self.token_types)


def _sae_layer(cfg: EvalConfig, info: dict[str, Any], sae_cfg: dict[str, Any]) -> int | None:
    if cfg.layer is not None:
        return cfg.layer
    layer = info.get("layer", {}).get("hf_hidden_states_index")
    if layer is None:
        layer = sae_cfg.get("metadata", {}).get("hf_hidden_states_index")
    return int(layer) if layer is not None else None


def _cache_chunks(cfg: EvalConfig, cache, layer: int, codes: tuple[int, ...]
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(activations (c, d_in) float32, token types (c,)) chunks of the cache, in shard order."""
    from saekit.sae.encode import _read_shard_rows

    keep, left = torch.tensor(codes, dtype=torch.int8), cfg.max_tokens
    for shard in cache.shards:
        rows = _read_shard_rows(cache, shard, layer, keep)
        acts, types = rows["activations"].float(), rows["token_types"]
        if left is not None:
            acts, types = acts[:left], types[:left]
            left -= acts.shape[0]
        for start in range(0, acts.shape[0], cfg.chunk_tokens):
            yield acts[start:start + cfg.chunk_tokens], types[start:start + cfg.chunk_tokens]
        if left is not None and left <= 0:
            return


@torch.no_grad()
def cache_metrics(cfg: EvalConfig, sae, layer: int | None, token_types: tuple[str, ...],
                  progress: bool) -> tuple[dict[str, Any], SparsityStats]:
    """Reconstruction and sparsity metrics of `sae` over the cache (sae-lens's definitions)."""
    from tqdm import tqdm

    from saekit.cache import ActivationCache

    cache = ActivationCache(cfg.cache)
    if layer is None or layer not in cache.layers:
        if cfg.layer is not None or len(cache.layers) != 1:
            raise UserError(f"{cfg.cache} holds layers {list(cache.layers)}"
                            + (f", not the SAE's layer {layer}" if layer is not None else "")
                            + "; choose one with --layer")
        layer = cache.layers[0]
    if cache.d_in != sae.d_in:
        raise UserError(f"SAE {cfg.sae} has d_in {sae.d_in} but cache {cfg.cache} holds width "
                        f"{cache.d_in}; use an SAE trained on this model and layer")
    stats = SparsityStats(sae.d_in, sae.d_sae, sae.W_enc.device)
    for x, types in tqdm(_cache_chunks(cfg, cache, layer, token_type_codes(token_types)),
                         desc="eval cache", unit="chunk", disable=not progress):
        x = x.to(sae.W_enc.device)
        f = sae.encode(x)
        stats.add(x, sae.decode(f), f, types)
    if stats.all.n == 0:
        raise UserError(f"{cfg.cache} holds no tokens of types {list(token_types)} in layer {layer}")
    return {"cache": str(cfg.cache), "layer": layer, **stats.result(cfg.dense_threshold)}, stats


def downstream(cfg: EvalConfig, sae, layer: int | None, token_types: tuple[str, ...],
               info: dict[str, Any], progress: bool) -> dict[str, Any]:
    """Loss recovered on `cfg.max_samples` samples of `cfg.data`."""
    from saekit.inputs import build_batch
    from saekit.models import load_model, resolve_device
    from saekit.sae.downstream import default_splits, downstream_losses
    from saekit.sources import open_source

    name = cfg.model or info.get("model", {}).get("name")
    if name is None:
        raise UserError(f"SAE {cfg.sae} does not name its model: give --model")
    if layer is None:
        raise UserError(f"SAE {cfg.sae} does not name its layer: give --layer")
    source = open_source(cfg.data, max_samples=cfg.max_samples)
    loaded = load_model(name, cfg.model_path, device=resolve_device(cfg.device))
    if loaded.preset.d_model != sae.d_in:
        raise UserError(f"SAE {cfg.sae} has d_in {sae.d_in} but {name} has width {loaded.preset.d_model}")
    samples = list(source)
    if not samples:
        raise UserError(f"{cfg.data} gave no usable sample")
    batches = [build_batch(loaded, [s.image for s in part], [s.text for s in part], [s.response for s in part])
               for part in (samples[i:i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size))]
    loss_on = ("prompt", "response")
    result = downstream_losses(loaded, sae.to(next(loaded.model.parameters()).device), batches, layer,
                               splits=default_splits(token_types), loss_on=loss_on, progress=progress)
    return {"model": name, "data": str(cfg.data), **result}


def evaluate(cfg: EvalConfig, *, progress: bool = True) -> Path:
    """Run the evaluation of `cfg` and write OUT/eval.json (+ density.png); returns OUT."""
    from saekit.models import resolve_device
    from saekit.plot import bar_chart_png
    from saekit.sae.io import load_sae

    loaded = load_sae(cfg.sae, device=resolve_device(cfg.device))
    sae, info = loaded.sae, loaded.info
    token_types = tuple(cfg.token_types or info.get("token_types") or ("image", "prompt", "response"))
    layer = _sae_layer(cfg, info, loaded.cfg)
    out = Path(cfg.out) if cfg.out is not None else Path(cfg.sae) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "sae": str(cfg.sae), "architecture": loaded.cfg.get("architecture"),
        "training_architecture": loaded.cfg.get("metadata", {}).get("training_architecture"),
        "d_in": sae.d_in, "d_sae": sae.d_sae, "token_types": list(token_types)}
    if cfg.cache is not None:
        result["reconstruction"], stats = cache_metrics(cfg, sae, layer, token_types, progress)
        layer = result["reconstruction"]["layer"]
        hist = result["reconstruction"]["latents"]
        png = bar_chart_png(hist["log10_density_histogram"]["counts"], hist["log10_density_histogram"]["edges"],
                            title=f"feature density of {sae.d_sae} latents over {stats.all.n} tokens",
                            xlabel="log10 fraction of tokens a latent fires on",
                            note=f"dead: {hist['dead']}, dense (> {cfg.dense_threshold:g}): {hist['dense']}")
        atomic_write_bytes(out / DENSITY_PNG, png)
        with atomic_file(out / DENSITY_FILE) as tmp:
            save_file({k: v.float().contiguous() for k, v in stats.feature_density().items()}, str(tmp))
    if cfg.data is not None:
        result["downstream"] = downstream(cfg, sae, layer, token_types, info, progress)
    atomic_write_bytes(out / EVAL_FILE, (json.dumps(result, indent=2) + "\n").encode())
    return out
