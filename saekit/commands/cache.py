"""`saekit cache`: capture layers of a model over image-text data into a sharded cache."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from saekit.cache import CacheConfig

    parser.epilog = ("Re-running the same command after an interruption resumes after the last "
                     "completed shard and gives the same files as an uninterrupted run.")
    add_config_args(parser, CacheConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from saekit.cache import ActivationCache, CacheConfig, build_cache

    cfg = config_from_args(CacheConfig, args)
    out = build_cache(cfg, progress=not args.no_progress)
    cache = ActivationCache(out)
    manifest = cache.manifest
    stats = manifest["source_stats"]
    skipped = ", ".join(f"{k} {v}" for k, v in stats["skipped"].items()) or "none"
    types = ", ".join(f"{k} {v}" for k, v in manifest["token_type_counts"].items())
    hooks = ", ".join(f"{layer} ({meta.get('transformer_lens_hook', '?')})"
                      for layer, meta in manifest["layers"].items())
    print(f"cache: {out}")
    print(f"  model {manifest['model']['name']}, layers {hooks}, d_in {cache.d_in}, "
          f"stored as {manifest['storage_dtype']}")
    print(f"  {cache.n_tokens} tokens in {len(cache.shards)} shards from {stats['used']} samples "
          f"({stats['seen']} records read; skipped: {skipped})")
    print(f"  token types: {types}")
    return 0
