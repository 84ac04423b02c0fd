"""Build the dashboard folder: read the data twice (`saekit.dashboard.collect`), then write
the index pages and the atom pages (`saekit.dashboard.render`)."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from saekit.atomic import atomic_write_bytes
from saekit.dashboard import ATOM_DIR, DASHBOARD_FILE, DASHBOARD_FORMAT, atom_href
from saekit.dashboard.collect import (HIST_EDGES, AtomStats, Examples, cache_rows, capture_rows,
                                      encode_entries, examples)
from saekit.dashboard.config import DashboardConfig
from saekit.dashboard.render import (AtomView, ExampleView, atom_section, nav, overlay_png, page,
                                     thumbnail, tokens_html)
from saekit.errors import UserError
from saekit.inputs import TokenType, token_type_codes


class DashboardSummary(NamedTuple):
    out: Path
    n_atoms: int
    n_live: int
    n_tokens: int
    n_samples: int
    n_pages: int


class _Sample(NamedTuple):
    """What the pages show of one sample."""

    tokens: list[str]
    types: list[int]
    thumb: Any
    grid: tuple[int, int]
    cells: dict[int, tuple[int, int]]
    """position -> image-grid (row, col)."""


def _layer(cfg: DashboardConfig, info: dict[str, Any], available: tuple[int, ...] | None) -> int:
    layer = cfg.layer or info.get("layer", {}).get("hf_hidden_states_index")
    if available is not None:
        if layer is None and len(available) == 1:
            return available[0]
        if layer not in available:
            raise UserError(f"{cfg.data} holds layers {list(available)}, not {layer}; choose one with --layer")
    if layer is None:
        raise UserError(f"SAE {cfg.sae} does not name its layer: give --layer")
    return int(layer)


def _token_text(token: str) -> str:
    return token.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\\n")


def _prepare_sample(loaded, sample) -> _Sample:
    from saekit.inputs import build_batch

    batch = build_batch(loaded, [sample.image], [sample.text], [sample.response])  # one sample: no padding
    ids = batch.model_inputs["input_ids"][0].tolist()
    grid = batch.image_grid[0]  # (T, 2)
    cells = {p: (int(r), int(c)) for p, (r, c) in enumerate(grid.tolist()) if r >= 0}
    shape = (int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 1) if cells else (1, 1)
    tokens = [_token_text(t) for t in loaded.tokenizer.convert_ids_to_tokens(ids)]
    return _Sample(tokens, batch.token_types[0].tolist(), thumbnail(sample.image, loaded.preset.family),
                   shape, cells)


def _source_samples(source, needed: set[int]) -> dict[int, Any]:
    """The samples of `source` whose index (in source order) is in `needed`."""
    found: dict[int, Any] = {}
    for index, sample in enumerate(source):
        if index in needed:
            found[index] = sample
            if len(found) == len(needed):
                break
    return found


def _collect(cfg: DashboardConfig, sae, loaded, info, progress: bool):
    """(AtomStats, Examples, {sample id: sample}, layer, description of the data)."""
    from tqdm import tqdm

    from saekit.cache import ActivationCache
    from saekit.sources import open_source

    codes = token_type_codes(tuple(cfg.token_types or info.get("token_types") or ("image", "prompt", "response")))
    stats = AtomStats(sae.d_sae, cfg.top_examples)
    if (Path(cfg.data) / "manifest.json").is_file():
        cache = ActivationCache(cfg.data)
        layer = _layer(cfg, info, cache.layers)
        for rows in tqdm(cache_rows(cache, layer, codes, max_samples=cfg.max_samples), desc="dashboard",
                         unit="shard", disable=not progress, total=len(cache.shards)):
            stats.add(rows, encode_entries(sae, rows, cfg.chunk_tokens))
        atoms, samples, _ = stats.top_examples()
        needed = torch.unique(samples)
        ex = examples(cache_rows(cache, layer, codes, needed, cfg.max_samples), sae, (atoms, samples),
                      cfg.chunk_tokens)
        manifest = cache.manifest
        recorded = manifest.get("source") or {}
        path = cfg.source or recorded.get("path")
        if path is None:
            raise UserError(f"{cfg.data} does not record its image-text data: give --source")
        settings = manifest.get("config", {})
        source = open_source(path, image_column=settings.get("image_column", "image"),
                             text_column=settings.get("text_column", "text"),
                             max_samples=settings.get("max_samples"))
        found = _source_samples(source, set(needed.tolist()))
        return stats, ex, found, layer, {"cache": str(cfg.data), "source": str(path)}
    layer = _layer(cfg, info, None)
    source = open_source(cfg.data, max_samples=cfg.max_samples)
    for rows, _ in tqdm(capture_rows(loaded, source, layer, codes, cfg.batch_size), desc="dashboard",
                        unit="batch", disable=not progress):
        stats.add(rows, encode_entries(sae, rows, cfg.chunk_tokens))
    atoms, samples, _ = stats.top_examples()
    found: dict[int, Any] = {}

    def rows_of_needed():
        for rows, wanted in capture_rows(loaded, open_source(cfg.data, max_samples=cfg.max_samples),
                                         layer, codes, cfg.batch_size, torch.unique(samples)):
            found.update(wanted)
            yield rows
    ex = examples(rows_of_needed(), sae, (atoms, samples), cfg.chunk_tokens)
    return stats, ex, found, layer, {"source": str(cfg.data)}


def _promoted(sae, loaded, start: int, stop: int, n: int) -> list[list[tuple[str, float]]]:
    """Per atom in [start, stop): the n tokens with the largest W_dec,i · W_U[token]."""
    unembed = loaded.model.get_output_embeddings().weight  # (V, d_model)
    with torch.no_grad():
        logits = sae.W_dec[start:stop].to(unembed.device, torch.float32) @ unembed.float().T  # (A, V)
        top = logits.topk(min(n, logits.shape[1]), dim=-1)
    names = loaded.tokenizer.convert_ids_to_tokens(top.indices.reshape(-1).tolist())
    values = top.values.reshape(-1).tolist()
    k = top.indices.shape[1]
    return [[(_token_text(names[i * k + j]), values[i * k + j]) for j in range(k)] for i in range(stop - start)]


def _atom_views(start: int, stop: int, stats: AtomStats, top: tuple[torch.Tensor, ...], ex: Examples,
                samples: dict[int, _Sample], promoted: list[list[tuple[str, float]]]) -> list[AtomView]:
    """What the atom page shows of atoms [start, stop); `top` = stats.top_examples()."""
    top_atom, top_sample, top_value = top
    views = []
    for atom in range(start, stop):
        lo, hi = (int(torch.searchsorted(top_atom, atom, side=s)) for s in ("left", "right"))
        e_lo, e_hi = (int(torch.searchsorted(ex.atom, atom, side=s)) for s in ("left", "right"))
        peak = float(stats.max[atom])
        shown = []
        for sid, value in zip(top_sample[lo:hi].tolist(), top_value[lo:hi].tolist()):
            sample = samples.get(sid)
            if sample is None:
                continue
            at = ex.sample[e_lo:e_hi] == sid
            acts = dict(zip(ex.position[e_lo:e_hi][at].tolist(), ex.value[e_lo:e_hi][at].tolist()))
            on_image = [(sample.cells[p], a) for p, a in acts.items() if p in sample.cells]
            png = None
            if sample.cells:
                cells = np.array([c for c, _ in on_image], dtype=np.int64).reshape(-1, 2)
                png = overlay_png(sample.thumb, cells, np.array([a for _, a in on_image]), sample.grid, peak)
            shown.append(ExampleView(sid, value, png, tokens_html(sample.tokens, sample.types, acts, peak)))
        views.append(AtomView(atom, stats.fires[atom].numpy(), stats.n_tokens, peak,
                              stats.hist[atom].numpy(), promoted[atom - start], shown))
    return views


def _index_row(atom: int, stats: AtomStats, per_page: int, promoted: list[tuple[str, float]]) -> str:
    fires = stats.fires[atom]
    total = int(fires.sum())
    image = f"{int(fires[TokenType.IMAGE]) / total:.0%}" if total else "-"
    words = ", ".join(html.escape(t) for t, _ in promoted[:3])
    return (f'<tr><td><a href="{atom_href(atom, per_page)}">{atom}</a></td><td>{total}</td>'
            f"<td>{total / max(stats.n_tokens, 1):.3g}</td><td>{float(stats.max[atom]):.3g}</td>"
            f"<td>{image}</td><td>{words}</td></tr>")


def build_dashboard(cfg: DashboardConfig, *, progress: bool = True) -> DashboardSummary:
    """Write the dashboard of `cfg.sae` over `cfg.data` into `cfg.out`."""
    from tqdm import tqdm

    from saekit.models import load_model, resolve_device
    from saekit.sae.io import load_sae

    device = resolve_device(cfg.device)
    loaded_sae = load_sae(cfg.sae, device=device)
    sae, info = loaded_sae.sae, loaded_sae.info
    model_name = cfg.model or info.get("model", {}).get("name")
    if (Path(cfg.data) / "manifest.json").is_file() and cfg.model is None:
        model_name = json.loads((Path(cfg.data) / "manifest.json").read_text())["model"]["name"]
    if model_name is None:
        raise UserError(f"SAE {cfg.sae} does not name its model: give --model")
    loaded = load_model(model_name, cfg.model_path, device=device)
    if loaded.preset.d_model != sae.d_in:
        raise UserError(f"SAE {cfg.sae} has d_in {sae.d_in} but {model_name} has width {loaded.preset.d_model}")
    stats, ex, found, layer, data = _collect(cfg, sae, loaded, info, progress)
    samples = {sid: _prepare_sample(loaded, sample) for sid, sample in found.items()}
    top = stats.top_examples()
    out, per_page, per_index = Path(cfg.out), cfg.atoms_per_page, cfg.atoms_per_index
    (out / ATOM_DIR).mkdir(parents=True, exist_ok=True)
    d_sae = sae.d_sae
    n_pages, n_index = -(-d_sae // per_page), -(-d_sae // per_index)
    index_links = []
    for i in tqdm(range(n_index), desc="dashboard pages", disable=not progress):
        start, stop = i * per_index, min((i + 1) * per_index, d_sae)
        promoted = _promoted(sae, loaded, start, stop, cfg.promoted_tokens)
        for block in range(start // per_page, -(-stop // per_page)):
            a0, a1 = block * per_page, min((block + 1) * per_page, d_sae)
            views = _atom_views(a0, a1, stats, top, ex, samples, promoted[a0 - start:a1 - start])
            links = nav([(f"index {i}", f"../index_{i:05d}.html"), ("home", "../index.html"),
                         ("previous", f"block_{block - 1:05d}.html" if block > 0 else None),
                         ("next", f"block_{block + 1:05d}.html" if block + 1 < n_pages else None)])
            body = links + "".join(atom_section(v, HIST_EDGES) for v in views) + links
            atomic_write_bytes(out / ATOM_DIR / f"block_{block:05d}.html",
                               page(f"atoms {a0}-{a1 - 1}", body).encode())
        rows = "".join(_index_row(a, stats, per_page, promoted[a - start]) for a in range(start, stop))
        body = (nav([("home", "index.html"), ("previous", f"index_{i - 1:05d}.html" if i > 0 else None),
                     ("next", f"index_{i + 1:05d}.html" if i + 1 < n_index else None)])
                + f"<h1>atoms {start}-{stop - 1}</h1><table><tr><th>atom</th><th>fires</th><th>density</th>"
                  "<th>max</th><th>on image</th><th>promotes</th></tr>" + rows + "</table>")
        atomic_write_bytes(out / f"index_{i:05d}.html", page(f"atoms {start}-{stop - 1}", body).encode())
        index_links.append(f'<li><a href="index_{i:05d}.html">atoms {start}-{stop - 1}</a></li>')
    n_live = int((stats.fires.sum(dim=1) > 0).sum())
    record = {"format": DASHBOARD_FORMAT, "version": 1, "sae": str(cfg.sae), "model": model_name,
              "layer": layer, "d_sae": d_sae, "atoms_per_page": per_page, "atoms_per_index": per_index,
              "n_tokens": stats.n_tokens, "n_samples": len(stats.samples), "live_atoms": n_live, **data}
    atomic_write_bytes(out / "index.html", page("SAE dashboard", _home(record, stats, index_links, per_page)).encode())
    atomic_write_bytes(out / DASHBOARD_FILE, (json.dumps(record, indent=2) + "\n").encode())
    return DashboardSummary(out, d_sae, n_live, stats.n_tokens, len(stats.samples), n_pages)


def _home(record: dict[str, Any], stats: AtomStats, index_links: list[str], per_page: int) -> str:
    fires = stats.fires.sum(dim=1)
    frequent = torch.argsort(fires, descending=True, stable=True)[:20].tolist()
    image_share = stats.fires[:, TokenType.IMAGE].float() / fires.clamp_min(1)
    visual = [a for a in torch.argsort(image_share * (fires >= 5), descending=True, stable=True)[:20].tolist()
              if fires[a] >= 5]
    link = lambda a: f'<a href="{atom_href(a, per_page)}">{a}</a>'  # noqa: E731
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in record.items() if k not in ("format", "version"))
    return (f"<h1>SAE dashboard</h1><table>{facts}</table>"
            f"<h2>most frequent atoms</h2><p>{', '.join(link(a) for a in frequent if fires[a] > 0)}</p>"
            f"<h2>atoms firing mostly on image tokens</h2><p>{', '.join(link(a) for a in visual) or '-'}</p>"
            f"<h2>all atoms</h2><ul>{''.join(index_links)}</ul>")
