"""The refs pickle reader admits plain data only and runs nothing."""

import collections
import os
import pickle
import pickletools

import pytest

from saekit.errors import UserError
from segcompass.data.safe_pickle import load_plain, loads_plain

PLAIN = [{"ref_id": 0, "ann_id": 1, "image_id": 2, "split": "testA", "score": 0.5,
          "flag": True, "none": None, "blob": b"\x00\x01", "pair": (1, "a"), "ids": {3, 4},
          "sentences": [{"sent": "the man on the left", "raw": "The man, on the left!",
                         "tokens": ["the", "man"], "sent_id": 7}]}]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips_in_every_protocol(tmp_path, protocol):
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps(PLAIN, protocol=protocol))
    assert load_plain(path) == PLAIN


def test_python2_style_set_global_is_admitted():
    # Protocol 2 as Python 2 wrote it: c__builtin__\nset + REDUCE.
    data = b"\x80\x02c__builtin__\nset\nq\x00]q\x01(K\x01K\x02e\x85q\x02Rq\x03."
    assert loads_plain(data) == {1, 2}


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_os_system_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(pickle.dumps([{"ref_id": 0, "x": _Exploit(marker)}], protocol=2))
    with pytest.raises(UserError, match=r"refs\(unc\)\.p.*refused.*(posix|os)\.system"):
        load_plain(path)
    assert not marker.exists()


class Plain:
    pass


@pytest.mark.parametrize("obj", [Plain(), collections.OrderedDict(a=1), frozenset({1}),
                                 range(3), complex(1, 2)])
def test_any_other_object_is_refused(obj):
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        with pytest.raises(UserError, match="refused"):
            loads_plain(pickle.dumps([obj], protocol=protocol), "refs(unc).p")


def test_stack_global_to_eval_is_refused():
    # Protocol 4 STACK_GLOBAL('builtins', 'eval') + REDUCE(('1+1',)).
    data = (b"\x80\x04\x8c\x08builtins\x94\x8c\x04eval\x94\x93\x94\x8c\x031+1\x94\x85\x94R\x94.")
    pickletools.dis(data, out=open(os.devnull, "w"))  # it is a well-formed pickle
    with pytest.raises(UserError, match="builtins.eval"):
        loads_plain(data, "x.p")


def test_garbage_and_missing_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a readable pickle"):
        loads_plain(b"not a pickle", "bad.p")
    with pytest.raises(UserError, match="file not found"):
        load_plain(tmp_path / "missing.p")


def test_admitted_globals_take_only_their_plain_arguments():
    # _codecs.encode(str, 'zlib_codec') would reach the codec registry: refused.
    data = b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\n\x00\x00\x00zlib_codec\x86R."
    with pytest.raises(UserError, match="latin1"):
        loads_plain(data, "x.p")
    # set() of a str would be admitted by set itself; the guard wants a list.
    with pytest.raises(UserError, match="set"):
        loads_plain(b"\x80\x02c__builtin__\nset\nX\x02\x00\x00\x00ab\x85R.", "x.p")
