"""GRPO training on TRL (modes rl, rl+seg) with a tiny random SegCompass: what trains, what is
logged, resume == uninterrupted, and 2 data-parallel processes (gloo) == 1 process."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.errors import UserError
from segcompass.training.supervised import TrainConfig, train
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401  (session fixture)

LOGGED = ("reward/format", "reward/mask", "reward/total", "advantage/std", "kl", "clip_fraction",
          "seg/heatmap_bce", "seg/mask_dice", "seg/conf", "loss", "grad_norm", "rollouts")


def _cfg(ckpt: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(policy=ckpt / "policy", sae=ckpt / "sae", out=out, mode="rl+seg", sae_layer=TINY_SAE_LAYER,
                    steps=3, group_size=4, rl_prompts=2, max_new_tokens=16, checkpoint_every=2, log_every=1,
                    threads=1, device="cpu", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _records(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "reward/total" in r]  # the last line is HF's run summary


def _weights(final: Path) -> dict[str, torch.Tensor]:
    tensors = {f"policy/{k}": v for k, v in load_file(str(final / "policy" / "model.safetensors")).items()}
    tensors.update({f"head/{k}": v for k, v in load_file(str(final / "head.safetensors")).items()})
    tensors.update({f"sam/{k}": v for k, v in load_file(str(final / "sam" / "model.safetensors")).items()})
    return tensors


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


@pytest.fixture(scope="module")
def full_run(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("grpo") / "full"
    final = train(_cfg(tiny_checkpoint, out), progress=False)
    return out, final


def test_joint_run_trains_above_the_sae_layer_and_logs(full_run, tiny_checkpoint):  # noqa: F811
    out, final = full_run
    assert final == out / "final"
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in LOGGED:
        assert all(name in r for r in records), name
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # rollouts of step 1 come from the reference
    assert records[-1]["rollouts"] == 3 * 2 * 4
    start, end = _weights(tiny_checkpoint), _weights(final)
    # frozen: vision tower, embeddings, blocks 1..L; trained: blocks above L, head, SAM decoder
    def key(suffix: str) -> str:
        return next(k for k in start if k.startswith("policy/") and k.endswith(suffix))

    for frozen in ("layers.0.mlp.up_proj.weight", "embed_tokens.weight", "patch_embedding.weight"):
        assert torch.equal(start[key(frozen)], end[key(frozen)]), frozen
    assert not torch.equal(start[key("layers.1.mlp.up_proj.weight")], end[key("layers.1.mlp.up_proj.weight")])
    changed = [k for k in start if k.startswith("head/") and not torch.equal(start[k], end[k])]
    assert changed


def test_rl_alone_never_moves_the_head(tiny_checkpoint, tmp_path):  # noqa: F811
    final = train(_cfg(tiny_checkpoint, tmp_path, mode="rl", steps=2), progress=False)
    start, end = _weights(tiny_checkpoint), _weights(final)
    assert all(torch.equal(start[k], end[k]) for k in start if k.startswith(("head/", "sam/")))
    assert "seg/total" not in _records(tmp_path)[0]


def test_resume_after_interrupt_reproduces_the_uninterrupted_run(full_run, tiny_checkpoint, tmp_path):  # noqa: F811
    out, final = full_run
    stopped = train(_cfg(tiny_checkpoint, tmp_path), progress=False, stop_after=2)
    assert stopped.name == "checkpoint-2" and not (tmp_path / "final").exists()
    resumed = train(_cfg(tiny_checkpoint, tmp_path), progress=False)
    _assert_same(_weights(final), _weights(resumed), atol=0)
    for name in ("loss", "grad_norm", "kl", "reward/total"):
        assert [r[name] for r in _records(tmp_path)] == [r[name] for r in _records(out)], name


def test_changed_settings_refuse_to_resume(tiny_checkpoint, tmp_path):  # noqa: F811
    train(_cfg(tiny_checkpoint, tmp_path, steps=2), progress=False, stop_after=1)
    with pytest.raises(UserError, match=r"checkpoint-1 was written with other settings: field 'kl_coef' was 0\.2, now 0\.5"):
        train(_cfg(tiny_checkpoint, tmp_path, steps=2, kl_coef=0.5), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(full_run, tiny_checkpoint, tmp_path):  # noqa: F811
    """torchrun, 2 CPU processes (gloo), 4 rollouts each = the 1-process run's 8 per step."""
    out, final = full_run
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        from pathlib import Path
        # the repo root first: tests/segcompass would otherwise shadow the segcompass package
        sys.path[:0] = [{str(Path(__file__).resolve().parents[3])!r}, {str(Path(__file__).resolve().parent)!r},
                        {str(Path(__file__).resolve().parents[2])!r}]
        from test_grpo import _cfg
        from segcompass.training.supervised import train
        train(_cfg(Path({str(tiny_checkpoint)!r}), Path({str(tmp_path / "ddp")!r})), progress=False)
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(script)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _records(out), _records(tmp_path / "ddp")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for name in ("loss", "grad_norm", "reward/total", "seg/total", "kl"):
            assert b[name] == pytest.approx(a[name], rel=1e-4, abs=1e-6), (a["step"], name)
    _assert_same(_weights(final), _weights(tmp_path / "ddp" / "final"), atol=1e-5)


def test_gradient_accumulation_over_whole_groups_matches_one_micro_batch(full_run, tiny_checkpoint, tmp_path):  # noqa: F811
    out, final = full_run
    train(_cfg(tiny_checkpoint, tmp_path, grad_accum=2), progress=False)  # 2 micro-batches of one group each
    for a, b in zip(_records(out), _records(tmp_path)):
        for name in ("loss", "grad_norm", "reward/total"):
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-7), (a["step"], name)
    with pytest.raises(UserError, match="whole groups"):
        _cfg(tiny_checkpoint, tmp_path, grad_accum=4)  # 2 rollouts per micro-batch < group size 4
