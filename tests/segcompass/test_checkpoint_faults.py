"""Issue 25 on SegCompass's side: a checkpoint carries its compatibility record and file sizes
and refuses mismatched or damaged pieces (item 1); outputs are written as a unit and logs
resume without repeating steps (item 4)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from fault_pieces import snapshot
from saekit.errors import UserError
from segcompass.cli import main
from segcompass.model import CONFIG_FILE, SegCompassConfig, build_segcompass, load_segcompass, policy_compat
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401 (session fixture)


def test_train_refuses_an_sae_of_another_layer(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    """The trial: `train --sae <SAE of layer 1> --sae-layer 2` trained, and the checkpoint said
    layer 2 while its SAE said layer 1."""
    out = tmp_path / "run"
    argv = ["train", "--policy", str(tiny_checkpoint / "policy"), "--sae", str(tiny_checkpoint / "sae"),
            "--sae-layer", "2", "--out", str(out), "--steps", "1", "--batch-size", "1", "--no-progress"]
    assert main(argv) == 2
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("segcompass: error:")]
    assert "layer 1 vs 2" in err and str(tiny_checkpoint / "sae") in err
    assert "--policy" in err and "--allow-mismatch" in err
    assert not out.exists()
    config = SegCompassConfig(sae_layer=2)
    model = build_segcompass(config, policy_path=tiny_checkpoint / "policy", sae_path=tiny_checkpoint / "sae",
                             allow_mismatch=True)  # a knowing mix is still possible
    assert model.config.sae_layer == 2


def test_checkpoint_records_its_pieces_and_refuses_a_swapped_policy(tiny_checkpoint, tmp_path):  # noqa: F811
    meta = json.loads((tiny_checkpoint / CONFIG_FILE).read_text())
    model = load_segcompass(tiny_checkpoint)
    assert meta["compat"] == policy_compat(model.loaded, TINY_SAE_LAYER)
    assert meta["compat"]["layer"] == TINY_SAE_LAYER and meta["compat"]["fingerprint"].startswith("bf16:")
    assert meta["files"]["head.safetensors"] == (tiny_checkpoint / "head.safetensors").stat().st_size
    assert {"sam/model.safetensors", "sam/config.json", "policy/model.safetensors",
            "sae/sae_weights.safetensors"} <= set(meta["files"])
    # Another policy below the SAE layer (same shapes and sizes): the SAE's inputs changed.
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, copy)
    weights = load_file(str(copy / "policy" / "model.safetensors"))
    name = next(k for k in weights if "layers.0." in k and k.endswith("weight") and weights[k].dim() == 2)
    weights[name] = weights[name] + 0.01
    save_file(weights, str(copy / "policy" / "model.safetensors"), metadata={"format": "pt"})
    assert (copy / "policy" / "model.safetensors").stat().st_size == meta["files"]["policy/model.safetensors"]
    with pytest.raises(UserError, match=r"does not fit its policy/ folder \(.*\): fingerprint"):
        load_segcompass(copy)


def _image(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_predict_output_is_one_run_never_a_mix(tiny_checkpoint, tmp_path, monkeypatch, capsys):  # noqa: F811
    """The trial: predicting into a used folder left the previous run's heatmap_slot1-3.png beside
    the new files, and a failed run left new masks beside the old report.html."""
    image, out = _image(tmp_path), tmp_path / "out"
    base = ["predict", "--checkpoint", str(tiny_checkpoint), str(image), "--out", str(out), "--device", "cpu",
            "--max-new-tokens", "4"]
    assert main(base[:4] + ["all the things", "--multi"] + base[4:]) == 0
    multi_files = {p.name for p in out.iterdir()}
    assert "heatmap_slot3.png" in multi_files
    first = snapshot(out)
    assert main(base[:4] + ["the thing"] + base[4:]) == 2  # a used folder: refused, untouched
    assert "--overwrite" in capsys.readouterr().err and snapshot(out) == first

    import segcompass.report

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out) + ".tmp/report.html")
    monkeypatch.setattr(segcompass.report, "report_html", broken)
    assert main(base[:4] + ["the thing", "--overwrite"] + base[4:]) == 2  # fails half-way: old run intact
    monkeypatch.undo()
    assert snapshot(out) == first and not (tmp_path / "out.tmp").exists()
    assert main(base[:4] + ["the thing", "--overwrite"] + base[4:]) == 0
    files = {p.name for p in out.iterdir()}
    assert "heatmap_slot1.png" not in files and files < multi_files  # single prompt: one slot, no stale ones
    assert json.loads((out / "prediction.json").read_text())["instruction"] == "the thing"


def _train_cfg(checkpoint, out, **overrides):
    from segcompass.training.supervised import TrainConfig

    values = dict(policy=checkpoint / "policy", sae=checkpoint / "sae", sae_layer=TINY_SAE_LAYER, out=out,
                  steps=4, batch_size=1, checkpoint_every=2, log_every=1, threads=1)
    return TrainConfig(**(values | overrides))


def _steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_resume_from_the_checkpoint_and_a_fresh_run_starts_them_again(tiny_checkpoint, tmp_path):  # noqa: F811
    """The trial: a kill between a log line and the next checkpoint repeated steps on resume, and
    --no-resume appended a second run after the first."""
    from segcompass.training.supervised import train

    out = tmp_path / "run"
    train(_train_cfg(tiny_checkpoint, out), progress=False, stop_after=3)  # logged 3, checkpoint at 2
    assert _steps(out) == [1, 2, 3]
    with (out / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "lo')  # and a line cut short by the kill
    train(_train_cfg(tiny_checkpoint, out), progress=False)
    assert _steps(out) == [1, 2, 3, 4]
    train(_train_cfg(tiny_checkpoint, out, resume=False, steps=2, checkpoint_every=1), progress=False)
    assert _steps(out) == [1, 2]


def test_normal_permissions_on_weights(tiny_checkpoint):  # noqa: F811
    """The trial: weights were written 0600, so another user was told 'No such file or directory'."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    for name in ("head.safetensors", "sam/model.safetensors", "policy/model.safetensors",
                 "sae/sae_weights.safetensors"):
        assert (tiny_checkpoint / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
