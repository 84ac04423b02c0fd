"""Both command lines against a table of bad inputs and faults (issue 25): each run ends with
exit code 2 and one `<prog>: error:` line that names the input, no traceback, and no new or
changed file where the command writes. The CLIs run in-process (`saekit.cli.main`,
`segcompass.cli.main`); a full disk and a denied permission are simulated with monkeypatch.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

from fault_pieces import build_cache, copy_tree, save_sae, snapshot, truncate, write_data
from segcompass_tiny import tiny_checkpoint  # noqa: F401 (session fixture)


@dataclass(frozen=True)
class Pieces:
    root: Path
    cache: Path
    """tiny-llava layer 2; image, prompt and special tokens (no response tokens)."""
    sae: Path
    """An SAE made for the cache's layer (model, layer, d_in and token types match)."""
    checkpoint: Path
    """The tiny SegCompass checkpoint (tests/segcompass_tiny.py)."""
    image: Path
    gt: Path
    """A ReasonSeg-layout folder with one sample."""


@pytest.fixture(scope="module")
def pieces(tmp_path_factory, tiny_checkpoint) -> Pieces:  # noqa: F811
    from saekit.cache import ActivationCache

    root = tmp_path_factory.mktemp("faults")
    cache = build_cache(root)
    compat = dict(ActivationCache(cache).compat(2), token_types=["image", "prompt", "special"])
    sae = save_sae(root / "sae", compat)
    image = root / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(image)
    gt = root / "gt"
    gt.mkdir()
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(gt / "a.png")
    (gt / "a.json").write_text(json.dumps({"text": ["the thing"], "shapes": [
        {"label": "target", "points": [[1, 1], [10, 1], [10, 10]]}]}))
    return Pieces(root, cache, sae, tiny_checkpoint, image, gt)


@dataclass(frozen=True)
class Case:
    id: str
    cli: str
    """saekit or segcompass."""
    argv: Callable[[Pieces, Path], list[str]]
    """(pieces, this case's folder) -> arguments; may prepare damaged inputs in the folder."""
    named: Callable[[Pieces, Path], str]
    """What the error line must name."""
    fault: Callable[[pytest.MonkeyPatch, Path], None] | None = None
    """Installs a simulated fault (disk full, permission denied)."""


def _out(case_dir: Path) -> Path:
    return case_dir / "out"


def _damaged_cache(p: Pieces, d: Path) -> Path:
    cache = copy_tree(p.cache, d / "in" / "cache")
    truncate(cache / "shard_00000.safetensors")
    return cache


def _sae_with(p: Pieces, d: Path, name: str, edit: Callable[[Path], None]) -> Path:
    sae = copy_tree(p.sae, d / "in" / "sae")
    edit(sae / name)
    return sae


def _qwen_sae(p: Pieces, d: Path) -> Path:
    from saekit.cache import ActivationCache

    compat = dict(ActivationCache(p.cache).compat(2), model="tiny-qwen2.5-vl", fingerprint=None)
    return save_sae(d / "in" / "qwen-sae", compat)


def _layer1_sae(p: Pieces, d: Path) -> Path:
    from saekit.cache import ActivationCache

    compat = dict(ActivationCache(p.cache).compat(2), layer=1, hook="blocks.0.hook_resid_post")
    return save_sae(d / "in" / "l1-sae", compat)


def _nan_sae(p: Pieces, d: Path) -> Path:
    from saekit.cache import ActivationCache

    return save_sae(d / "in" / "nan-sae", dict(ActivationCache(p.cache).compat(2)), nan=True)


def _checkpoint_with(p: Pieces, d: Path, name: str, edit: Callable[[Path], None]) -> Path:
    checkpoint = copy_tree(p.checkpoint, d / "in" / "checkpoint")
    edit(checkpoint / name)
    return checkpoint


def _file(path: Path, text: str = "not a folder") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _gt_with_polygon(d: Path, points) -> Path:
    gt = d / "in" / "gt"
    gt.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(gt / "a.png")
    (gt / "a.json").write_text(json.dumps({"text": ["x"], "shapes": [{"label": "t", "points": points}]}))
    return gt


