"""Hostile and malformed refs files (issue 25): shared references cannot make the reader walk
an exponential tree (item 2), and odd fields are one-line errors (items 3, 6)."""

from __future__ import annotations

import pickle
import time

import pytest

from loaders_fixtures import build_refcoco
from saekit.errors import UserError
from segcompass.data.refcoco import load_refcoco
from segcompass.data.safe_pickle import loads_plain


def _shared_list_pickle(levels: int) -> bytes:
    """[a, a] nested `levels` times, each level one memo GET of the last: 2**levels leaves."""
    nested: list = []
    for _ in range(levels):
        nested = [nested, nested]
    return pickle.dumps(nested, protocol=2)


def _shared_tuple_key_pickle(levels: int) -> bytes:
    """{t: 1} with t = (t', t') nested `levels` times: hashing the key walks 2**levels tuples.
    Written by hand, since building it in Python would hash it."""
    ops = b"\x80\x02)q\x00"  # PROTO 2, EMPTY_TUPLE, BINPUT 0
    for i in range(levels):
        ops += b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1])  # GET, GET, TUPLE2, PUT
    return ops + b"}h" + bytes([levels]) + b"K\x01s."  # EMPTY_DICT, key, BININT1 1, SETITEM, STOP


def test_shared_references_are_refused_in_under_a_second(fixtures_dir, tmp_path):
    """The trial: a 457-byte refs pickle of shared references hung the RefCOCO loader."""
    root = build_refcoco(fixtures_dir, tmp_path)
    data = _shared_list_pickle(60)
    assert len(data) < 500
    (root / "refcoco" / "refs(unc).p").write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"refs\(unc\)\.p: refused to unpickle: it spans more than"):
        load_refcoco(root, "refcoco", "unc", "val")
    assert time.perf_counter() - start < 1.0


def test_shared_tuples_are_refused_before_python_hashes_them():
    start = time.perf_counter()
    with pytest.raises(UserError, match="a tuple spans more than"):
        loads_plain(_shared_tuple_key_pickle(60), "refs(unc).p")
    assert time.perf_counter() - start < 1.0


def test_self_reference_and_depth_are_refused():
    looped: list = []
    looped.append(looped)
    with pytest.raises(UserError, match="refers to itself"):
        loads_plain(pickle.dumps(looped, protocol=2), "x.p")
    deep: list = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(UserError, match="deeper than 200"):
        loads_plain(pickle.dumps(deep, protocol=2), "x.p")
    shared = ["the man", "on the left"]
    assert loads_plain(pickle.dumps([shared, shared, {"a": shared}], protocol=2)) == [shared, shared, {"a": shared}]


def _rewrite(root, edit):
    path = root / "refcoco" / "refs(unc).p"
    refs = pickle.loads(path.read_bytes())
    edit(refs)
    path.write_bytes(pickle.dumps(refs, protocol=2))


@pytest.mark.parametrize("value", ["seven", 3.5, None, True, {"id": 1}])
def test_a_non_integer_ann_id_is_a_one_line_error(fixtures_dir, tmp_path, value):
    root = build_refcoco(fixtures_dir, tmp_path)
    _rewrite(root, lambda refs: refs[1].update(ann_id=value))
    with pytest.raises(UserError, match=r"refs\(unc\)\.p: ref_id \d+: field 'ann_id' = .* is not an integer id"):
        load_refcoco(root, "refcoco", "unc", "val")


def test_an_empty_refs_file_says_so(fixtures_dir, tmp_path):
    root = build_refcoco(fixtures_dir, tmp_path)
    _rewrite(root, lambda refs: refs.clear())
    with pytest.raises(UserError, match=r"holds no refs at all") as err:
        load_refcoco(root, "refcoco", "unc", "val")
    assert "this file has: ;" not in str(err.value) and not str(err.value).endswith("has: ")
