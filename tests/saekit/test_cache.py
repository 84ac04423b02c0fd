"""Activation cache on the tiny LLaVA twin: shard contents against a direct capture,
storage dtypes, manifest, kill-and-resume byte identity, and the streaming reader."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from saekit.cache import (ActivationCache, CacheConfig, build_cache, read_manifest,
                          stream_activations)
from saekit.capture import capture
from saekit.errors import UserError
from saekit.inputs import TokenType, build_batch
from saekit.models import load_model
from saekit.sources import open_source

REPO = Path(__file__).resolve().parents[2]
WORDS = "the red circle left of a big blue square near green star".split()
BATCH = 3


def _write_data(folder: Path, n: int, *, missing_at: int | None = None) -> Path:
    """`n` JSONL samples with random images of varied sizes, texts of varied lengths
    (so batches are padded) and a response on every third; optionally one line whose
    image file does not exist."""
    rng = np.random.default_rng(n)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        if i == missing_at:
            lines.append({"image": "gone.png", "text": "no image"})
        pixels = rng.integers(0, 256, (30 + 7 * (i % 5), 40 + 5 * (i % 3), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        row = {"image": f"img{i}.png", "text": " ".join(WORDS[: 1 + (i * 5) % len(WORDS)])}
        if i % 3 == 0:
            row["response"] = "the red circle"
        lines.append(row)
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    return path


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-llava")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _write_data(tmp_path_factory.mktemp("data"), 14, missing_at=5)


def _cfg(data: Path, out: Path, **overrides) -> CacheConfig:
    values = dict(model="tiny-llava", data=data, out=out, layers=(2, 1), shard_tokens=150,
                  batch_size=BATCH, device="cpu")
    values.update(overrides)
    return CacheConfig(**values)


@pytest.fixture(scope="module")
def cache_dir(tiny, data, tmp_path_factory) -> Path:
    return build_cache(_cfg(data, tmp_path_factory.mktemp("cache") / "c"), loaded=tiny,
                       progress=False)


def _direct_capture(tiny, data: Path):
    """The same samples captured directly, batch by batch, concatenated."""
    samples = list(open_source(data))
    parts, masks = [], []
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        batch = build_batch(tiny, [s.image for s in chunk], [s.text for s in chunk],
                            [s.response for s in chunk])
        cap = capture(tiny, batch, [1, 2])
        parts.append((cap, start))
        masks.append(batch.attention_mask)
    return samples, parts, masks


def test_shards_equal_a_direct_capture(tiny, data, cache_dir) -> None:
    cache = ActivationCache(cache_dir)
    samples, parts, masks = _direct_capture(tiny, data)
    assert any(bool((m == 0).any()) for m in masks), "batches must be padded for this test"
    for layer in (1, 2):
        rows = cache.read_rows(layer)
        assert torch.equal(rows.activations, torch.cat([c.activations[layer] for c, _ in parts]))
    assert torch.equal(rows.token_types, torch.cat([c.token_types for c, _ in parts]))
    assert torch.equal(rows.sample_ids, torch.cat([c.sample_index + s for c, s in parts]))
    assert torch.equal(rows.image_grid, torch.cat([c.image_grid for c, _ in parts]))
    # Padding never enters: each sample has exactly its own tokens, at positions 0..n-1.
    lengths = torch.cat([m.sum(dim=1) for m in masks])
    assert torch.equal(torch.bincount(rows.sample_ids, minlength=len(samples)), lengths)
    for sample in range(len(samples)):
        positions = rows.positions[rows.sample_ids == sample]
        assert torch.equal(positions, torch.arange(int(lengths[sample])))
    assert set(rows.token_types.tolist()) == {int(t) for t in TokenType}
    image_rows = rows.token_types == TokenType.IMAGE
    assert int(image_rows.sum()) == len(samples) * 64  # tiny-llava: 8x8 patch grid per image
    assert bool((rows.image_grid[image_rows] >= 0).all() and (rows.image_grid[~image_rows] == -1).all())


def test_manifest_describes_the_cache(cache_dir, data) -> None:
    manifest = read_manifest(cache_dir)
    assert manifest["complete"] is True
    assert manifest["config"]["layers"] == [1, 2] and manifest["config"]["data"] == str(data)
    assert manifest["model"] == {"name": "tiny-llava", "family": "llava",
                                 "hf_class": "LlavaForConditionalGeneration",
                                 "d_model": 128, "n_layers": 4}
    assert manifest["layers"]["2"]["hf_hidden_states_index"] == 2
    assert manifest["layers"]["2"]["transformer_lens_hook"] == "blocks.1.hook_resid_post"
    assert manifest["source"]["kind"] == "jsonl"
    assert manifest["source_stats"] == {"seen": 15, "used": 14, "skipped": {"missing_image": 1}}
    shards = manifest["shards"]
    assert [s["file"] for s in shards] == [f"shard_{i:05d}.safetensors" for i in range(len(shards))]
    assert sorted(p.name for p in cache_dir.glob("*.safetensors")) == [s["file"] for s in shards]
    assert manifest["n_tokens"] == sum(s["n_tokens"] for s in shards)
    assert manifest["token_type_counts"]["image"] == 14 * 64
    rows = ActivationCache(cache_dir).read_rows(1)
    for shard in shards:
        # Shards hold whole batches and are cut at the first batch that reaches shard_tokens.
        assert shard["first_sample"] % BATCH == 0
        ids = rows.sample_ids[rows.sample_ids.ge(shard["first_sample"]) & rows.sample_ids.le(shard["last_sample"])]
        assert ids.numel() == shard["n_tokens"]
        last_batch_start = (shard["last_sample"] // BATCH) * BATCH
        if shard is not shards[-1]:
            assert shard["n_tokens"] >= 150 > int((ids < last_batch_start).sum())
        with safe_open(str(cache_dir / shard["file"]), "pt") as handle:
            counts = torch.bincount(handle.get_tensor("token_types").long(), minlength=4)
            assert counts.tolist() == list(shard["token_type_counts"].values())
            assert handle.get_tensor("activations.2").dtype == torch.float32
    assert shards[-1]["next_record"] == 15 and shards[-1]["source_stats"]["used"] == 14


def test_storage_dtype_and_token_type_filter(tiny, data, cache_dir, tmp_path) -> None:
    out = build_cache(_cfg(data, tmp_path / "half", dtype="float16", token_types=("image", "response")),
                      loaded=tiny, progress=False)
    full = ActivationCache(cache_dir).read_rows(2)
    keep = (full.token_types == TokenType.IMAGE) | (full.token_types == TokenType.RESPONSE)
    half = ActivationCache(out)
    with safe_open(str(out / half.shards[0]["file"]), "pt") as handle:
        assert handle.get_tensor("activations.2").dtype == torch.float16
    rows = half.read_rows(2)
    assert torch.equal(rows.token_types, full.token_types[keep])
    assert torch.equal(rows.activations, full.activations[keep].half().float())
    assert half.manifest["token_type_counts"]["prompt"] == 0


def test_resume_rejects_a_different_config(data, cache_dir) -> None:
    with pytest.raises(UserError, match=r"manifest\.json was written with other settings: "
                                        r"field 'shard_tokens' was 150, now 99; use another --out$"):
        build_cache(_cfg(data, cache_dir, shard_tokens=99))
    with pytest.raises(UserError, match="field 'dtype' was 'float32', now 'bfloat16'"):
        build_cache(_cfg(data, cache_dir, dtype="bfloat16"))


def test_resume_after_losing_the_tail_is_byte_identical(tiny, data, cache_dir, tmp_path) -> None:
    """An in-process interruption: the manifest knows 2 shards, a third was half written."""
    out = tmp_path / "c"
    out.mkdir()
    manifest = read_manifest(cache_dir)
    for shard in manifest["shards"][:2]:
        (out / shard["file"]).write_bytes((cache_dir / shard["file"]).read_bytes())
    (out / "shard_00002.safetensors.tmp").write_bytes(b"partial")
    cut = dict(manifest, shards=manifest["shards"][:2], complete=False)
    (out / "manifest.json").write_text(json.dumps(cut))
    build_cache(_cfg(data, out), loaded=tiny, progress=False)
    _assert_same_cache(cache_dir, out)


def _assert_same_cache(reference: Path, other: Path) -> None:
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in other.iterdir()) == files
    ref_manifest, other_manifest = read_manifest(reference), read_manifest(other)
    assert other_manifest["shards"] == ref_manifest["shards"]
    assert other_manifest == ref_manifest
    for shard in ref_manifest["shards"]:
        assert (other / shard["file"]).read_bytes() == (reference / shard["file"]).read_bytes()


def test_kill_and_resume_gives_identical_files(tiny, tmp_path) -> None:
    """SIGKILL `python -m saekit cache` after its first shard, re-run it, compare bytes."""
    data = _write_data(tmp_path / "data", 30)
    reference = build_cache(_cfg(data, tmp_path / "ref", batch_size=2, shard_tokens=1, layers=(2,)),
                            loaded=tiny, progress=False)
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "saekit", "cache", "--model", "tiny-llava", "--data", str(data),
               "--out", str(out), "--layers", "2", "--batch-size", "2", "--shard-tokens", "1",
               "--device", "cpu", "--no-progress"]
    # Same thread count as this process, so the two runs do the same arithmetic.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO))
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        n_shards = _wait_for_first_shard(out / "manifest.json", proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed = read_manifest(out)
    assert not killed["complete"] and 1 <= n_shards <= len(killed["shards"]) < 15
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"cache: {out}" in rerun.stdout and "30 samples" in rerun.stdout
    _assert_same_cache(reference, out)


def _wait_for_first_shard(manifest_path: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"saekit cache ended (rc {proc.returncode}) before it could be killed: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        if manifest_path.is_file():
            shards = json.loads(manifest_path.read_text())["shards"]
            if shards:
                return len(shards)
        time.sleep(0.002)
    pytest.fail("no shard appeared within 120 s")


# ----------------------------------------------------------------------------- reader

def _row_counter(rows: torch.Tensor) -> Counter:
    return Counter(row.numpy().tobytes() for row in rows)


def test_reader_sees_every_row_once_per_epoch(cache_dir) -> None:
    cache = ActivationCache(cache_dir)
    assert len(cache.shards) >= 5 and cache.d_in == 128 and cache.layers == (1, 2)
    n = cache.n_tokens
    batches = list(cache.iter_batches(64, layer=2, epochs=2, seed=1, shards_in_memory=2))
    assert all(b.shape == (64, 128) for b in batches[:-1]) and batches[-1].shape[0] == (2 * n) % 64
    stream = torch.cat(batches)
    everything = cache.read_all(2)
    assert _row_counter(stream[:n]) == _row_counter(everything)
    assert _row_counter(stream[n:]) == _row_counter(everything)
    assert not torch.equal(stream[:n], stream[n:])  # each epoch has its own order
    assert not torch.equal(stream[:n], everything)
    full_only = list(cache.iter_batches(64, layer=2, epochs=2, seed=1, drop_last=True))
    assert len(full_only) == (2 * n) // 64 and all(b.shape[0] == 64 for b in full_only)
    in_order = torch.cat(list(cache.iter_batches(100, layer=2, shuffle=False)))
    assert torch.equal(in_order, everything)


def test_reader_is_deterministic_and_memory_bounded(cache_dir) -> None:
    def run(seed: int, k: int = 2) -> tuple[torch.Tensor, ActivationCache]:
        cache = ActivationCache(cache_dir)
        out = torch.cat(list(cache.iter_batches(50, layer=1, seed=seed, shards_in_memory=k)))
        return out, cache

    first, cache = run(seed=3)
    assert torch.equal(first, run(seed=3)[0])
    assert not torch.equal(first, run(seed=4)[0])
    sizes = sorted((s["n_tokens"] for s in cache.shards), reverse=True)
    assert 0 < cache.peak_resident_rows <= sizes[0] + sizes[1] < cache.n_tokens
    assert cache.resident_rows == 0  # everything released once the stream ends
    _, one = run(seed=3, k=1)
    assert one.peak_resident_rows <= sizes[0]


def test_start_batch_equals_dropping_batches(cache_dir) -> None:
    cache = ActivationCache(cache_dir)
    kwargs = dict(layer=2, epochs=2, seed=5, shards_in_memory=2)
    full = list(cache.iter_batches(40, **kwargs))
    for start in (1, 9, len(full) // 2 + 1, len(full) - 1):
        resumed = list(cache.iter_batches(40, start_batch=start, **kwargs))
        assert len(resumed) == len(full) - start
        assert all(torch.equal(a, b) for a, b in zip(resumed, full[start:]))
    endless = list(itertools.islice(cache.iter_batches(40, layer=2, epochs=None, seed=5,
                                                       shards_in_memory=2), len(full) - 1))
    assert all(torch.equal(a, b) for a, b in zip(endless, full[:-1]))


def test_reader_token_type_filter_and_errors(cache_dir) -> None:
    cache = ActivationCache(cache_dir)
    images = torch.cat(list(cache.iter_batches(64, layer=2, token_types=["image"], seed=0)))
    assert _row_counter(images) == _row_counter(cache.read_all(2, token_types=["image"]))
    assert images.shape[0] == 14 * 64
    with pytest.raises(UserError, match="not layer 3"):
        next(cache.iter_batches(8, layer=3))
    with pytest.raises(UserError, match="token types"):
        next(cache.iter_batches(8, layer=2, token_types=["pixels"]))
    with pytest.raises(UserError, match="no manifest.json"):
        ActivationCache(cache_dir.parent)


def test_stream_activations_matches_the_cache(tiny, data, cache_dir) -> None:
    batches = list(stream_activations(tiny, open_source(data), 2, batch_size=32,
                                      samples_per_forward=BATCH, buffer_tokens=200, seed=0))
    assert all(b.shape == (32, 128) for b in batches[:-1])
    stream = torch.cat(batches)
    everything = ActivationCache(cache_dir).read_all(2)
    assert _row_counter(stream) == _row_counter(everything)
    assert not torch.equal(stream, everything)