def _encode(p: Pieces, d: Path, sae: Path | None = None, *extra: str, out: Path | None = None,
            device: str = "cpu") -> list[str]:
    return ["encode", "--sae", str(sae or p.sae), "--cache", str(p.cache), "--out",
            str(out or _out(d) / "codes.safetensors"), "--device", device, "--no-progress", *extra]


def _predict(p: Pieces, d: Path, checkpoint: Path | None = None, image: Path | None = None,
             *extra: str) -> list[str]:
    return ["predict", "--checkpoint", str(checkpoint or p.checkpoint), str(image or p.image), "the thing",
            "--out", str(_out(d)), "--device", "cpu", "--max-new-tokens", "4", *extra]


def _train(p: Pieces, d: Path, *extra: str, sae_layer: int = 1) -> list[str]:
    return ["train", "--policy", str(p.checkpoint / "policy"), "--sae", str(p.checkpoint / "sae"),
            "--sae-layer", str(sae_layer), "--out", str(_out(d)), "--steps", "1", "--batch-size", "1",
            "--no-progress", *extra]


def _disk_full_on_write(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    import saekit.atomic

    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.readlink(f"/proc/self/fd/{fd}"))
    monkeypatch.setattr(saekit.atomic.os, "fsync", fsync)


def _safetensors_disk_full(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    import saekit.sae.encode
    from safetensors import SafetensorError

    def save_file(tensors, path, metadata=None):
        raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) '
                              f'at path "{path}"')
    monkeypatch.setattr(saekit.sae.encode, "save_file", save_file)


def _permission_denied_on_folder(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    mkdir = Path.mkdir

    def guarded(self: Path, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return mkdir(self, *args, **kwargs)
    monkeypatch.setattr(Path, "mkdir", guarded)


def _bomb_image(d: Path) -> Path:
    path = d / "in" / "bomb.png"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (200, 200)).save(path)
    return path


def _small_pixel_limit(monkeypatch: pytest.MonkeyPatch, d: Path) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 200x200 is then > 2x the limit: a bomb


def _aspect_image(d: Path) -> Path:
    path = d / "in" / "sliver.png"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (1000, 3)).save(path)
    return path


def _unfinished_cache_with_new_data(p: Pieces, d: Path) -> list[str]:
    """A cache cut back to one shard (as a kill leaves it), then its data file edited."""
    data = write_data(d / "in" / "data")
    cache = copy_tree(p.cache, _out(d))
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest.update(complete=False, shards=manifest["shards"][:1])
    manifest["config"]["data"] = str(data.resolve())
    from saekit.integrity import data_fingerprint

    manifest["data_fingerprint"] = data_fingerprint(data)
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with data.open("a") as handle:
        handle.write(json.dumps({"image": "0.png", "text": "one more line"}) + "\n")
    return ["cache", "--model", "tiny-llava", "--data", str(data), "--out", str(cache), "--layers", "2",
            "--shard-tokens", "100", "--batch-size", "2", "--token-types", "image", "prompt", "special",
            "--device", "cpu", "--no-progress"]


