"""The activation stream of a training run: from an activation cache, or captured on the fly.

Both are deterministic functions of (seed, start batch), which is what makes resumed
training identical to an uninterrupted run:
- cache: `ActivationCache.iter_batches(..., seed, start_batch, epochs=None)`, reshuffled
  epochs without end; resuming skips whole shard groups without reading them.
- on the fly: `stream_activations` over the data, one pass. Resuming replays (captures and
  discards) the batches already trained on, so prefer a cache for long runs.
"""

from __future__ import annotations

from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import torch

from saekit.errors import UserError
from saekit.sae.config import SAETrainConfig
from saekit.sae.training import TrainingData


def _model_record(name: str, family: str | None, d_model: int, n_layers: int) -> dict[str, Any]:
    from saekit.models import PRESETS

    preset = PRESETS.get(name)
    return {"name": name, "hub_id": preset.hub_id if preset else None, "family": family,
            "d_model": d_model, "n_layers": n_layers}


def cache_data(cfg: SAETrainConfig) -> TrainingData:
    """Training batches from the activation cache `cfg.cache`."""
    from saekit.cache import ActivationCache

    cache = ActivationCache(cfg.cache)
    layer = _cache_layer(cache, cfg.layer)
    model = cache.manifest["model"]
    if cfg.model is not None and cfg.model != model["name"]:
        raise UserError(f"{cfg.cache} was captured from {model['name']}, not {cfg.model}; "
                        "drop --model or pick the matching cache")
    if not cache.complete:
        raise UserError(f"{cfg.cache} is an unfinished cache; finish it first by re-running "
                        "`saekit cache` with the same arguments")
    cache.require_rows(cfg.token_types)  # before anything is written

    def batches(start_batch: int) -> Iterator[torch.Tensor]:
        return cache.iter_batches(cfg.batch_size, layer=layer, shuffle=True, seed=cfg.seed,
                                  token_types=cfg.token_types, start_batch=start_batch, epochs=None)

    compat = dict(cache.compat(layer), token_types=list(cfg.token_types))
    record = {"model": _model_record(model["name"], model.get("family"), cache.d_in, model["n_layers"]),
              "layer": cache.manifest["layers"][str(layer)], "token_types": list(cfg.token_types),
              "compat": compat,
              "data": {"kind": "cache", "path": str(Path(cfg.cache).expanduser().resolve()),
                       "n_tokens": cache.n_tokens, "source": cache.manifest.get("source")}}
    return TrainingData(batches, cache.d_in, record)


def _cache_layer(cache, layer: int | None) -> int:
    if layer is None:
        if len(cache.layers) != 1:
            raise UserError(f"{cache.directory} holds layers {list(cache.layers)}: choose one with --layer")
        return cache.layers[0]
    if layer not in cache.layers:
        raise UserError(f"{cache.directory} holds layers {list(cache.layers)}, not layer {layer}; "
                        "capture it with `saekit cache --layers ...` or pick one of these")
    return layer


def stream_data(cfg: SAETrainConfig) -> TrainingData:
    """Training batches captured from `cfg.model` over `cfg.data` while training."""
    from saekit.cache import stream_activations
    from saekit.capture import check_layers, layer_metadata
    from saekit.compat import capture_record
    from saekit.models import get_preset, load_model, resolve_device
    from saekit.sources import open_source

    preset = get_preset(cfg.model)
    if cfg.layer is not None and cfg.model_path is None:  # fail before loading weights
        check_layers(preset.n_layers, [cfg.layer], preset.name)
    open_source(cfg.data, strict=cfg.strict)  # a missing or malformed file fails here, not mid-run
    loaded = load_model(cfg.model, cfg.model_path, device=resolve_device(cfg.device))
    layer = cfg.layer if cfg.layer is not None else loaded.preset.default_layer
    meta = layer_metadata(loaded.preset, layer)  # UserError when out of range

    def batches(start_batch: int) -> Iterator[torch.Tensor]:
        source = open_source(cfg.data, strict=cfg.strict)
        stream = stream_activations(loaded, source, layer, batch_size=cfg.batch_size,
                                    token_types=cfg.token_types, seed=cfg.seed, drop_last=True,
                                    samples_per_forward=cfg.samples_per_forward)
        return islice(stream, start_batch, None)

    p = loaded.preset
    record = {"model": _model_record(p.name, p.family, p.d_model, p.n_layers), "layer": meta,
              "token_types": list(cfg.token_types),
              "compat": capture_record(loaded, layer, cfg.token_types),
              "data": {"kind": "stream", "path": str(Path(cfg.data).expanduser().resolve()),
                       "model_path": str(cfg.model_path) if cfg.model_path else None}}
    return TrainingData(batches, p.d_model, record)


def training_data(cfg: SAETrainConfig) -> TrainingData:
    """The config's activation stream: its cache, or on-the-fly capture."""
    return cache_data(cfg) if cfg.cache is not None else stream_data(cfg)
