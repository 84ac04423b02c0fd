"""Files checked before they are trusted: JSON records of the right shape, whole safetensors
files, the sizes a folder's record promised, and a fingerprint of a data source.

Every check raises a one-line `UserError` that names the file and says what to do (`fix`),
so a truncated shard, a hand-edited cfg.json or a half-copied checkpoint never reaches the
code that would crash on it, and never counts as complete.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Mapping

from saekit.errors import UserError

_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header
_JSON_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               float: "a number", bool: "true or false", type(None): "null"}


def json_error(err: json.JSONDecodeError) -> str:
    """'<what is wrong> (line L, column C)': json's own `msg` may end in 'at', so the position
    goes in brackets instead of after it."""
    return f"{err.msg} (line {err.lineno}, column {err.colno})"


def read_json_object(path: str | Path, *, fields: Mapping[str, type | tuple[type, ...]] = {},
                     fix: str = "") -> dict[str, Any]:
    """The JSON object in `path`, each of `fields` present with a value of its type(s), or a
    one-line UserError naming the file (`fix` says what to do about it)."""
    path, advice = _existing_file(path, fix)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON: {json_error(err)}{advice}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text{advice}") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}: expected a JSON object, got {_JSON_NAMES.get(type(record), 'another value')}"
                        f"{advice}")
    for name, types in fields.items():
        value = record.get(name)
        wanted = types if isinstance(types, tuple) else (types,)
        if name not in record or (isinstance(value, bool) and bool not in wanted) \
                or not isinstance(value, wanted):
            got = "missing" if name not in record else \
                f"{_JSON_NAMES.get(type(value), type(value).__name__)} {json.dumps(value)[:40]}"
            names = " or ".join(_JSON_NAMES.get(t, t.__name__) for t in wanted)
            raise UserError(f"{path}: field '{name}' must be {names}, got {got}{advice}")
    return record


def safetensors_size(path: Path) -> int:
    """The length a safetensors file must have, from its header (UserError if unreadable)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _HEADER_LIMIT:
            raise ValueError(f"header length {header_len} is not plausible")
        raw = handle.read(header_len)
    if len(raw) < header_len:
        raise ValueError("the header is cut short")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


def check_safetensors(path: str | Path, *, fix: str = "") -> Path:
    """UserError unless `path` is a whole safetensors file: its header parses and the file is
    exactly as long as the header says (a truncated or padded file is refused before reading)."""
    path, advice = _existing_file(path, fix)
    try:
        expected = safetensors_size(path)
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err}){advice}") from None
    actual = path.stat().st_size
    if actual != expected:
        raise UserError(f"{path}: damaged safetensors file ({actual} bytes, its header says "
                        f"{expected}; truncated by a full disk or an interrupted copy?){advice}")
    return path


def load_safetensors(path: str | Path, *, fix: str = "") -> dict[str, Any]:
    """Every tensor of a checked safetensors file (CPU), or a UserError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = check_safetensors(path, fix=fix)
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})"
                        f"{'; ' + fix if fix else ''}") from None


def file_sizes(directory: str | Path, names: list[str] | None = None) -> dict[str, int]:
    """{relative path: size in bytes} of `names` in `directory` (default: every file under it,
    sorted), recorded with a folder so a later reader can tell it is whole."""
    directory = Path(directory)
    if names is None:
        names = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return {name: (directory / name).stat().st_size for name in names}


def check_file_sizes(directory: str | Path, sizes: Mapping[str, int], *, fix: str = "") -> None:
    """UserError naming the first file of `sizes` that is missing or of another size."""
    directory = Path(directory)
    advice = f"; {fix}" if fix else ""
    for name, size in sizes.items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path} is missing (the folder's record lists it){advice}")
        actual = path.stat().st_size
        if actual != int(size):
            raise UserError(f"{path}: damaged ({actual} bytes, the folder's record says {size}; "
                            f"truncated by a full disk or an interrupted copy?){advice}")


def data_fingerprint(path: str | Path) -> str:
    """sha256 of a data source, so a resumed job notices that its data changed: a file's
    bytes; a folder's file names and sizes plus the bytes of its small files (a datasets
    `save_to_disk` folder's state.json holds the dataset's own fingerprint)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.relative_to(path).as_posix() if file != path else ''}\0{size}\0".encode())
        if file == path or size <= 1 << 20:
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _existing_file(path: str | Path, fix: str) -> tuple[Path, str]:
    """`path` as a Path and the "; fix" suffix, or a UserError if it is not a file."""
    path = Path(path)
    advice = f"; {fix}" if fix else ""
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"{path} {what}{advice}")
    return path, advice