CASES = [
    # ---------------------------------------------------------------- saekit
    Case("info-truncated-shard", "saekit", lambda p, d: ["info", str(_damaged_cache(p, d))],
         lambda p, d: "shard_00000.safetensors"),
    Case("info-cfg-json-wrong-shape", "saekit",
         lambda p, d: ["info", str(_sae_with(p, d, "cfg.json", lambda f: f.write_text("[1, 2]")))],
         lambda p, d: "cfg.json"),
    Case("info-saekit-json-wrong-shape", "saekit",
         lambda p, d: ["info", str(_sae_with(p, d, "saekit.json", lambda f: f.write_text('{"model": 3}')))],
         lambda p, d: "saekit.json"),
    Case("info-cfg-json-not-json", "saekit",
         lambda p, d: ["info", str(_sae_with(p, d, "cfg.json", lambda f: f.write_text('{"d_in": "')))],
         lambda p, d: "cfg.json"),
    Case("encode-truncated-weights", "saekit",
         lambda p, d: _encode(p, d, _sae_with(p, d, "sae_weights.safetensors", truncate)),
         lambda p, d: "sae_weights.safetensors"),
    Case("encode-missing-weights", "saekit",
         lambda p, d: _encode(p, d, _sae_with(p, d, "sae_weights.safetensors", Path.unlink)),
         lambda p, d: "sae_weights.safetensors"),
    Case("encode-sae-of-another-model", "saekit", lambda p, d: _encode(p, d, _qwen_sae(p, d)),
         lambda p, d: "qwen-sae"),
    Case("encode-sae-of-another-layer", "saekit", lambda p, d: _encode(p, d, _layer1_sae(p, d)),
         lambda p, d: "l1-sae"),
    Case("encode-nan-weights", "saekit", lambda p, d: _encode(p, d, _nan_sae(p, d)),
         lambda p, d: "sae_weights.safetensors"),
    Case("encode-token-types-the-cache-lacks", "saekit",
         lambda p, d: _encode(p, d, None, "--token-types", "response"), lambda p, d: str(p.cache)),
    Case("encode-truncated-cache", "saekit",
         lambda p, d: ["encode", "--sae", str(p.sae), "--cache", str(_damaged_cache(p, d)), "--out",
                       str(_out(d) / "codes.safetensors"), "--no-progress"],
         lambda p, d: "shard_00000.safetensors"),
    Case("encode-out-is-a-folder", "saekit",
         lambda p, d: _encode(p, d, out=_out(d).mkdir() or _out(d)),
         lambda p, d: str(_out(d))),
    Case("encode-out-below-a-file", "saekit",
         lambda p, d: _encode(p, d, out=_file(_out(d)) / "codes.safetensors"),
         lambda p, d: str(_out(d))),
    Case("encode-device-cuda-on-cpu-torch", "saekit", lambda p, d: _encode(p, d, device="cuda"),
         lambda p, d: "--device cuda"),
    Case("encode-disk-full", "saekit", lambda p, d: _encode(p, d), lambda p, d: "codes.safetensors",
         _safetensors_disk_full),
    Case("encode-disk-full-at-fsync", "saekit", lambda p, d: _encode(p, d), lambda p, d: "codes.safetensors",
         _disk_full_on_write),
    Case("cache-all-images-missing", "saekit",
         lambda p, d: ["cache", "--model", "tiny-llava", "--data", str(write_data(d / "in", missing=True)),
                       "--out", str(_out(d)), "--device", "cpu", "--no-progress"],
         lambda p, d: "data.jsonl"),
    Case("cache-out-is-a-file", "saekit",
         lambda p, d: ["cache", "--model", "tiny-llava", "--data", str(write_data(d / "in")),
                       "--out", str(_file(_out(d))), "--device", "cpu", "--no-progress"],
         lambda p, d: str(_out(d))),
    Case("cache-resume-after-data-changed", "saekit", _unfinished_cache_with_new_data,
         lambda p, d: "data.jsonl"),
    Case("train-token-types-the-cache-lacks", "saekit",
         lambda p, d: ["train", "--cache", str(p.cache), "--out", str(_out(d)), "--d-sae", "32",
                       "--token-types", "response", "--device", "cpu", "--no-progress"],
         lambda p, d: str(p.cache)),
    Case("train-damaged-cache", "saekit",
         lambda p, d: ["train", "--cache", str(_damaged_cache(p, d)), "--out", str(_out(d)), "--d-sae", "32",
                       "--device", "cpu", "--no-progress"],
         lambda p, d: "shard_00000.safetensors"),
    # ---------------------------------------------------------------- segcompass
    Case("train-sae-of-another-layer", "segcompass",
         lambda p, d: _train(p, d, sae_layer=2), lambda p, d: "--sae-layer 2"),
    Case("train-negative-threads", "segcompass", lambda p, d: _train(p, d, "--threads", "-3"),
         lambda p, d: "--threads"),
    Case("train-device-cuda-on-cpu-torch", "segcompass", lambda p, d: _train(p, d, "--device", "cuda"),
         lambda p, d: "--device cuda"),
    Case("train-policy-folder-missing", "segcompass",
         lambda p, d: ["train", "--policy", str(d / "nowhere"), "--sae", str(p.checkpoint / "sae"),
                       "--sae-layer", "1", "--out", str(_out(d)), "--no-progress"],
         lambda p, d: "--policy"),
    Case("predict-truncated-head", "segcompass",
         lambda p, d: _predict(p, d, _checkpoint_with(p, d, "head.safetensors", truncate)),
         lambda p, d: "head.safetensors"),
    Case("predict-missing-sam-weights", "segcompass",
         lambda p, d: _predict(p, d, _checkpoint_with(p, d, "sam/model.safetensors", Path.unlink)),
         lambda p, d: "model.safetensors"),
    Case("predict-truncated-sam-config", "segcompass",
         lambda p, d: _predict(p, d, _checkpoint_with(p, d, "sam/config.json", truncate)),
         lambda p, d: "config.json"),
    Case("predict-segcompass-json-wrong-shape", "segcompass",
         lambda p, d: _predict(p, d, _checkpoint_with(p, d, "segcompass.json",
                                                       lambda f: f.write_text('{"config": []}'))),
         lambda p, d: "segcompass.json"),
    Case("predict-image-is-a-folder", "segcompass", lambda p, d: _predict(p, d, None, p.root),
         lambda p, d: str(p.root)),
    Case("predict-image-1000x3", "segcompass", lambda p, d: _predict(p, d, None, _aspect_image(d)),
         lambda p, d: "sliver.png"),
    Case("predict-decompression-bomb", "segcompass", lambda p, d: _predict(p, d, None, _bomb_image(d)),
         lambda p, d: "bomb.png", _small_pixel_limit),
    Case("predict-out-holds-another-run", "segcompass",
         lambda p, d: _predict(p, d) if _file(_out(d) / "report.html", "old") else [],
         lambda p, d: str(_out(d))),
    Case("predict-out-is-a-file", "segcompass", lambda p, d: _predict(p, d) if _file(_out(d)) else [],
         lambda p, d: str(_out(d))),
    Case("predict-permission-denied", "segcompass", lambda p, d: _predict(p, d),
         lambda p, d: "out.tmp", _permission_denied_on_folder),
    Case("score-empty-prediction-folder", "segcompass",
         lambda p, d: ["score", str(p.gt), str(_out(d).mkdir() or _out(d))], lambda p, d: str(_out(d))),
    Case("score-polygon-at-1e30", "segcompass",
         lambda p, d: ["score", str(_gt_with_polygon(d, [[1, 1], [1e30, 1], [5, 5]])), str(p.gt)],
         lambda p, d: "a.json"),
    Case("score-prediction-folder-is-a-file", "segcompass",
         lambda p, d: ["score", str(p.gt), str(_file(_out(d)))], lambda p, d: str(_out(d))),
    Case("eval-truncated-head", "segcompass",
         lambda p, d: ["eval", "--checkpoint", str(_checkpoint_with(p, d, "head.safetensors", truncate)),
                       "--out", str(_out(d)), "--n", "1", "--device", "cpu", "--no-progress"],
         lambda p, d: "head.safetensors"),
    Case("sam-pretrain-negative-threads", "segcompass",
         lambda p, d: ["sam-pretrain", "--out", str(_out(d)), "--threads", "-3", "--no-progress"],
         lambda p, d: "--threads"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_refuses_in_one_line_and_writes_nothing(case: Case, pieces: Pieces, tmp_path, monkeypatch, capsys):
    from saekit.cli import main as saekit_main
    from segcompass.cli import main as segcompass_main

    argv = case.argv(pieces, tmp_path)
    named = case.named(pieces, tmp_path)
    before = snapshot(tmp_path)
    if case.fault is not None:
        case.fault(monkeypatch, tmp_path)
    capsys.readouterr()
    code = (saekit_main if case.cli == "saekit" else segcompass_main)(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{case.cli}: error:")]
    assert code == 2, err[-3000:]
    assert "Traceback" not in err
    assert len(errors) == 1, err[-3000:]
    assert named in errors[0], errors[0]
    assert snapshot(tmp_path) == before, errors[0]
