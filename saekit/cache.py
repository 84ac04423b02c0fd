"""Sharded activation cache: capture a model's layers over image-text data, write them to
safetensors shards with a manifest, and stream them back shuffled for SAE training.

On disk (`out/`):
- `shard_00000.safetensors`, ...: `activations.<L>` (n, d_model) in the storage dtype for
  each layer L, `token_types` (n,) int8 (`saekit.inputs.TokenType`), `sample_ids` (n,)
  int64 (the sample's index in source order), `positions` (n,) int64 (position in the
  sample's own token sequence, padding excluded), `image_grid` (n, 2) int16 (patch
  row/column of image tokens, -1 elsewhere).
- `manifest.json`: the config, model preset, layer metadata (HF `hidden_states` index
  and TransformerLens hook), a compatibility record per layer (`saekit.compat`), the data
  file's fingerprint, source description and statistics, and every completed shard with
  its size in bytes; `complete: true` once the whole source is done.

Shards end only at batch boundaries, so an interrupted run resumes from the last shard
in the manifest, recomputes exactly the batches that followed it, and writes the same
bytes an uninterrupted run would. Files are written to a temporary name, then renamed.
Nothing is written before the first shard, and a source with no usable sample is refused.
Opening a cache checks every listed shard's size, so a truncated shard is never read.
Padding never reaches the cache: `saekit.capture` returns valid positions only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, NamedTuple

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saekit.atomic import atomic_file, atomic_write_json
from saekit.compat import COMPAT_KEY, capture_record, check_compatible
from saekit.errors import UserError
from saekit.integrity import check_safetensors, data_fingerprint, read_json_object
from saekit.inputs import PAD_TYPE, TOKEN_TYPE_NAMES, TokenType, token_type_codes  # noqa: F401 (re-exported)
from saekit.run import check_resume, config_record, free_on_resume
from saekit.sources import ImageTextSample, Source, SourceItem, SourceStats, open_source

if TYPE_CHECKING:
    from saekit.models import LoadedModel

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SHARD_NAME = "shard_{:05d}.safetensors"
CACHE_FORMAT = "saekit-activation-cache"
CACHE_VERSION = 1
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """What to capture, from which data, and how to store it."""

    model: str
    """Model preset name (see `saekit.models.PRESETS`), e.g. tiny-llava or llava-1.5-7b."""
    data: Path
    """Image-text data: a .jsonl file (plain or OBELICS documents) or a
    datasets.save_to_disk folder."""
    out: Path = free_on_resume()
    """Output folder for the shards and manifest.json; an unfinished cache there is resumed."""
    model_path: Path | None = None
    """Local folder with the model weights; none: the preset's hub id in the local HF
    cache (tiny presets: built in-process)."""
    layers: tuple[int, ...] = ()
    """Layers to capture, as HF hidden_states indices (L = output of block L counted
    from 1, TransformerLens blocks.{L-1}.hook_resid_post); empty: the preset's default."""
    shard_tokens: int = 65536
    """Rows per shard target: a shard is closed after the batch that makes it reach
    this many tokens."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype of the activations: 4 or 2 bytes x d_model per token per layer
    (float16 is exact to ~3 digits; bfloat16 keeps float32's range)."""
    batch_size: int = 8
    """Samples per forward pass."""
    max_samples: int | None = None
    """Stop after this many usable samples; none: the whole source."""
    strict: bool = False
    """Stop at the first missing or unreadable image instead of skipping and counting it."""
    token_types: tuple[str, ...] = TOKEN_TYPE_NAMES
    """Token types to keep: any of image, prompt, response, special."""
    image_column: str = "image"
    """Image field of a plain JSONL line or datasets folder."""
    text_column: str = "text"
    """Text field of a plain JSONL line or datasets folder."""
    model_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the model: auto = float32 on CPU, bfloat16 on a GPU."""
    device: str = free_on_resume("auto")
    """Device for the model: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ..."""

    def __post_init__(self) -> None:
        for name in ("data", "out", "model_path"):  # str from Python callers -> Path
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.shard_tokens < 1:
            raise UserError(f"shard_tokens must be >= 1, got {self.shard_tokens}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.dtype not in STORAGE_DTYPES:
            raise UserError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {self.dtype!r}")
        token_type_codes(self.token_types)  # validates the names
        if len(set(self.layers)) != len(self.layers):
            raise UserError(f"layers must be distinct, got {list(self.layers)}")


def _atomic_save_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write_json(out / MANIFEST_NAME, manifest)


_MANIFEST_FIELDS = {"format": str, "version": int, "config": dict, "model": dict, "layers": dict,
                   "d_in": int, "storage_dtype": str, "shards": list, "complete": bool,
                   "token_type_counts": dict}
_SHARD_FIELDS = ("file", "n_tokens", "token_type_counts")


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise UserError(f"{directory} is not an activation cache: no {MANIFEST_NAME} "
                        "(make one with `saekit cache`)")
    fix = "rebuild the cache with `saekit cache` into a new --out"
    manifest = read_json_object(path, fix=fix)
    if manifest.get("format") != CACHE_FORMAT:
        raise UserError(f"{path}: not a saekit activation cache manifest")
    if manifest.get("version") != CACHE_VERSION:
        raise UserError(f"{path}: cache format version {manifest.get('version')} is not "
                        f"supported by this saekit (expects {CACHE_VERSION})")
    read_json_object(path, fields=_MANIFEST_FIELDS, fix=fix)  # the shape, once it is ours
    for k, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or any(key not in shard for key in _SHARD_FIELDS) \
                or set(shard["token_type_counts"]) != set(TOKEN_TYPE_NAMES):
            raise UserError(f"{path}: shard entry #{k} lacks file, n_tokens or token_type_counts; {fix}")
    return manifest


def verify_shards(directory: Path, manifest: dict[str, Any]) -> None:
    """UserError naming the first listed shard that is missing or damaged: its size against the
    manifest's record (or, for caches written before sizes were recorded, its header)."""
    fix = "re-run `saekit cache` into a new --out (a damaged shard cannot be resumed)"
    for shard in manifest["shards"]:
        path = Path(directory) / shard["file"]
        if not path.is_file():
            raise UserError(f"{path} is listed in {MANIFEST_NAME} but missing; {fix}")
        if "bytes" not in shard:
            check_safetensors(path, fix=fix)
        elif path.stat().st_size != shard["bytes"]:
            raise UserError(f"{path}: damaged shard ({path.stat().st_size} bytes, {MANIFEST_NAME} "
                            f"says {shard['bytes']}); {fix}")


