"""Issue 25 on saekit's side: nonsense is refused instead of written with exit 0 (item 5),
damaged files are one-line errors and never "complete" (item 3), messages say the right
thing (item 6), and the pieces the CLIs share behave (error boundary, logs, permissions)."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from fault_pieces import build_cache, save_sae, truncate, write_data
from saekit.atomic import atomic_directory, atomic_file, check_output_folder
from saekit.cache import ActivationCache, CacheConfig, build_cache as build
from saekit.errors import UserError
from saekit.faults import disk_full, fault_message
from saekit.run import MetricsLog, apply_threads, truncate_log


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_cache(tmp_path_factory.mktemp("refusals"))


def _cfg(data, out, **overrides):
    values = dict(model="tiny-llava", data=data, out=out, layers=(2,), shard_tokens=100, batch_size=2,
                  device="cpu")
    return CacheConfig(**(values | overrides))


def test_a_cache_without_usable_samples_is_refused_and_not_written(tmp_path):
    """The trial: a cache where every image is missing became a complete 0-token cache."""
    data = write_data(tmp_path / "data", missing=True)
    with pytest.raises(UserError, match=r"gave no usable sample \(4 records read; skipped: missing_image 4\)"):
        build(_cfg(data, tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_resuming_a_cache_notices_that_its_data_changed(cache, tmp_path):
    """The trial: resuming an unfinished cache did not notice that its data file changed."""
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    cfg = _cfg(data, out, token_types=("image", "prompt", "special"))
    build(cfg, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, complete=False, shards=manifest["shards"][:1])))
    for shard in manifest["shards"][1:]:
        (out / shard["file"]).unlink()
    with data.open("a") as handle:
        handle.write(json.dumps({"image": "1.png", "text": "changed"}) + "\n")
    with pytest.raises(UserError, match=r"the data .*data\.jsonl changed since this cache was started"):
        build(cfg, progress=False)


def test_a_cache_folder_is_ours_or_refused(tmp_path):
    """What a run killed in its first shard leaves (our .tmp, safetensors' .tmpXXXX) is cleared;
    a folder holding anything else is refused, so two things never share it."""
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard_00000.safetensors.tmp").write_bytes(b"half")
    (out / ".tmpa1B2c3").write_bytes(b"half")
    build(_cfg(data, out), progress=False)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".tmp*")) and ActivationCache(out).complete
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"already holds files that are not a cache \(notes\.txt\)"):
        build(_cfg(data, other), progress=False)


def test_a_truncated_shard_is_never_complete(cache, tmp_path, capsys):
    """The trial: `saekit info` called a cache with a truncated shard complete."""
    from saekit.cli import main

    damaged = tmp_path / "cache"
    shutil.copytree(cache, damaged)
    truncate(damaged / "shard_00001.safetensors")
    with pytest.raises(UserError, match=r"shard_00001\.safetensors: damaged shard"):
        ActivationCache(damaged)
    assert main(["info", str(damaged)]) == 2
    captured = capsys.readouterr()
    assert "complete" not in captured.out and "shard_00001.safetensors" in captured.err
    # A cache written before sizes were recorded: its shards' headers are checked instead.
    manifest = json.loads((damaged / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["bytes"]
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"shard_00001\.safetensors: damaged safetensors file"):
        ActivationCache(damaged)


def test_nan_weights_and_token_types_the_cache_lacks_are_refused(cache, tmp_path):
    """The trials: NaN SAE weights loaded; encode with token types the cache lacks wrote 0-token codes."""
    from saekit.sae.encode import EncodeConfig, encode_cache
    from saekit.sae.io import load_sae

    compat = ActivationCache(cache).compat(2)
    with pytest.raises(UserError, match=r"sae_weights\.safetensors: W_dec holds NaN or infinite values"):
        load_sae(save_sae(tmp_path / "nan", compat, nan=True))
    sae = save_sae(tmp_path / "sae", dict(compat, token_types=["image", "prompt", "response"]))
    out = tmp_path / "codes.safetensors"
    with pytest.raises(UserError, match=r"holds no rows of token types response \(it holds image, prompt, special\)"):
        encode_cache(EncodeConfig(sae=sae, cache=cache, out=out, token_types=("response",)), progress=False)
    assert not out.exists()


def test_json_messages_read_well(cache, tmp_path):
    """The trial: 'Unterminated string starting at at column 9'."""
    from saekit.cache import read_manifest
    from saekit.sources import open_source

    path = tmp_path / "data.jsonl"
    path.write_text('{"image": "a.png", "text": "cut')  # the last line, cut short
    with pytest.raises(UserError) as err:
        list(open_source(path))
    assert " at at " not in str(err.value) and "Unterminated string starting at (column" in str(err.value)
    broken = tmp_path / "cache"
    shutil.copytree(cache, broken)
    (broken / "manifest.json").write_text('{"format": "')
    with pytest.raises(UserError) as err:
        read_manifest(broken)
    assert " at at " not in str(err.value) and "(line 1, column" in str(err.value)


def test_the_model_folder_advice_names_the_callers_flag(tmp_path):
    """The trial: 'pass --model-path DIR' from a command without that flag."""
    from saekit.models import load_model

    with pytest.raises(UserError, match="pass --policy DIR") as err:
        load_model("tiny-llava", tmp_path / "nowhere", path_flag="--policy")
    assert "--model-path" not in str(err.value)
    with pytest.raises(UserError) as err:
        load_model("tiny-llava", tmp_path / "nowhere", path_flag=None)
    assert "--model-path" not in str(err.value) and "pass" not in str(err.value)


def test_written_files_have_normal_permissions(tmp_path):
    """The trial: weights were written 0600 (safetensors and mkstemp), unreadable to others."""
    umask = os.umask(0o022)
    os.umask(umask)
    for unique in (False, True):
        path = tmp_path / f"w{unique}.safetensors"
        with atomic_file(path, unique=unique) as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    with atomic_directory(tmp_path / "folder") as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp / "w.safetensors"))
    assert (tmp_path / "folder" / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    from saekit.models import load_model, save_pretrained

    saved = save_pretrained(load_model("tiny-llava"), tmp_path / "model")
    assert (saved / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_writes_leave_nothing_behind(tmp_path):
    target = tmp_path / "new" / "deeper" / "codes.safetensors"
    with pytest.raises(OSError):
        with atomic_file(target, parents=True):
            raise disk_full(target)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    with pytest.raises(UserError, match="--overwrite"):
        check_output_folder(tmp_path / "out", overwrite=False)
    check_output_folder(tmp_path / "out", overwrite=True)
    check_output_folder(tmp_path / "fresh", overwrite=False)
    with pytest.raises(UserError, match="is a file"):
        check_output_folder(tmp_path / "out" / "old.txt", overwrite=True)


def test_logs_resume_at_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert truncate_log(path, 2) == {"step": 2}
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    log = MetricsLog(path, 0)  # a fresh run starts the file again
    assert log.last is None and path.read_text() == ""
    log.append({"step": 1})
    assert MetricsLog(path, 1).last == {"step": 1}


def test_the_error_boundary_sorts_faults_from_bugs(monkeypatch, capsys, tmp_path):
    from saekit.cli import main
    import saekit.commands.info

    assert fault_message(disk_full("/data/out/x.bin")) == (
        "/data/out/x.bin: no space left on the device; free some space (or choose another --out) and run again")
    for code, words in ((errno.EACCES, "permission denied"), (errno.EISDIR, "is a folder"),
                        (errno.ENOTDIR, "is a file, not a folder")):
        assert words in fault_message(OSError(code, os.strerror(code), "/x/y"))
    assert fault_message(ZeroDivisionError("bug")) is None
    assert fault_message(KeyError("bug")) is None
    with pytest.raises(UserError, match="--threads"):
        apply_threads(-3)

    def buggy(args):
        raise ZeroDivisionError("a bug keeps its traceback")
    monkeypatch.setattr(saekit.commands.info, "run", buggy)
    with pytest.raises(ZeroDivisionError):
        main(["info", "anything"])

    def reads_bad_json(args):
        path = tmp_path / "state.json"
        path.write_text('{"step": ')
        return json.loads(path.read_text())  # a reader that does not name its file
    monkeypatch.setattr(saekit.commands.info, "run", reads_bad_json)
    assert main(["info", "anything"]) == 2
    assert capsys.readouterr().err.startswith(f"saekit: error: {tmp_path / 'state.json'}: not valid JSON: ")

    def full(args):
        raise disk_full("/data/out/x.bin")
    monkeypatch.setattr(saekit.commands.info, "run", full)
    assert main(["info", "anything"]) == 2
    assert capsys.readouterr().err == ("saekit: error: /data/out/x.bin: no space left on the device; free some "
                                       "space (or choose another --out) and run again\n")
