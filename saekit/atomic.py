"""Crash-safe writes: a file or folder is either the old one or the new one, never torn.

Files end with the permissions a plain `open` gives (0666 less the umask): safetensors and
`tempfile.mkstemp` create 0600 files, which another user could not read. An output folder
written as a unit (`atomic_directory`) is refused when it holds another run's files unless
the caller allows replacing it (`check_output_folder`).

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

from saekit.errors import UserError


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: str | Path) -> None:
    """Give `path` (a file, or every file and folder under a folder) the permissions `open`
    and `mkdir` would have: 0666 / 0777 less the umask."""
    path = Path(path)
    mask = _umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


@contextmanager
def atomic_file(path: str | Path, *, unique: bool = False, parents: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` for any writer to fill (safetensors' `save_file`,
    PIL, matplotlib, `open`); on success it is flushed to disk and renamed over `path`.

    The temporary name is `<path>.tmp`, or with `unique` one of its own (`<path>.XXXX.tmp`,
    for a file other processes may be writing too). An error removes it; `path` stays as it was.
    `parents`: create missing parent folders first, and remove them again on an error.
    """
    path = Path(path)
    if parents:
        created = [p for p in reversed(path.parents) if not p.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with atomic_file(path, unique=unique) as tmp:
                yield tmp
        except BaseException:
            for folder in reversed(created):
                try:
                    folder.rmdir()  # only if still empty
                except OSError:
                    break
            raise
        return
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
        normal_permissions(tmp)
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

    An error inside the block removes `<path>.tmp` and leaves `path` untouched, as a crash
    does (its `<path>.tmp` is cleared by the next call); a crash between the two renames
    leaves `<path>.old`, which `resolve_directory` finds.
    """
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    normal_permissions(tmp)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def check_output_folder(path: str | Path, *, overwrite: bool, flag: str = "--out",
                        overwrite_flag: str = "--overwrite") -> None:
    """UserError unless `path` may become an output folder written as a unit: it must not be a
    file, and a folder that already holds files (another run's) is replaced only when
    `overwrite`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder")
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise UserError(f"{flag} {path} already holds files ({shown}); pass {overwrite_flag} to "
                        f"replace the folder, or choose another {flag}")


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