# --------------------------------------------------------------------------- writing

class _Batch(NamedTuple):
    items: list[SourceItem]
    stats: SourceStats
    """The source's counts right after the batch's last sample (a resume point)."""


def _batches(source: Source, start_record: int, stats: SourceStats | None, size: int
             ) -> Iterator[_Batch]:
    """Group the source's samples into batches of `size` (the last may be smaller)."""
    items: list[SourceItem] = []
    for item in source.iter_from(start_record, stats):
        items.append(item)
        # The source is paused right after this item: its counts are a valid resume point
        # (records skipped after the batch's last item are re-read, and counted, on resume).
        snapshot = SourceStats.from_dict(source.stats.to_dict())
        if len(items) == size:
            yield _Batch(items, snapshot)
            items = []
    if items:
        yield _Batch(items, snapshot)


class _ShardBuffer:
    """Rows captured since the last shard, and the samples/records they cover."""

    def __init__(self, layers: tuple[int, ...]):
        self.layers = layers
        self.parts: list[dict[str, torch.Tensor]] = []
        self.n_tokens = 0
        self.first_sample: int | None = None
        self.last_sample = -1
        self.resume: tuple[int, SourceStats] | None = None  # (next record, source counts)

    def add(self, rows: dict[str, torch.Tensor], first_sample: int, last_sample: int,
            next_record: int, stats: SourceStats) -> None:
        self.parts.append(rows)
        self.n_tokens += int(rows["token_types"].shape[0])
        self.first_sample = first_sample if self.first_sample is None else self.first_sample
        self.last_sample = last_sample
        self.resume = (next_record, stats)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: torch.cat([part[key] for part in self.parts]) for key in self.parts[0]}


