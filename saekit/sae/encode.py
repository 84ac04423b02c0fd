"""Activations -> sparse SAE codes, in chunks, so a (tokens × d_sae) matrix is never whole.

Selection (both paths): a latent is kept when its activation h > threshold (threshold 0
keeps exactly the non-zero latents); with top_k, at most the top_k largest of those.
`encode_dense` is the slow reference; `encode_sparse` emits `saekit.sparse.SparseCodes`
(CSR, atom indices ascending within a token) holding one chunk of dense latents at a time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from saekit.atomic import atomic_file
from saekit.inputs import TOKEN_TYPE_NAMES, token_type_codes
from saekit.errors import UserError
from saekit.sae.model import SparseAutoencoder
from saekit.sparse import SparseCodes

CODES_FORMAT = "saekit-sparse-codes"
TAG_NAMES = ("token_types", "sample_ids", "positions", "image_grid")  # per-token cache tensors


def _check(threshold: float, top_k: int | None, d_sae: int) -> None:
    if threshold < 0:
        raise UserError(f"threshold must be >= 0 (activations are non-negative), got {threshold}")
    if top_k is not None and not 1 <= top_k <= d_sae:
        raise UserError(f"top_k must be in 1..{d_sae}, got {top_k}")


@torch.no_grad()
def encode_dense(sae: SparseAutoencoder, activations: Tensor, *, threshold: float = 0.0,
                 top_k: int | None = None) -> Tensor:
    """(N, d_in) -> (N, d_sae) latents with the unselected ones zeroed (reference path)."""
    _check(threshold, top_k, sae.d_sae)
    f = sae.encode(activations.to(sae.W_enc.device))  # (N, d_sae)
    f = f.masked_fill(f <= threshold, 0.0)
    if top_k is not None:
        values, indices = f.topk(top_k, dim=-1)  # (N, top_k)
        f = torch.zeros_like(f).scatter_(-1, indices, values)
    return f


def _select_chunk(f: Tensor, threshold: float, top_k: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """(c, d_sae) latents -> (counts (c,), indices (nnz,), values (nnz,)), rows in order,
    indices ascending within a row."""
    if top_k is None:
        rows, cols = (f > threshold).nonzero(as_tuple=True)  # row-major: ascending cols per row
        counts = torch.bincount(rows, minlength=f.shape[0])
        return counts, cols, f[rows, cols]
    values, indices = f.topk(top_k, dim=-1, sorted=False)  # (c, top_k)
    indices, order = indices.sort(dim=-1)
    values = values.gather(-1, order)
    keep = values > threshold  # (c, top_k)
    return keep.sum(dim=-1), indices[keep], values[keep]


@torch.no_grad()
def encode_sparse(sae: SparseAutoencoder, activations: Tensor, *, threshold: float = 0.0,
                  top_k: int | None = None, chunk_tokens: int = 4096) -> SparseCodes:
    """(N, d_in) activations -> SparseCodes over N tokens, `chunk_tokens` rows at a time.

    The chunks run on the SAE's device and the codes stay there. Peak memory is one
    (chunk_tokens × d_sae) block (1 GiB at 4096 × 65536 in fp32) plus the codes.
    """
    _check(threshold, top_k, sae.d_sae)
    if chunk_tokens < 1:
        raise UserError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    device = sae.W_enc.device
    counts, indices, values = [], [], []
    for start in range(0, activations.shape[0], chunk_tokens):
        chunk = activations[start:start + chunk_tokens].to(device)  # (c, d_in)
        part = _select_chunk(sae.encode(chunk), threshold, top_k)
        counts.append(part[0])
        indices.append(part[1])
        values.append(part[2])
    offsets = torch.zeros(activations.shape[0] + 1, dtype=torch.int64, device=device)
    if counts:
        offsets[1:] = torch.cat(counts).cumsum(0)
        return SparseCodes(torch.cat(indices).long(), torch.cat(values), offsets, sae.d_sae)
    return SparseCodes(torch.zeros(0, dtype=torch.int64, device=device),
                       torch.zeros(0, dtype=sae.W_enc.dtype, device=device), offsets, sae.d_sae)


def save_codes(path: str | Path, codes: SparseCodes, *, extra: dict[str, Tensor] | None = None,
               metadata: dict[str, Any] | None = None) -> Path:
    """Write codes (+ per-token `extra` tensors) to one safetensors file, atomically.

    Tensors: indices (nnz,) int64, values (nnz,), offsets (n+1,) int64 and `extra`;
    header metadata: format, d_sae and `metadata` (values stored as strings).
    """
    path = Path(path)
    tensors = {"indices": codes.indices, "values": codes.values, "offsets": codes.offsets,
               **(extra or {})}
    header = {"format": CODES_FORMAT, "d_sae": str(codes.d_sae),
              **{k: str(v) for k, v in (metadata or {}).items()}}
    with atomic_file(path, parents=True) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=header)
    return path


def load_codes(path: str | Path) -> tuple[SparseCodes, dict[str, Tensor], dict[str, str]]:
    """Read a file written by `save_codes`: (codes, extra tensors, header metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"codes file {path} does not exist")
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        header = handle.metadata() or {}
        if header.get("format") != CODES_FORMAT:
            raise UserError(f"{path} is not a saekit codes file (written by `saekit encode`)")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    codes = SparseCodes(tensors.pop("indices"), tensors.pop("values"), tensors.pop("offsets"),
                        int(header["d_sae"]))
    return codes, tensors, header


