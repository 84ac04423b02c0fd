"""The dashboard's two passes over the data.

Pass 1 (`AtomStats`) encodes every token and keeps, per atom: how often it fires on each
token type, a histogram of its log10 activations, its largest activation, and its top
samples (by the atom's largest activation in the sample). Pass 2 (`examples`) re-reads
only the samples that some atom lists and keeps, for each listed (atom, sample), the
atom's activation at every token of the sample.

Rows come from an activation cache (shard by shard) or from capturing a model over
image-text data (batch by batch); either way a row carries its sample index (the sample's
place in the source's order), position in the sample's own token sequence, token type and
image-grid cell.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saekit.inputs import TOKEN_TYPE_NAMES

HIST_EDGES = tuple(x / 5 for x in range(-15, 16))  # log10 activation, 1e-3 .. 1e3, 0.2 wide


class Rows(NamedTuple):
    """A chunk of tokens with their tags (see `saekit.cache` for the meaning of each)."""

    activations: Tensor
    """(n, d_in) float32."""
    token_types: Tensor
    """(n,) int8."""
    sample_ids: Tensor
    """(n,) int64."""
    positions: Tensor
    """(n,) int64."""
    image_grid: Tensor
    """(n, 2) int16, -1 off the image."""


def _rows(tensors: dict[str, Tensor], layer: int | None = None) -> Rows:
    acts = tensors["activations"] if layer is None else tensors[f"activations.{layer}"]
    return Rows(acts.float(), tensors["token_types"], tensors["sample_ids"], tensors["positions"],
                tensors["image_grid"])


def cache_rows(cache, layer: int, codes: tuple[int, ...], needed: Tensor | None = None,
               max_samples: int | None = None) -> Iterator[Rows]:
    """The cache's rows of token types `codes`, shard by shard; with `needed` (sorted sample
    ids) only shards holding one of them are read."""
    from saekit.sae.encode import _read_shard_rows

    keep = torch.tensor(codes, dtype=torch.int8)
    for shard in cache.shards:
        first, last = int(shard["first_sample"]), int(shard["last_sample"])
        if max_samples is not None and first >= max_samples:
            return
        if needed is not None and not _overlaps(needed, first, last):
            continue
        rows = _read_shard_rows(cache, shard, layer, keep)
        if max_samples is not None:
            rows = {k: v[rows["sample_ids"] < max_samples] for k, v in rows.items()}
        yield _rows(rows)


def _overlaps(needed: Tensor, first: int, last: int) -> bool:
    i = int(torch.searchsorted(needed, first))
    return i < needed.numel() and int(needed[i]) <= last


def capture_rows(loaded, source, layer: int, codes: tuple[int, ...], batch_size: int,
                 needed: Tensor | None = None) -> Iterator[tuple[Rows, dict[int, Any]]]:
    """Capture `layer` over `source` batch by batch: (rows, {sample id: ImageTextSample} of
    the `needed` samples in the batch). Batches without a needed sample are not run."""
    from saekit.cache import _batches, _capture_rows

    keep = torch.tensor(codes, dtype=torch.int8)
    first = 0
    for batch in _batches(source, 0, None, batch_size):
        ids = range(first, first + len(batch.items))
        wanted = ({i: item.sample for i, item in zip(ids, batch.items) if _overlaps(needed, i, i)}
                  if needed is not None else {})
        if needed is None or wanted:
            yield _rows(_capture_rows(loaded, batch, (layer,), first, keep, torch.float32), layer), wanted
        first += len(batch.items)


def encode_entries(sae, rows: Rows, chunk_tokens: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row, atom, value) of every non-zero latent of the chunk's tokens (CPU tensors)."""
    device = sae.W_enc.device
    parts = []
    with torch.no_grad():
        for start in range(0, rows.activations.shape[0], chunk_tokens):
            f = sae.encode(rows.activations[start:start + chunk_tokens].to(device))  # (c, d_sae)
            r, a = f.nonzero(as_tuple=True)
            parts.append((r.cpu() + start, a.cpu(), f[r, a].float().cpu()))
    if not parts:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty, torch.zeros(0)
    return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def _max_by_key(keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """(unique keys, the largest value of each)."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    best = torch.full((unique.numel(),), float("-inf")).scatter_reduce(0, inverse, values, "amax")
    return unique, best


class AtomStats:
    """Pass 1: per-atom counts, histograms and top samples."""

    def __init__(self, d_sae: int, top_n: int):
        self.d_sae, self.top_n = d_sae, top_n
        self.fires = torch.zeros(d_sae, len(TOKEN_TYPE_NAMES), dtype=torch.int64)
        """(d_sae, 4) firings by token type."""
        self.hist = torch.zeros(d_sae, len(HIST_EDGES) - 1, dtype=torch.int64)
        self.max = torch.zeros(d_sae)
        self.tokens_by_type = torch.zeros(len(TOKEN_TYPE_NAMES), dtype=torch.int64)
        self.samples: set[int] = set()
        self.top_keys = torch.zeros(0, dtype=torch.int64)
        """sample·d_sae + atom of the kept (atom, sample) pairs."""
        self.top_values = torch.zeros(0)

    def add(self, rows: Rows, entries: tuple[Tensor, Tensor, Tensor]) -> None:
        row, atom, value = entries
        types = rows.token_types.long()
        self.tokens_by_type += torch.bincount(types, minlength=len(TOKEN_TYPE_NAMES))
        self.samples.update(torch.unique(rows.sample_ids).tolist())
        n_types, n_bins = len(TOKEN_TYPE_NAMES), len(HIST_EDGES) - 1
        self.fires += torch.bincount(atom * n_types + types[row], minlength=self.d_sae * n_types
                                     ).view(self.d_sae, n_types)
        bins = ((value.log10() - HIST_EDGES[0]) / (HIST_EDGES[1] - HIST_EDGES[0])).floor().long()
        bins = bins.clamp(0, n_bins - 1)
        self.hist += torch.bincount(atom * n_bins + bins, minlength=self.d_sae * n_bins).view(self.d_sae, n_bins)
        self.max = torch.maximum(self.max, torch.zeros(self.d_sae).scatter_reduce(0, atom, value, "amax"))
        keys = rows.sample_ids[row] * self.d_sae + atom
        keys, values = _max_by_key(torch.cat([self.top_keys, keys]), torch.cat([self.top_values, value]))
        self.top_keys, self.top_values = _top_per_atom(keys, values, self.d_sae, self.top_n)

    @property
    def n_tokens(self) -> int:
        return int(self.tokens_by_type.sum())

    def top_examples(self) -> tuple[Tensor, Tensor, Tensor]:
        """(atom, sample, value) of the kept pairs, by atom, strongest first."""
        atom, sample = self.top_keys % self.d_sae, torch.div(self.top_keys, self.d_sae, rounding_mode="floor")
        order = _atom_then_value(atom, self.top_values)
        return atom[order], sample[order], self.top_values[order]


def _atom_then_value(atom: Tensor, value: Tensor) -> Tensor:
    """Order by atom ascending, then value descending (ties: key order)."""
    by_value = torch.argsort(-value, stable=True)
    return by_value[torch.argsort(atom[by_value], stable=True)]


def _top_per_atom(keys: Tensor, values: Tensor, d_sae: int, top_n: int) -> tuple[Tensor, Tensor]:
    atom = keys % d_sae
    order = _atom_then_value(atom, values)
    atom_sorted = atom[order]
    starts = torch.searchsorted(atom_sorted, atom_sorted, side="left")
    keep = torch.arange(order.numel()) - starts < top_n  # rank within the atom
    chosen = order[keep]
    return keys[chosen], values[chosen]


class Examples(NamedTuple):
    """Pass 2: each listed (atom, sample)'s activations, and each listed sample's rows."""

    atom: Tensor
    """(e,) int64 entries sorted by atom then sample."""
    sample: Tensor
    position: Tensor
    value: Tensor
    sample_rows: dict[int, tuple[Tensor, Tensor, Tensor]]
    """sample id -> (positions, token types, image grid) of its tokens."""


def examples(rows_iter: Iterator[Rows], sae, pairs: tuple[Tensor, Tensor], chunk_tokens: int) -> Examples:
    """Collect, for the (atom, sample) `pairs`, the atom's activation at every token of the
    sample, from rows covering at least those samples."""
    atoms, samples = pairs
    d_sae = sae.d_sae
    wanted = torch.unique(samples * d_sae + atoms)  # sorted keys
    needed = torch.unique(samples)
    parts, sample_rows = [], {}
    for rows in rows_iter:
        mine = torch.isin(rows.sample_ids, needed)
        if not mine.any():
            continue
        rows = Rows(*(t[mine] for t in rows))
        for sid in torch.unique(rows.sample_ids).tolist():
            at = rows.sample_ids == sid
            sample_rows[sid] = (rows.positions[at], rows.token_types[at], rows.image_grid[at])
        row, atom, value = encode_entries(sae, rows, chunk_tokens)
        sample = rows.sample_ids[row]
        keep = torch.isin(sample * d_sae + atom, wanted)
        parts.append((atom[keep], sample[keep], rows.positions[row][keep], value[keep]))
    if parts:
        atom, sample, position, value = (torch.cat(p) for p in zip(*parts))
    else:
        atom = sample = position = torch.zeros(0, dtype=torch.int64)
        value = torch.zeros(0)
    order = torch.argsort(atom * (int(sample.max()) + 1 if sample.numel() else 1) + sample, stable=True)
    return Examples(atom[order], sample[order], position[order], value[order], sample_rows)