def _capture_rows(loaded: "LoadedModel", batch: _Batch, layers: tuple[int, ...],
                  first_sample: int, keep: torch.Tensor, storage: torch.dtype
                  ) -> dict[str, torch.Tensor]:
    """Capture one batch and return its kept rows in shard layout (CPU tensors)."""
    from saekit.capture import capture
    from saekit.inputs import build_batch

    samples: list[ImageTextSample] = [item.sample for item in batch.items]
    model_batch = build_batch(loaded, [s.image for s in samples], [s.text for s in samples],
                              [s.response for s in samples])
    cap = capture(loaded, model_batch, list(layers))
    types = cap.token_types.to("cpu", torch.int8)  # (N,)
    mask = torch.isin(types, keep)
    rows = {}
    for layer in layers:
        acts = cap.activations[layer]  # (N, d) on the model's device
        rows[f"activations.{layer}"] = acts[mask.to(acts.device)].to(storage).cpu()  # (n, d)
    rows["token_types"] = types[mask]
    rows["sample_ids"] = cap.sample_index.to("cpu", torch.int64)[mask] + first_sample
    # Position in the sample's own sequence (capture gives it in the padded batch, which
    # depends on the batch's other samples): count the valid positions before it.
    valid = model_batch.token_types != PAD_TYPE  # (B, T)
    own_position = (valid.long().cumsum(dim=1) - 1)[valid]  # (B, T) -> (N,), capture's order
    rows["positions"] = own_position[mask]
    rows["image_grid"] = cap.image_grid.to("cpu", torch.int16)[mask]
    return rows


def _type_counts(types: torch.Tensor) -> dict[str, int]:
    counts = torch.bincount(types.long(), minlength=len(TOKEN_TYPE_NAMES))
    return {name: int(counts[code]) for code, name in enumerate(TOKEN_TYPE_NAMES)}


def _flush(out: Path, manifest: dict[str, Any], buffer: _ShardBuffer) -> _ShardBuffer:
    """Write the buffered rows as the next shard, then record it in the manifest."""
    if buffer.n_tokens == 0:
        return buffer
    shards = manifest["shards"]
    name = SHARD_NAME.format(len(shards))
    tensors = buffer.tensors()
    out.mkdir(parents=True, exist_ok=True)  # nothing is written before the first shard
    _atomic_save_shard(out / name, tensors)
    next_record, stats = buffer.resume  # type: ignore[misc]
    shards.append({"file": name, "bytes": (out / name).stat().st_size, "n_tokens": buffer.n_tokens,
                   "first_sample": buffer.first_sample, "last_sample": buffer.last_sample,
                   "token_type_counts": _type_counts(tensors["token_types"]),
                   "next_record": next_record, "source_stats": stats.to_dict()})
    _update_totals(manifest, stats)
    _write_manifest(out, manifest)  # after the shard: a listed shard is always complete
    return _ShardBuffer(buffer.layers)


def _update_totals(manifest: dict[str, Any], stats: SourceStats) -> None:
    shards = manifest["shards"]
    manifest["n_tokens"] = sum(s["n_tokens"] for s in shards)
    manifest["token_type_counts"] = {
        name: sum(s["token_type_counts"][name] for s in shards) for name in TOKEN_TYPE_NAMES}
    manifest["source_stats"] = stats.to_dict()
    manifest["n_samples"] = stats.used


def _compat_records(cfg: CacheConfig, loaded: "LoadedModel") -> dict[str, Any]:
    return {str(layer): capture_record(loaded, layer, cfg.token_types) for layer in cfg.layers}


