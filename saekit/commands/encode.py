"""`saekit encode`: encode an activation cache with an SAE into sparse codes (CSR safetensors)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from saekit.argparse_dataclass import add_config_args
    from saekit.sae.encode import EncodeConfig

    parser.epilog = ("Codes are computed chunk by chunk: a tokens x d_sae dense matrix is never "
                     "held. Read the file with saekit.sae.load_codes.")
    add_config_args(parser, EncodeConfig)
    parser.add_argument("--no-progress", action="store_true", help="Hide the progress bar.")


def run(args: argparse.Namespace) -> int:
    from saekit.argparse_dataclass import config_from_args
    from saekit.sae.encode import EncodeConfig, encode_cache, load_codes

    cfg = config_from_args(EncodeConfig, args)
    out = encode_cache(cfg, progress=not args.no_progress)
    codes, _, header = load_codes(out)
    n = max(codes.n_tokens, 1)
    print(f"codes: {out}")
    print(f"  {codes.n_tokens} tokens of layer {header['layer']}, d_sae {codes.d_sae}, "
          f"{codes.indices.numel()} active latents ({codes.indices.numel() / n:.1f} per token)")
    return 0