@dataclasses.dataclass(frozen=True)
class EncodeConfig:
    """Encode an activation cache with an SAE into one sparse-codes file."""

    sae: Path
    """SAE folder (cfg.json + sae_weights.safetensors, from `saekit train` or sae-lens)."""
    cache: Path
    """Activation cache written by `saekit cache`."""
    out: Path
    """Output .safetensors file: indices, values, offsets (CSR) + token_types, sample_ids, positions, image_grid per token."""
    threshold: float = 0.0
    """Keep latents with activation > threshold (0: every non-zero latent)."""
    top_k: int | None = None
    """Keep at most this many of the largest latents per token (default: no limit)."""
    layer: int | None = None
    """Cache layer to encode (default: the SAE's training layer, or the cache's only layer)."""
    token_types: tuple[str, ...] = ()
    """Token types to encode, of image, prompt, response, special (default: the SAE's training types)."""
    chunk_tokens: int = 4096
    """Tokens encoded at once (one chunk_tokens x d_sae block in memory)."""
    device: str = "auto"
    """Device: auto (cuda when available, else cpu), cpu, cuda, ..."""
    allow_mismatch: bool = False
    """Use an SAE made for another model, layer or token types."""

    def __post_init__(self) -> None:
        if self.threshold < 0:
            raise UserError(f"threshold must be >= 0 (activations are non-negative), got {self.threshold}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"top_k must be >= 1, got {self.top_k}")
        if self.chunk_tokens < 1:
            raise UserError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")
        if self.token_types:
            token_type_codes(self.token_types)


def _encode_layer(cfg: EncodeConfig, cache, sae_info: dict[str, Any]) -> int:
    layer = cfg.layer
    if layer is None:
        trained = sae_info.get("layer", {}).get("hf_hidden_states_index")
        if trained in cache.layers:
            return int(trained)
        if len(cache.layers) != 1:
            raise UserError(f"{cache.directory} holds layers {list(cache.layers)}: choose one with --layer")
        return cache.layers[0]
    if layer not in cache.layers:
        raise UserError(f"{cache.directory} holds layers {list(cache.layers)}, not layer {layer}")
    return layer


def _read_shard_rows(cache, shard: dict[str, Any], layer: int, keep: Tensor) -> dict[str, Tensor]:
    """One shard's activations of `layer` and per-token tags, filtered to token types `keep`."""
    path = cache.directory / shard["file"]
    if not path.is_file():
        raise UserError(f"{path} is listed in the cache manifest but missing")
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        rows = {name: handle.get_tensor(name) for name in TAG_NAMES}
        rows["activations"] = handle.get_tensor(f"activations.{layer}")  # (n, d_in)
    mask = torch.isin(rows["token_types"], keep.to(rows["token_types"].dtype))
    return {name: value[mask] for name, value in rows.items()}


def _check_out_file(out: Path) -> None:
    """UserError unless `out` can become a file: not a folder, below folders (not files)."""
    if out.is_dir():
        raise UserError(f"encode: --out {out} is a folder; give a file path such as {out / 'codes.safetensors'}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"encode: --out {out}: {parent} is a file, not a folder")
            break


def _concat_codes(parts: list[SparseCodes], d_sae: int) -> SparseCodes:
    offsets, base = [torch.zeros(1, dtype=torch.int64)], 0
    for part in parts:
        offsets.append(part.offsets[1:] + base)
        base += int(part.offsets[-1])
    values = [p.values for p in parts] or [torch.zeros(0)]
    indices = [p.indices for p in parts] or [torch.zeros(0, dtype=torch.int64)]
    return SparseCodes(torch.cat(indices), torch.cat(values), torch.cat(offsets), d_sae)


def encode_cache(cfg: EncodeConfig, *, progress: bool = True) -> Path:
    """Encode every row of the cache (selected token types) shard by shard into `cfg.out`."""
    from tqdm import tqdm

    from saekit.cache import ActivationCache
    from saekit.models import resolve_device
    from saekit.sae.io import load_sae, read_sae_info, sae_compat

    _check_out_file(Path(cfg.out))
    device = resolve_device(cfg.device)
    cache = ActivationCache(cfg.cache)
    layer = _encode_layer(cfg, cache, read_sae_info(cfg.sae))
    token_types = cfg.token_types or tuple(sae_compat(cfg.sae).get("token_types") or TOKEN_TYPE_NAMES)
    cache.require_rows(token_types)  # no rows to encode would give an empty codes file
    sae = load_sae(cfg.sae, expected_d_in=cache.d_in, target=f"cache {cfg.cache}", given=cache.compat(layer),
                   allow_mismatch=cfg.allow_mismatch, token_types=token_types, device=device).sae
    keep = torch.tensor(token_type_codes(token_types), dtype=torch.int8)
    parts, tags = [], {name: [] for name in TAG_NAMES}
    for shard in tqdm(cache.shards, desc="encode", unit="shard", disable=not progress):
        rows = _read_shard_rows(cache, shard, layer, keep)
        codes = encode_sparse(sae, rows.pop("activations").float(), threshold=cfg.threshold,
                              top_k=cfg.top_k, chunk_tokens=cfg.chunk_tokens)
        parts.append(SparseCodes(codes.indices.cpu(), codes.values.cpu(), codes.offsets.cpu(), codes.d_sae))
        for name in TAG_NAMES:
            tags[name].append(rows[name])
    codes = _concat_codes(parts, sae.d_sae)
    extra = {name: torch.cat(values) for name, values in tags.items() if values}
    metadata = {"sae": Path(cfg.sae).resolve(), "cache": Path(cfg.cache).resolve(), "layer": layer,
                "threshold": cfg.threshold, "top_k": cfg.top_k, "token_types": ",".join(token_types)}
    return save_codes(cfg.out, codes, extra=extra, metadata=metadata)