def _fingerprint(data: Path) -> str | None:
    return data_fingerprint(data) if data.exists() else None


def _new_manifest(cfg: CacheConfig, record: dict[str, Any], loaded: "LoadedModel",
                  layers: tuple[int, ...], source: Source) -> dict[str, Any]:
    from saekit.capture import layer_metadata

    preset = loaded.preset
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "config": record,
        "model": {"name": preset.name, "family": preset.family, "hf_class": preset.hf_class,
                  "d_model": preset.d_model, "n_layers": preset.n_layers},
        "layers": {str(layer): layer_metadata(preset, layer) for layer in layers},
        COMPAT_KEY: _compat_records(cfg, loaded), "data_fingerprint": _fingerprint(cfg.data),
        "d_in": preset.d_model, "storage_dtype": record["dtype"],
        "token_type_names": list(TOKEN_TYPE_NAMES), "source": source.describe(),
        "source_stats": SourceStats().to_dict(), "n_samples": 0, "n_tokens": 0,
        "token_type_counts": {name: 0 for name in TOKEN_TYPE_NAMES},
        "shards": [], "complete": False,
    }


def _unfinished_write(path: Path) -> bool:
    """A file an interrupted write left: ours end in .tmp, safetensors' own start with .tmp."""
    return path.is_file() and (path.name.endswith(".tmp") or path.name.startswith(".tmp"))


def _existing_manifest(cfg: CacheConfig) -> dict[str, Any] | None:
    """The manifest of a cache already in `cfg.out` (checked against `cfg`, its data file and
    its shards), or None. A folder that holds other files is refused."""
    if cfg.out.exists() and not cfg.out.is_dir():
        raise UserError(f"cache: --out {cfg.out} is a file; give a folder for the cache")
    if not (cfg.out / MANIFEST_NAME).is_file():
        others = sorted(p.name for p in cfg.out.iterdir() if not _unfinished_write(p)) \
            if cfg.out.is_dir() else []
        if others:
            raise UserError(f"cache: --out {cfg.out} already holds files that are not a cache "
                            f"({', '.join(others[:3])}); give an empty or new folder")
        return None
    manifest = read_manifest(cfg.out)
    where = f"cache: {cfg.out / MANIFEST_NAME}"
    check_resume(manifest["config"], cfg, where)
    saved, now = manifest.get("data_fingerprint"), _fingerprint(cfg.data)
    if saved is not None and now is not None and saved != now:
        raise UserError(f"{where}: the data {cfg.data} changed since this cache was started "
                        "(its fingerprint differs); restore the data or use another --out")
    verify_shards(cfg.out, manifest)
    return manifest


def build_cache(cfg: CacheConfig, *, loaded: "LoadedModel | None" = None,
                source: Source | None = None, progress: bool = True) -> Path:
    """Capture `cfg.layers` over `cfg.data` into shards in `cfg.out`; returns `cfg.out`.

    An existing unfinished cache with the same config is resumed after its last shard;
    a finished one is returned as is. `loaded` / `source` skip loading them from the
    config (they must be what the config names).
    """
    from saekit.capture import check_layers
    from saekit.models import get_preset, load_model, resolve_device

    if loaded is not None and loaded.preset.name != cfg.model:
        raise UserError(f"build_cache: the config names model {cfg.model!r} but the loaded "
                        f"model is {loaded.preset.name!r}")
    preset = loaded.preset if loaded is not None else get_preset(cfg.model)
    layers = tuple(sorted(cfg.layers)) or (preset.default_layer,)
    check_layers(preset.n_layers, layers, preset.name)  # before anything is loaded or written
    cfg = dataclasses.replace(cfg, layers=layers)  # no layers = the preset default: record which
    record = config_record(cfg)
    manifest = _existing_manifest(cfg)
    if manifest is not None and manifest["complete"]:
        log.info("%s already holds a complete cache", cfg.out)
        return cfg.out
    if source is None:
        source = open_source(cfg.data, strict=cfg.strict, image_column=cfg.image_column,
                             text_column=cfg.text_column, max_samples=cfg.max_samples)
    if loaded is None:
        loaded = load_model(cfg.model, cfg.model_path, device=resolve_device(cfg.device),
                            dtype=None if cfg.model_dtype == "auto" else cfg.model_dtype)
    for tmp in [p for p in cfg.out.iterdir() if _unfinished_write(p)] if cfg.out.is_dir() else []:
        tmp.unlink()  # a write that an interrupted run never finished
    if manifest is None:
        manifest = _new_manifest(cfg, record, loaded, tuple(layers), source)
    elif COMPAT_KEY in manifest:  # the same model weights as the shards already written
        for layer, saved in manifest[COMPAT_KEY].items():
            check_compatible(saved, f"the unfinished cache {cfg.out}",
                             capture_record(loaded, int(layer), cfg.token_types),
                             f"model {cfg.model} ({cfg.model_path or 'built in'})",
                             advice="resume with the same model weights, or use another --out")
    _fill(cfg, manifest, loaded, source, tuple(layers), progress)
    return cfg.out


