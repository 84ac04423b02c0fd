"""Batches built ahead in worker processes are the batches built inline, step for step."""

import functools

import pytest
import torch
from safetensors.torch import load_file

from segcompass.world.prefetch import resolve_workers, step_batches
from segcompass.world.warmstart import CHECKPOINT_DIR, WEIGHTS_FILE, WarmstartConfig, _step_batch, build_policy, train
from test_warmstart import TINY


def _noisy(seed: int, step: int) -> dict:
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    return {"step": step, "x": torch.randn(3, 4, generator=generator)}


def test_workers_yield_the_inline_batches_in_order():
    build = functools.partial(_noisy, 5)
    inline = list(step_batches(build, 3, 11, workers=0))
    ahead = list(step_batches(build, 3, 11, workers=2))
    assert [b["step"] for b in ahead] == list(range(3, 11))
    for a, b in zip(inline, ahead):
        assert torch.equal(a["x"], b["x"])


def test_teacher_batches_from_workers_equal_inline_ones(tmp_path):
    cfg = WarmstartConfig(out=tmp_path, steps=6, **TINY)
    build = functools.partial(_step_batch, cfg, build_policy(cfg))
    inline, ahead = list(step_batches(build, 2, 6, 0)), list(step_batches(build, 2, 6, 2))
    assert len(inline) == len(ahead) == 4
    for a, b in zip(inline, ahead):
        assert a.model_inputs.keys() == b.model_inputs.keys()
        for key in a.model_inputs:
            assert torch.equal(a.model_inputs[key], b.model_inputs[key]), key
        for x, y in zip(a[1:], b[1:]):
            assert torch.equal(x, y)


def test_warm_start_with_workers_trains_the_same_weights(tmp_path):
    for workers in (0, 2):
        train(WarmstartConfig(out=tmp_path / str(workers), steps=3, eval_samples=0, data_workers=workers,
                              **TINY | {"vision_steps": 3}), progress=False)
    inline, ahead = (load_file(tmp_path / w / CHECKPOINT_DIR / WEIGHTS_FILE) for w in ("0", "2"))
    assert inline.keys() == ahead.keys()
    for name in inline:
        assert torch.equal(inline[name], ahead[name]), name


def test_auto_workers_only_off_the_cpu():
    assert resolve_workers(-1, torch.device("cpu")) == 0
    assert resolve_workers(-1, torch.device("cuda")) == 4
    assert resolve_workers(-1, torch.device("mps")) == 0
    assert resolve_workers(3, torch.device("cpu")) == 3
    with pytest.raises(ValueError, match="-2"):
        resolve_workers(-2, torch.device("cpu"))


def test_config_refuses_negative_workers_by_name():
    from saekit.errors import UserError

    with pytest.raises(UserError, match="--data-workers"):
        WarmstartConfig(data_workers=-3)
