"""Small pieces for the fault tests (issue 25): a tiny-llava activation cache, SAE folders
with a chosen compatibility record, damaged copies of files, and a snapshot of a folder to
assert that a refused command changed nothing.

Building the cache takes a few seconds (tiny-llava on 4 images); everything else is instant.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

TEXTS = ("the red circle left of a big blue square", "a green star near the box", "find the ball",
         "what is in the picture")


def write_data(folder: Path, n: int = 4, *, missing: bool = False) -> Path:
    """`n` JSONL image-text samples (images absent when `missing`); returns data.jsonl."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    lines = []
    for i in range(n):
        if not missing:
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": TEXTS[i % len(TEXTS)]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def build_cache(folder: Path, *, token_types: tuple[str, ...] = ("image", "prompt", "special"),
                layers: tuple[int, ...] = (2,)) -> Path:
    """A complete tiny-llava cache of `layers` (no response tokens: the data has none)."""
    from saekit.cache import CacheConfig, build_cache as build

    data = write_data(folder / "data")
    cfg = CacheConfig(model="tiny-llava", data=data, out=folder / "cache", layers=layers,
                      shard_tokens=100, batch_size=2, token_types=token_types, device="cpu")
    return build(cfg, progress=False)


def save_sae(directory: Path, compat: dict, *, d_in: int = 128, d_sae: int = 64, seed: int = 0,
             nan: bool = False) -> Path:
    """A random standard SAE folder whose saekit.json carries `compat` (its layer names too)."""
    from saekit.sae.io import save_sae as save
    from saekit.sae.model import SparseAutoencoder

    sae = SparseAutoencoder(d_in=d_in, d_sae=d_sae)
    sae.init_weights_(torch.Generator().manual_seed(seed))
    if nan:
        with torch.no_grad():
            sae.W_dec[0, 0] = float("nan")
    layer = compat.get("layer")
    info = {"model": {"name": compat.get("model")}, "d_in": d_in, "d_sae": d_sae,
            "architecture": "standard", "token_types": compat.get("token_types"), "compat": compat,
            "layer": {"hf_hidden_states_index": layer, "transformer_lens_hook": compat.get("hook")}}
    metadata = {"model_name": compat.get("model"), "hook_name": compat.get("hook")}
    return save(sae, directory, metadata=metadata, info=info)


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut `path` to `keep` of its bytes (a full disk or an interrupted copy)."""
    data = path.read_bytes()
    path.write_bytes(data[:max(1, int(len(data) * keep))])
    return path


def copy_tree(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha1)} of every file under `folder` ({} if it does not exist);
    folders appear with size -1, so a new empty folder counts as a change too."""
    if not folder.exists():
        return {}
    out = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_dir():
            out[name] = (-1, "")
        else:
            out[name] = (path.stat().st_size, hashlib.sha1(path.read_bytes()).hexdigest())
    return out