def _fill(cfg: CacheConfig, manifest: dict[str, Any], loaded: "LoadedModel", source: Source,
          layers: tuple[int, ...], progress: bool) -> None:
    """Run the batches after the manifest's last shard, writing shards as they fill."""
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    start_record, stats = 0, None
    if manifest["shards"]:
        last = manifest["shards"][-1]
        start_record, stats = last["next_record"], SourceStats.from_dict(last["source_stats"])
    keep = torch.tensor(token_type_codes(cfg.token_types), dtype=torch.int8)
    storage = STORAGE_DTYPES[cfg.dtype]
    buffer = _ShardBuffer(layers)
    total = source.n_records  # records, an upper bound on samples
    if cfg.max_samples is not None:
        total = min(cfg.max_samples, total or cfg.max_samples)
    bar = tqdm(total=total, initial=stats.used if stats else 0, unit="sample",
               desc=f"cache {cfg.model} L{','.join(map(str, layers))}", disable=not progress)
    n_new, started = 0, time.perf_counter()
    with bar, logging_redirect_tqdm(loggers=[logging.getLogger("saekit")]):
        for batch in _batches(source, start_record, stats, cfg.batch_size):
            first_sample = batch.stats.used - len(batch.items)
            rows = _capture_rows(loaded, batch, layers, first_sample, keep, storage)
            buffer.add(rows, first_sample, batch.stats.used - 1, batch.items[-1].record + 1,
                       batch.stats)
            n_new += int(rows["token_types"].shape[0])
            bar.update(len(batch.items))
            bar.set_postfix(tokens_per_s=f"{n_new / (time.perf_counter() - started):.0f}")
            if buffer.n_tokens >= cfg.shard_tokens:
                buffer = _flush(cfg.out, manifest, buffer)
        buffer = _flush(cfg.out, manifest, buffer)
    _update_totals(manifest, source.stats)
    if manifest["n_tokens"] == 0:
        stats = source.stats
        skipped = ", ".join(f"{k} {v}" for k, v in stats.skipped.items()) or "none"
        what = "no usable sample" if stats.used == 0 else f"no token of types {', '.join(cfg.token_types)}"
        raise UserError(f"cache: {cfg.data} gave {what} ({stats.seen} records read; skipped: "
                        f"{skipped}); check the image paths and --token-types. Nothing was written")
    manifest["source"] = source.describe()
    manifest["complete"] = True
    _write_manifest(cfg.out, manifest)


# --------------------------------------------------------------------------- reading

class CacheRows(NamedTuple):
    """All rows of a cache for one layer, in shard order (small caches and tests)."""

    activations: torch.Tensor
    """(n, d_in) activations of the layer, float32."""
    token_types: torch.Tensor
    """(n,) int8 `TokenType` codes."""
    sample_ids: torch.Tensor
    """(n,) int64 index of each row's sample in source order."""
    positions: torch.Tensor
    """(n,) int64 position of each row in its sample's sequence."""
    image_grid: torch.Tensor
    """(n, 2) int16 patch (row, column) of image tokens (as given by capture for others)."""


