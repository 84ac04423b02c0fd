"""Atomic writes: a file is the old one or the new one, and a failed write leaves no temporary."""

import pytest

from saekit.atomic import atomic_file, atomic_write_bytes


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_error(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with atomic_file(path, unique=True) as tmp:
        assert tmp.name.startswith("a.bin.") and tmp.name.endswith(".tmp") and tmp.name != "a.bin.tmp"
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
