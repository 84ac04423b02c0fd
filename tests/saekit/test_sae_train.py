"""`saekit train / encode / info` end to end on a real tiny-LLaVA activation cache: the
saved folder loads in sae-lens, metrics are written, a killed run resumes to the same
bytes, codes match the library encoder, and bad layers are one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from saekit.argparse_dataclass import field_docstrings
from saekit.cache import ActivationCache, CacheConfig, build_cache
from saekit.cli import main
from saekit.sae.config import SAETrainConfig
from saekit.sae.encode import encode_sparse, load_codes
from saekit.sae.io import load_sae, read_sae_info

REPO = Path(__file__).resolve().parents[2]
WORDS = "the red circle left of a big blue square near green star".split()
FINAL_FILES = ("sae_weights.safetensors", "cfg.json", "saekit.json", "metrics.jsonl")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append({"image": f"{i}.png", "text": " ".join(WORDS[: 2 + i % 8])})
    (folder / "data.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder / "data.jsonl"


@pytest.fixture(scope="module")
def cache_dir(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "c"
    return build_cache(CacheConfig(model="tiny-llava", data=data, out=out, layers=(2,),
                                   shard_tokens=200, batch_size=5, device="cpu"), progress=False)


def _train_args(cache: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--cache", str(cache), "--out", str(out), "--d-sae", "256", "--batch-size", "64",
            "--warmup-steps", "3", "--lr", "2e-3", "--log-every", "10", "--no-progress", *extra]


@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_train_from_cache_writes_a_folder_sae_lens_loads(cache_dir, tmp_path, architecture, capsys):
    from sae_lens import SAE

    out = tmp_path / "sae"
    rc = main(_train_args(cache_dir, out, "--training-tokens", str(64 * 60), "--architecture",
                          architecture, "--k", "8", "--checkpoint-every", "25"))
    assert rc == 0
    assert f"sae: {out}" in capsys.readouterr().out
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [10, 20, 30, 40, 50, 60]
    assert {"step", "tokens", "loss", "mse", "fvu", "l0", "dead_fraction", "lr"} <= set(lines[0])
    assert lines[-1]["tokens"] == 64 * 60 and lines[-1]["lr"] == pytest.approx(2e-4)
    assert lines[-1]["fvu"] < lines[0]["fvu"]  # it learns
    if architecture == "topk":
        assert all(x["l0"] <= 8 for x in lines)
    assert not (out / "checkpoints").exists()  # removed once the final files are written
    theirs = SAE.load_from_disk(out)
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert theirs.cfg.architecture() == architecture
    acts = ActivationCache(cache_dir).read_all(2, token_types=("image", "prompt", "response"))
    ours = load_sae(out, expected_d_in=128).sae
    with torch.no_grad():
        assert torch.equal(theirs.encode(acts), ours.encode(acts))
    info = read_sae_info(out)
    assert info["layer"]["hf_hidden_states_index"] == 2 and info["model"]["name"] == "tiny-llava"
    assert info["normalization"]["method"] == "expected_average_only_in"
    scale = info["normalization"]["input_scale"]
    assert scale == pytest.approx(128 ** 0.5 / acts.norm(dim=1).mean().item(), rel=0.05)


def test_info_describes_sae_folders_and_caches(cache_dir, tmp_path, capsys):
    out = tmp_path / "sae"
    assert main(_train_args(cache_dir, out, "--training-tokens", str(64 * 10))) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    sae = json.loads(capsys.readouterr().out)
    assert (sae["kind"], sae["architecture"], sae["d_in"], sae["d_sae"]) == ("sae", "standard", 128, 256)
    assert (sae["layer"], sae["transformer_lens_hook"], sae["training_tokens"]) == (2, "blocks.1.hook_resid_post", 640)
    assert sae["final_metrics"]["step"] == 10
    assert main(["info", str(cache_dir), "--json"]) == 0
    cache = json.loads(capsys.readouterr().out)
    assert cache["kind"] == "activation_cache" and cache["n_tokens"] == ActivationCache(cache_dir).n_tokens
    assert cache["token_type_counts"]["image"] == 10 * 64
    assert main(["info", str(out)]) == 0
    assert "transformer_lens_hook: blocks.1.hook_resid_post" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_encode_cli_matches_the_library_encoder(cache_dir, tmp_path):
    out = tmp_path / "sae"
    assert main(_train_args(cache_dir, out, "--training-tokens", str(64 * 10))) == 0
    codes_file = tmp_path / "codes.safetensors"
    rc = main(["encode", "--sae", str(out), "--cache", str(cache_dir), "--out", str(codes_file),
               "--threshold", "0.05", "--top-k", "9", "--chunk-tokens", "100", "--token-types",
               "image", "prompt", "--no-progress"])
    assert rc == 0
    codes, extra, header = load_codes(codes_file)
    rows = ActivationCache(cache_dir).read_rows(2)
    keep = rows.token_types <= 1  # image (0) and prompt (1)
    expected = encode_sparse(load_sae(out).sae, rows.activations[keep], threshold=0.05, top_k=9)
    assert codes.n_tokens == int(keep.sum()) and header["layer"] == "2"
    assert torch.equal(codes.offsets, expected.offsets) and torch.equal(codes.indices, expected.indices)
    torch.testing.assert_close(codes.values, expected.values)
    assert torch.equal(extra["token_types"], rows.token_types[keep])
    assert torch.equal(extra["sample_ids"], rows.sample_ids[keep])


def test_killed_training_resumes_to_identical_files(cache_dir, tmp_path, capsys):
    def args(out: Path, *extra: str) -> list[str]:
        return _train_args(cache_dir, out, "--training-tokens", str(64 * 500),
                           "--checkpoint-every", "25", "--log-every", "50", *extra)

    resumed = tmp_path / "resumed"
    proc = subprocess.Popen([sys.executable, "-m", "saekit", *args(resumed)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((resumed / "checkpoints").glob("step_*[0-9]")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (resumed / "saekit.json").exists(), "the run finished before it could be killed"
    assert (resumed / "metrics.jsonl").is_file()
    reference = tmp_path / "uninterrupted"
    assert main(args(reference)) == 0
    capsys.readouterr()
    args_with_progress = [a for a in args(resumed) if a != "--no-progress"]
    assert main(args_with_progress) == 0  # the same command again, in this process
    assert "resuming from" in capsys.readouterr().err
    for name in FINAL_FILES:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (resumed / "checkpoints").exists()


def test_changed_settings_refuse_to_resume(cache_dir, tmp_path, capsys):
    out = tmp_path / "sae"
    args = _train_args(cache_dir, out, "--training-tokens", str(64 * 4), "--checkpoint-every", "2",
                       "--keep-checkpoints")
    assert main(args) == 0
    assert main([*args, "--log-every", "1"]) == 0  # a free field: the finished SAE is found
    assert main([*args, "--lr", "1e-3"]) == 2  # the finished SAE was trained at another lr
    assert "saekit.json was written with other settings: field 'lr' was 0.002, now 0.001" in capsys.readouterr().err
    (out / "saekit.json").unlink()  # as if killed after its step-2 checkpoint
    assert main([*args, "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err
    assert "step_00000002 was written with other settings: field 'lr' was 0.002, now 0.001" in err


def test_bad_layers_are_one_line_errors(cache_dir, data, tmp_path, capsys):
    rc = main(["train", "--model", "tiny-llava", "--layer", "9", "--data", str(data),
               "--out", str(tmp_path / "a"), "--d-sae", "64", "--batch-size", "32",
               "--training-tokens", "640", "--warmup-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert "layer 9 is out of range for model tiny-llava: valid layers are 1..4" in err
    rc = main(_train_args(cache_dir, tmp_path / "b", "--layer", "3", "--training-tokens", "640"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "holds layers [2], not layer 3" in err


def test_train_on_the_fly_records_the_stream(data, tmp_path):
    out = tmp_path / "sae"
    rc = main(["train", "--model", "tiny-llava", "--data", str(data), "--out", str(out),
               "--d-sae", "64", "--batch-size", "64", "--training-tokens", str(64 * 8),
               "--warmup-steps", "1", "--log-every", "4", "--no-progress", "--samples-per-forward", "4"])
    assert rc == 0
    info = read_sae_info(out)
    assert info["data"]["kind"] == "stream" and info["layer"]["hf_hidden_states_index"] == 2
    assert info["training"]["tokens"] == 64 * 8


def test_help_documents_every_config_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    docs = field_docstrings(SAETrainConfig)
    for name in SAETrainConfig.__dataclass_fields__:
        assert docs.get(name), name
        flag = name.replace("_", "-")
        assert f"--{flag}" in text or f"--[no-]{flag}" in text, name