def _batches_from_chunks(chunks: Iterator[torch.Tensor], batch_size: int, drop_last: bool
                         ) -> Iterator[torch.Tensor]:
    """Cut a stream of (k_i, d) row chunks into consecutive (batch_size, d) batches.

    Batches are copies, so a chunk is freed as soon as the stream moves past it.
    """
    leftover: torch.Tensor | None = None
    for rows in chunks:
        start = 0
        if leftover is not None:
            need = batch_size - leftover.shape[0]
            if rows.shape[0] < need:
                leftover = torch.cat([leftover, rows])
                del rows  # before the next chunk is made
                continue
            yield torch.cat([leftover, rows[:need]])
            leftover, start = None, need
        n_full = (rows.shape[0] - start) // batch_size
        for i in range(n_full):
            yield rows[start + i * batch_size:start + (i + 1) * batch_size].clone()
        rest = rows[start + n_full * batch_size:]
        leftover = rest.clone() if rest.shape[0] else None
        del rows, rest
    if leftover is not None and not drop_last:
        yield leftover


class ActivationCache:
    """Read a cache written by `build_cache`.

    `iter_batches` streams shuffled (batch_size, d_in) batches holding at most
    `shards_in_memory` shards at once: each epoch visits the shards in a seeded random
    order, in groups of `shards_in_memory`, and yields each group's rows in a seeded
    random order. Row streams of consecutive groups and epochs are concatenated and cut
    into batches, so every row is seen exactly once per epoch.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        verify_shards(self.directory, self.manifest)
        self.shards: list[dict[str, Any]] = self.manifest["shards"]
        self.resident_rows = 0
        """Rows of shard data currently held by readers of this cache (freed on release)."""
        self.peak_resident_rows = 0
        """The largest `resident_rows` seen (for checking the memory bound)."""

    @property
    def d_in(self) -> int:
        return int(self.manifest["d_in"])

    @property
    def n_tokens(self) -> int:
        return int(sum(s["n_tokens"] for s in self.shards))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(int(layer) for layer in self.manifest["layers"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def __repr__(self) -> str:
        return (f"ActivationCache({str(self.directory)!r}: {self.n_tokens} tokens, "
                f"{len(self.shards)} shards, layers {list(self.layers)}, d_in {self.d_in})")

    def _check_layer(self, layer: int) -> None:
        if layer not in self.layers:
            raise UserError(f"{self.directory} holds layers {list(self.layers)}, not layer {layer}")

    def compat(self, layer: int) -> dict[str, Any]:
        """The compatibility record of `layer` (`saekit.compat`); for a cache written before
        records existed, what the manifest says (no fingerprint)."""
        self._check_layer(layer)
        saved = self.manifest.get(COMPAT_KEY, {}).get(str(layer))
        if isinstance(saved, dict):
            return dict(saved)
        meta = self.manifest["layers"][str(layer)]
        return {"model": self.manifest["model"].get("name"), "fingerprint": None, "layer": layer,
                "hook": meta.get("transformer_lens_hook") if isinstance(meta, dict) else None,
                "d_in": self.d_in, "token_types": list(self.manifest["config"].get("token_types", [])) or None,
                "normalization": "none"}

    def require_rows(self, token_types: Iterable[str] | None) -> tuple[int, ...]:
        """The codes of `token_types` (default all), after checking the cache holds rows of them."""
        codes = token_type_codes(token_types)
        if sum(self.count_rows(s, codes) for s in self.shards) == 0:
            held = [name for name, n in self.manifest["token_type_counts"].items() if n]
            raise UserError(f"{self.directory} holds no rows of token types "
                            f"{', '.join(TOKEN_TYPE_NAMES[c] for c in codes)} (it holds "
                            f"{', '.join(held) or 'no rows at all'}); choose --token-types among those")
        return codes

    def count_rows(self, shard: dict[str, Any], codes: tuple[int, ...]) -> int:
        return sum(shard["token_type_counts"][TOKEN_TYPE_NAMES[c]] for c in codes)

    def read_shard(self, shard: dict[str, Any], layer: int, codes: tuple[int, ...]) -> torch.Tensor:
        """One shard's (n, d_in) rows of `layer` with token types in `codes`, storage dtype."""
        path = self.directory / shard["file"]
        if not path.is_file():
            raise UserError(f"{path} is listed in {MANIFEST_NAME} but missing")
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            acts = handle.get_tensor(f"activations.{layer}")  # (n, d)
            if len(codes) < len(TOKEN_TYPE_NAMES):
                types = handle.get_tensor("token_types")
                acts = acts[torch.isin(types, torch.tensor(codes, dtype=types.dtype))]
        if acts.shape[0] != self.count_rows(shard, codes):
            raise UserError(f"{path}: holds {acts.shape[0]} rows of the selected token types, "
                            f"{MANIFEST_NAME} says {self.count_rows(shard, codes)}")
        return acts

    def _track(self, tensor: torch.Tensor) -> torch.Tensor:
        n = int(tensor.shape[0])
        self.resident_rows += n
        self.peak_resident_rows = max(self.peak_resident_rows, self.resident_rows)
        weakref.finalize(tensor, self._release, n)
        return tensor

    def _release(self, n: int) -> None:
        self.resident_rows -= n

    def _load_group(self, group: list[dict[str, Any]], layer: int, codes: tuple[int, ...],
                    order: torch.Tensor | None) -> torch.Tensor:
        """Rows of `group`'s shards, placed at `order` (a permutation) or in sequence."""
        n = sum(self.count_rows(s, codes) for s in group)
        storage = STORAGE_DTYPES[self.manifest["storage_dtype"]]
        out = self._track(torch.empty(n, self.d_in, dtype=storage))  # (n, d_in)
        offset = 0
        for shard in group:
            rows = self.read_shard(shard, layer, codes)  # one shard beside the group at most
            target = slice(offset, offset + rows.shape[0])
            out[order[target] if order is not None else target] = rows
            offset += rows.shape[0]
            del rows
        return out

    def _row_chunks(self, layer: int, codes: tuple[int, ...], *, shuffle: bool, seed: int,
                    shards_in_memory: int, skip_rows: int, epochs: int | None
                    ) -> Iterator[torch.Tensor]:
        """The epochs' row stream as one (k, d) chunk per shard group, first `skip_rows` dropped."""
        epoch = 0
        while epochs is None or epoch < epochs:
            shard_order = (np.random.default_rng([seed, epoch]).permutation(len(self.shards))
                           if shuffle else np.arange(len(self.shards)))
            for g, start in enumerate(range(0, len(shard_order), shards_in_memory)):
                group = [self.shards[i] for i in shard_order[start:start + shards_in_memory]]
                n = sum(self.count_rows(s, codes) for s in group)
                if skip_rows >= n:  # skipped without reading: counts come from the manifest
                    skip_rows -= n
                    continue
                order = (torch.from_numpy(np.random.default_rng([seed, epoch, g]).permutation(n))
                         if shuffle else None)
                rows = self._load_group(group, layer, codes, order)
                yield rows[skip_rows:]
                skip_rows = 0
                del rows  # before the next group loads: one group in memory, not two
            epoch += 1

    def iter_batches(self, batch_size: int, *, layer: int, shuffle: bool = True, seed: int = 0,
                     shards_in_memory: int = 4, token_types: Iterable[str] | None = None,
                     start_batch: int = 0, epochs: int | None = 1, drop_last: bool = False,
                     device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                     ) -> Iterator[torch.Tensor]:
        """Yield (batch_size, d_in) activation batches of `layer`.

        epochs: passes over the cache (None: endless). start_batch: skip that many
        batches first, as if they had been drawn (a resumed trainer passes the number it
        consumed; whole shard groups are skipped without reading them). token_types:
        names to keep (default all). The last batch of the last epoch may be smaller
        unless `drop_last`.
        """
        self._check_layer(layer)
        if batch_size < 1 or shards_in_memory < 1 or start_batch < 0:
            raise ValueError("batch_size and shards_in_memory must be >= 1, start_batch >= 0")
        codes = self.require_rows(token_types)
        chunks = self._row_chunks(layer, codes, shuffle=shuffle, seed=seed,
                                  shards_in_memory=shards_in_memory,
                                  skip_rows=start_batch * batch_size, epochs=epochs)
        for batch in _batches_from_chunks(chunks, batch_size, drop_last):
            yield batch.to(device=device, dtype=dtype)

    def read_rows(self, layer: int) -> CacheRows:
        """Every row of `layer` with its tags, in shard order (loads the whole cache)."""
        self._check_layer(layer)
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in CacheRows._fields}
        for shard in self.shards:
            with safe_open(str(self.directory / shard["file"]), framework="pt", device="cpu") as f:
                parts["activations"].append(f.get_tensor(f"activations.{layer}").float())
                for key in CacheRows._fields[1:]:
                    parts[key].append(f.get_tensor(key))
        if not self.shards:
            return CacheRows(torch.empty(0, self.d_in), torch.empty(0, dtype=torch.int8),
                             torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64),
                             torch.empty(0, 2, dtype=torch.int16))
        return CacheRows(*(torch.cat(parts[key]) for key in CacheRows._fields))

    def read_all(self, layer: int, token_types: Iterable[str] | None = None) -> torch.Tensor:
        """(n, d_in) float32 activations of `layer` in shard order, optionally filtered."""
        rows = self.read_rows(layer)
        if token_types is None:
            return rows.activations
        keep = torch.tensor(token_type_codes(token_types), dtype=torch.int8)
        return rows.activations[torch.isin(rows.token_types, keep)]


