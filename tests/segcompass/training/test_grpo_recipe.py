"""GRPO runs with the recipe flags of issue 21 on the tiny random SegCompass: every flag at once
(init, seg on judged-correct rollouts, top-p, entropy bonus, dynamic sampling, consistency reward,
first-errors curriculum) logs its signals, draws the curves, reuses the sampled rollouts, and
resumes to the uninterrupted run's bytes; --seg-on teacher and advantage train the head."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segcompass.model import load_segcompass, save_segcompass
from segcompass.training import curriculum
from segcompass.training.grpo_trainer import SegCompassGRPOTrainer
from segcompass.training.supervised import TrainConfig, train
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401  (session fixture)

SIGNALS = ("reward/frac_zero_std_groups", "entropy", "kl", "clip_fraction", "dynamic/draws",
           "dynamic/zero_spread_drawn", "reward/consistency")


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    """The tiny checkpoint with its head moved: what --init-from starts from."""
    model = load_segcompass(tiny_checkpoint)
    with torch.no_grad():
        for param in model.head.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.01)
    return save_segcompass(model, tmp_path_factory.mktemp("grpo-init") / "trained", sae_path=tiny_checkpoint / "sae")


def _cfg(ckpt: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(policy=ckpt / "policy", sae=ckpt / "sae", out=out, mode="rl+seg", sae_layer=TINY_SAE_LAYER,
                    steps=2, group_size=4, rl_prompts=2, max_new_tokens=16, checkpoint_every=1, log_every=1,
                    threads=1, device="cpu", seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def _recipe(trained: Path) -> dict:
    # format-only reward: the random policy seldom writes the format, so most groups are flat and
    # dynamic sampling has groups to replace
    return dict(init_from=trained, seg_on="correct", top_p=0.9, entropy_coef=0.01, dynamic_sampling=2,
                consistency_reward_weight=0.2, curriculum="first-errors", format_reward_weight=1.0,
                mask_reward_weight=0.0)


def _records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward/total" in r]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    tensors = {f"policy/{k}": v for k, v in load_file(str(final / "policy" / "model.safetensors")).items()}
    tensors.update({f"head/{k}": v for k, v in load_file(str(final / "head.safetensors")).items()})
    tensors.update({f"sam/{k}": v for k, v in load_file(str(final / "sam" / "model.safetensors")).items()})
    return tensors


@pytest.fixture(scope="module")
def recipe_run(tiny_checkpoint, trained, tmp_path_factory):  # noqa: F811
    calls = []
    original = SegCompassGRPOTrainer._keyed_generate

    def counted(self, prompt_ids, fields, seeds):
        calls.append(len(seeds))
        return original(self, prompt_ids, fields, seeds)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(curriculum, "SCORING_SAMPLES", 6)
        patch.setattr(SegCompassGRPOTrainer, "_keyed_generate", counted)
        out = tmp_path_factory.mktemp("grpo-recipe") / "full"
        final = train(_cfg(tiny_checkpoint, out, **_recipe(trained)), progress=False)
    return out, final, calls


def test_recipe_run_logs_its_signals_and_draws_the_curves(recipe_run):
    out, final, calls = recipe_run
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2]
    for name in SIGNALS:
        assert all(name in r for r in records), name
    assert records[0]["dynamic/draws"] == 2 and records[0]["dynamic/zero_spread_drawn"] == 1.0  # nothing to keep
    assert all(r["reward/frac_zero_std_groups"] <= r["dynamic/zero_spread_drawn"] for r in records)
    # the batch and each draw are sampled once; TRL's generation reuses those rollouts
    assert len(calls) == sum(1 + r["dynamic/draws"] for r in records) and calls[0] == 2 * 4
    assert (out / "grpo_curves.png").stat().st_size > 1000
    weights = json.loads((out / curriculum.CURRICULUM_FILE).read_text())["family_weights"]
    assert sum(weights.values()) == pytest.approx(1.0)
    assert (final / "head.safetensors").is_file()


def test_recipe_run_resumes_to_the_uninterrupted_run(recipe_run, tiny_checkpoint, trained, tmp_path,
                                                     monkeypatch):  # noqa: F811
    out, final, _ = recipe_run
    monkeypatch.setattr(curriculum, "SCORING_SAMPLES", 6)
    cfg = _cfg(tiny_checkpoint, tmp_path, **_recipe(trained))
    train(cfg, progress=False, stop_after=1)
    resumed = train(cfg, progress=False)
    a, b = _weights(final), _weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    for name in ("loss", "kl", "entropy", "reward/total", "dynamic/zero_spread_drawn"):
        assert [r[name] for r in _records(tmp_path)] == [r[name] for r in _records(out)], name


@pytest.mark.parametrize("seg_on", ["teacher", "advantage"])
def test_seg_on_teacher_and_advantage_train_the_head(tiny_checkpoint, trained, tmp_path, seg_on):  # noqa: F811
    final = train(_cfg(tiny_checkpoint, tmp_path, steps=1, seg_on=seg_on, init_from=trained), progress=False)
    record = _records(tmp_path)[0]
    assert record["seg/total"] > 0
    start, end = load_file(str(trained / "head.safetensors")), load_file(str(final / "head.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)
