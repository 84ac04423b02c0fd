"""`saekit info`: describe an SAE folder or an activation cache."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path,
                        help="An SAE folder (cfg.json) or an activation cache (manifest.json).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object instead of text.")


def describe_sae(directory: Path) -> dict[str, Any]:
    """Architecture, widths, layer names, training summary of an SAE folder."""
    from saekit.sae.io import read_sae_cfg, read_sae_info

    cfg, info = read_sae_cfg(directory), read_sae_info(directory)
    meta = cfg.get("metadata", {})
    layer = info.get("layer", {})
    training = info.get("training", {})
    return {
        "kind": "sae", "path": str(directory), "architecture": cfg.get("architecture"),
        "training_architecture": meta.get("training_architecture"),
        "d_in": cfg.get("d_in"), "d_sae": cfg.get("d_sae"), "k": cfg.get("k"),
        "dtype": cfg.get("dtype"), "model": info.get("model", {}).get("name") or meta.get("model_name"),
        "layer": layer.get("hf_hidden_states_index", meta.get("hf_hidden_states_index")),
        "hf_hidden_states_index": layer.get("hf_hidden_states_index"),
        "transformer_lens_hook": layer.get("transformer_lens_hook", meta.get("hook_name")),
        "module_path": layer.get("module_path"), "token_types": info.get("token_types"),
        "normalization": info.get("normalization"), "training_tokens": training.get("tokens"),
        "training_steps": training.get("steps"), "final_metrics": training.get("final_metrics"),
        "data": info.get("data"), "written_by": "saekit" if info else "another tool (no saekit.json)",
    }


def describe_cache(directory: Path) -> dict[str, Any]:
    """Layers, tokens, token types and shards of an activation cache."""
    from saekit.cache import ActivationCache

    cache = ActivationCache(directory)
    manifest = cache.manifest
    return {
        "kind": "activation_cache", "path": str(directory), "model": manifest["model"]["name"],
        "d_in": cache.d_in, "layers": manifest["layers"], "n_tokens": cache.n_tokens,
        "n_samples": manifest.get("n_samples"), "token_type_counts": manifest["token_type_counts"],
        "n_shards": len(cache.shards), "storage_dtype": manifest["storage_dtype"],
        "complete": cache.complete, "source": manifest.get("source"),
        "source_stats": manifest.get("source_stats"),
    }


def _print_text(desc: dict[str, Any]) -> None:
    print(f"{desc['path']}: {desc['kind'].replace('_', ' ')}")
    for key, value in desc.items():
        if key in ("kind", "path") or value is None:
            continue
        if isinstance(value, dict):
            value = ", ".join(f"{k} {json.dumps(v) if isinstance(v, (dict, list)) else v}"
                              for k, v in value.items())
        elif isinstance(value, list):
            value = ", ".join(map(str, value))
        print(f"  {key}: {value}")


def run(args: argparse.Namespace) -> int:
    from saekit.errors import UserError

    path: Path = args.path
    if (path / "cfg.json").is_file():
        desc = describe_sae(path)
    elif (path / "manifest.json").is_file():
        desc = describe_cache(path)
    else:
        what = "does not exist" if not path.exists() else "has neither cfg.json nor manifest.json"
        raise UserError(f"{path} {what}: give an SAE folder or an activation cache")
    if args.json:
        print(json.dumps(desc, indent=2))
    else:
        _print_text(desc)
    return 0
