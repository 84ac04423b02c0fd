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

The work is bounded too, so a small hostile file cannot hang the reader or whoever walks
the result: a pickle may share one object many times (memo GET), which makes a tree
exponentially larger than the file. The check visits each object once (memoised by id),
refuses a structure that refers to itself, nests deeper than `MAX_DEPTH`, or would span
more than `MAX_NODES` containers once its shared references are expanded; and tuples,
which Python hashes by walking them whole when they are a dict key or set item, are
refused as they are built once they would span more than `MAX_TUPLE_WEIGHT` elements
(the pure-Python unpickler is used so that tuple construction can be watched; it is a
few times slower than the C one).
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

from saekit.errors import UserError

ALLOWED_TYPES = (dict, list, tuple, set, str, bytes, int, float, bool, type(None))
"""Everything a plain-data pickle may contain (bool is an int; kept for clarity)."""
MAX_DEPTH = 200
"""Deepest nesting read (a refs file nests 4 levels)."""
MAX_NODES = 50_000_000
"""Most containers read, shared references expanded (RefCOCO's refs(unc).p holds ~10^6)."""
MAX_TUPLE_WEIGHT = 1_000_000
"""Most elements a tuple may span, nested tuples expanded (hashing it visits them all)."""

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


def _watch_tuples(opcode: bytes) -> Any:
    """A dispatch entry that builds a tuple as pickle's own does, then weighs it."""
    build = pickle._Unpickler.dispatch[opcode[0]]

    def load(self: "_PlainDataUnpickler") -> None:
        build(self)
        self._weigh(self.stack[-1])
    return load


class _PlainDataUnpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)
    for _opcode in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3):
        dispatch[_opcode[0]] = _watch_tuples(_opcode)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._weights: dict[int, int] = {}
        self._tuples: list[tuple] = []  # keeps them alive, so their ids stay theirs

    def _weigh(self, built: tuple) -> None:
        weight = 1 + sum(self._weights.get(id(item), 1) for item in built)
        if weight > MAX_TUPLE_WEIGHT:
            raise _Refused(f"a tuple spans more than {MAX_TUPLE_WEIGHT} elements "
                           "(shared references nested in tuples)")
        self._weights[id(built)] = weight
        self._tuples.append(built)

    def find_class(self, module: str, name: str) -> Any:  # GLOBAL, STACK_GLOBAL, EXT*
        guard = _ALLOWED_GLOBALS.get((module, name))
        if guard is None:
            raise _Refused(f"it names the global {module}.{name}")
        return guard

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it uses a persistent id")


_CONTAINERS = (dict, list, tuple, set)


def _children(obj: Any) -> Any:
    return (item for pair in obj.items() for item in pair) if isinstance(obj, dict) else obj


def _check_plain(root: Any) -> None:
    """Every object reachable from `root` is of an admitted type, and the structure is a finite
    tree of at most MAX_NODES containers once shared references are expanded, at most
    MAX_DEPTH deep. Depth-first, each container visited once (its expanded size memoised by
    id): time linear in the file, however often it shares an object."""
    sizes: dict[int, int] = {}  # id -> containers in its expanded subtree (finished ones)
    started: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(root, 0, False)]
    while stack:
        obj, depth, finished = stack.pop()
        if finished:  # every child is done: sum their sizes
            size = 1 + sum(sizes.get(id(child), 0) for child in _children(obj))
            if size > MAX_NODES:
                raise _Refused(f"it spans more than {MAX_NODES} containers once its shared "
                               "references are expanded")
            sizes[id(obj)] = size
            continue
        if not isinstance(obj, ALLOWED_TYPES):
            raise _Refused(f"it holds a {type(obj).__name__}")
        if not isinstance(obj, _CONTAINERS) or id(obj) in sizes:
            continue
        if id(obj) in started:  # started, not finished: an ancestor of itself
            raise _Refused("it refers to itself")
        if depth >= MAX_DEPTH:
            raise _Refused(f"it nests deeper than {MAX_DEPTH} levels")
        started.add(id(obj))
        stack.append((obj, depth, True))
        stack.extend((child, depth + 1, False) for child in _children(obj))


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
            IndexError, KeyError, UnicodeDecodeError, OverflowError, MemoryError,
            RecursionError, struct.error) as err:
        raise UserError(f"{source}: not a readable pickle ({type(err).__name__}: {err})") from None
    return obj


def load_plain(path: str | Path) -> Any:
    """`loads_plain` of the file at `path` (UserError if it is missing)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    return loads_plain(path.read_bytes(), str(path))
