"""A pickle reader that admits plain data only, for RefCOCO's `refs(<split_by>).p`.

The refer API (lichengunc/refer) and LISA read `refs(unc).p` with a bare `pickle.load`,
which runs whatever callable the file names. These files are plain data (a list of
dicts of ints, strings and lists), so here the unpickler refuses every global except the
three that protocols 0-2 use to spell admitted types: `set` (+ REDUCE of a list),
`bytes` (+ REDUCE of nothing, for b"") and `_codecs.encode` (+ REDUCE of (str, "latin1"),
for other bytes), each replaced by a guard that accepts only those arguments. A pickle
that would construct any other object, call `os.system`, import a module, or use a
persistent id is refused with a UserError naming the file, before anything is called.
The result is then walked once more to check it holds only the admitted types.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from saekit.errors import UserError

ALLOWED_TYPES = (dict, list, tuple, set, str, bytes, int, float, bool, type(None))
"""Everything a plain-data pickle may contain (bool is an int; kept for clarity)."""

class _Refused(Exception):
    """Raised inside the unpickler; turned into a UserError naming the file."""


def _set(items: Any = ()) -> set:
    if not isinstance(items, (list, tuple)):
        raise _Refused(f"set() of a {type(items).__name__}")
    return set(items)


def _empty_bytes(*args: Any) -> bytes:
    if args:
        raise _Refused("bytes() with arguments")
    return b""


def _latin1_bytes(text: Any, encoding: Any = "latin1", *rest: Any) -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or rest:
        raise _Refused("_codecs.encode() other than of a str to latin1")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("builtins", "set"): _set, ("__builtin__", "set"): _set,
    ("builtins", "bytes"): _empty_bytes, ("__builtin__", "bytes"): _empty_bytes,
    ("_codecs", "encode"): _latin1_bytes,
}
"""The only globals a plain-data pickle of protocol 0-2 names, each mapped to a guard."""


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # GLOBAL, STACK_GLOBAL, EXT*
        guard = _ALLOWED_GLOBALS.get((module, name))
        if guard is None:
            raise _Refused(f"it names the global {module}.{name}")
        return guard

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it uses a persistent id")


def _check_plain(obj: Any, depth: int = 0) -> None:
    if depth > 200:
        raise _Refused("it nests deeper than 200 levels")
    if not isinstance(obj, ALLOWED_TYPES):
        raise _Refused(f"it holds a {type(obj).__name__}")
    if isinstance(obj, dict):
        for key, value in obj.items():
            _check_plain(key, depth + 1)
            _check_plain(value, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            _check_plain(item, depth + 1)


def loads_plain(data: bytes, source: str = "<bytes>") -> Any:
    """Unpickle `data` if it holds only dict/list/tuple/set/str/bytes/int/float/bool/None.

    Python 2 `str` objects are decoded as UTF-8 (the refer pickles were written by
    Python 2). Raises UserError naming `source` otherwise.
    """
    try:
        obj = _PlainDataUnpickler(io.BytesIO(data), encoding="utf-8").load()
        _check_plain(obj)
    except _Refused as err:
        raise UserError(f"{source}: refused to unpickle: {err}; only plain containers and "
                        "scalars are read from refs pickles") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError) as err:
        raise UserError(f"{source}: not a readable pickle ({type(err).__name__}: {err})") from None
    return obj


def load_plain(path: str | Path) -> Any:
    """`loads_plain` of the file at `path` (UserError if it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return loads_plain(path.read_bytes(), str(path))
