"""Crash-safe writes: a file or folder is either the old one or the new one, never torn.

Also the optimiser state as flat tensors, so checkpoints hold safetensors + JSON only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def atomic_file(path: str | Path, *, unique: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` for any writer to fill (safetensors' `save_file`,
    PIL, matplotlib, `open`); on success it is flushed to disk and renamed over `path`.

    The temporary name is `<path>.tmp`, or with `unique` one of its own (`<path>.XXXX.tmp`,
    for a file other processes may be writing too). An error removes it; `path` stays as it was.
    """
    path = Path(path)
    if unique:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, flush it to disk, then rename over `path`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, record: Any) -> None:
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield an empty `<path>.tmp` to fill; on success it replaces `path` (via `<path>.old`).

    A crash inside the block leaves `path` untouched; a crash between the two renames
    leaves `<path>.old`, which `resolve_directory` finds.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def resolve_directory(path: str | Path, marker: str) -> Path | None:
    """`path` if it holds `marker`, else a complete `<path>.old` left by an interrupted swap."""
    path = Path(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / marker).is_file():
            return candidate
    return None


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Optimizer state as flat `<param index>.<slot>` tensors + JSON-able param groups."""
    state_dict = optimizer.state_dict()
    tensors = {}
    for index, slots in state_dict["state"].items():
        for name, value in slots.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
    return tensors, state_dict["param_groups"]


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                         param_groups: list, device: torch.device | str) -> None:
    """Inverse of `optimizer_state_tensors`."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        # AdamW keeps `step` on the CPU (a scalar tensor); moments live with the parameters.
        state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    # JSON turns tuples into lists; give the optimizer back exactly what it saved
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