def stream_activations(loaded: "LoadedModel", source: Source, layer: int, *, batch_size: int,
                       token_types: Iterable[str] | None = None, samples_per_forward: int = 8,
                       buffer_tokens: int = 65536, seed: int = 0, drop_last: bool = False,
                       device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                       ) -> Iterator[torch.Tensor]:
    """Capture `layer` over `source` on the fly and yield shuffled (batch_size, d) batches.

    For training without a cache on disk: one pass over the source, `samples_per_forward`
    samples per forward pass. Rows are mixed in a buffer of about `buffer_tokens`: when it
    fills, it is shuffled and half of it is released, so memory stays near
    `buffer_tokens` rows while consecutive batches still mix many samples.
    """
    codes = token_type_codes(token_types)
    keep = torch.tensor(codes, dtype=torch.int8)
    rng = np.random.default_rng(seed)

    def chunks() -> Iterator[torch.Tensor]:
        pool: list[torch.Tensor] = []
        n_pool, first_sample = 0, 0
        for batch in _batches(source, 0, None, samples_per_forward):
            rows = _capture_rows(loaded, batch, (layer,), first_sample, keep, torch.float32)
            first_sample += len(batch.items)
            pool.append(rows[f"activations.{layer}"])
            n_pool += pool[-1].shape[0]
            if n_pool >= buffer_tokens:
                mixed = torch.cat(pool)[torch.from_numpy(rng.permutation(n_pool))]  # (n_pool, d)
                half = n_pool // 2
                yield mixed[:half]
                pool, n_pool = [mixed[half:].clone()], n_pool - half  # clone: frees `mixed`
        if n_pool:
            yield torch.cat(pool)[torch.from_numpy(rng.permutation(n_pool))]

    for batch in _batches_from_chunks(chunks(), batch_size, drop_last):
        yield batch.to(device=device, dtype=dtype)
