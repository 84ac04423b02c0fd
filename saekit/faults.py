"""What the command lines' error boundary (`saekit.cli.dispatch`) tells a user about a fault.

An expected fault, one that a user can fix, becomes one line naming the file and what to do:
a `UserError`; a full disk, a permission, a path that is a file where a folder is expected
(or the reverse); a corrupt file that a reader let through (safetensors, JSON, an image
PIL cannot or will not decode, a decompression bomb); a CUDA device this torch cannot use.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import os
import re

_OS_FAULTS = {
    errno.ENOSPC: "no space left on the device; free some space (or choose another --out) and run again",
    errno.EDQUOT: "disk quota exceeded; free some space (or choose another --out) and run again",
    errno.EACCES: "permission denied; check the file's owner and permissions, or choose another path",
    errno.EPERM: "operation not permitted; check the file's owner and permissions, or choose another path",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOTDIR: "a part of this path is a file, not a folder; check the path",
    errno.EISDIR: "this is a folder, where a file is expected; check the path",
    errno.EEXIST: "this already exists as another kind of file; check the path",
    errno.ENOENT: "no such file or folder; check the path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
}


def _os_message(err: OSError) -> str | None:
    advice = _OS_FAULTS.get(err.errno)
    if advice is None:
        return None
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    where = " -> ".join(names) if names else "a file or folder this command writes or reads"
    return f"{where}: {advice}"


_PATH_NAMES = ("path", "file", "filename", "directory", "folder", "checkpoint", "root", "out")


def _reading_site(err: BaseException) -> str:
    """The file a failed reader was reading: a variable called path, directory, ... in the
    innermost frame that has one (the json module's own excluded), else the innermost
    project frame's module and line."""
    import traceback
    from pathlib import Path

    frames = [(frame, lineno) for frame, lineno in traceback.walk_tb(err.__traceback__)
              if not frame.f_globals.get("__name__", "").startswith("json")]
    for frame, _ in reversed(frames):
        for name in _PATH_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, Path)) and str(value):
                return str(value)
    for frame, lineno in reversed(frames):
        if frame.f_globals.get("__name__", "").split(".")[0] in ("saekit", "segcompass", "analyses"):
            return f"a file read at {frame.f_globals['__name__']} line {lineno}"
    return "a JSON file this command reads"


def fault_message(err: BaseException) -> str | None:
    """One line for an expected fault, or None for a bug (the caller re-raises it)."""
    from saekit.errors import UserError

    if isinstance(err, UserError):
        return str(err)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - PIL is a saekit dependency
        Image = None
    if Image is not None and isinstance(err, Image.DecompressionBombError):
        return f"an image is too large to decode safely ({err}); downscale it first"
    if isinstance(err, OSError) and not type(err).__module__.startswith("PIL"):
        return _os_message(err)
    if type(err).__name__ == "SafetensorError":  # safetensors' Rust errors carry no errno
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unknown error"
        match = re.search(r"os error (\d+)", first)
        if match and int(match.group(1)) in _OS_FAULTS:
            return f"{first}: {_OS_FAULTS[int(match.group(1))]}"
        return f"safetensors: {first}; a weights file is damaged or could not be written"
    if isinstance(err, json.JSONDecodeError):  # a reader that did not name its file: find it
        where = _reading_site(err)
        return (f"{where}: not valid JSON: {err.msg} (line {err.lineno}, column {err.colno}); the file is "
                "damaged or not the kind this command reads")
    if isinstance(err, (AssertionError, RuntimeError)) and "CUDA" in str(err) \
            and ("not compiled" in str(err) or "no NVIDIA driver" in str(err)
                 or "no CUDA GPUs" in str(err)):
        return f"this torch cannot use CUDA ({str(err).strip().splitlines()[0]}); use --device cpu"
    return None


def disk_full(path: str | os.PathLike) -> OSError:
    """The OSError a full disk raises while writing `path` (for tests that simulate it)."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
