"""The GRPO recipe flags that need no GRPO run (issue 21): where each flag is refused, --init-from
(what it loads, what it refuses, a seg run starting from it), --curriculum first-errors (weights,
the keyed stream, resume reads the weights back) and the curves PNG. GRPO runs with the flags are
in test_grpo_recipe.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit.errors import UserError
from segcompass.model import build_segcompass, load_segcompass, save_segcompass
from segcompass.training import curriculum
from segcompass.training.init_from import check_init_checkpoint, init_from_checkpoint
from segcompass.training.supervised import TrainConfig, train
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401  (session fixture)


def _cfg(ckpt: Path, out: Path, **overrides) -> TrainConfig:
    settings = dict(policy=ckpt / "policy", sae=ckpt / "sae", out=out, sae_layer=TINY_SAE_LAYER, steps=1,
                    batch_size=2, log_every=1, checkpoint_every=1, threads=1, device="cpu", seed=1)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.mark.parametrize("overrides, message", [
    (dict(seg_on="correct"), r"--seg-on is for --mode rl\+seg"),
    (dict(mode="rl+seg", seg_on="teacher", data=("refcoco:/nowhere",)), "--seg-on teacher needs ground-truth"),
    (dict(mode="rl", consistency_reward_weight=0.2, data=("refcoco:/nowhere",)),
     "--consistency-reward-weight needs ground-truth reasoning"),
    (dict(consistency_reward_weight=0.2), "--consistency-reward-weight is for GRPO"),
    (dict(entropy_coef=0.01), "--entropy-coef is for GRPO"),
    (dict(mode="rl", dynamic_sampling=2, rollout_engine="vllm-colocate"), "--dynamic-sampling runs on one process"),
    (dict(mode="rl", top_p=0.0), "0 < --top-p <= 1"),
    (dict(curriculum="first-errors", data=("refcoco:/nowhere",)), "is not the world"),
])
def test_recipe_flags_are_refused_where_they_cannot_apply(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        _cfg(tmp_path, tmp_path / "out", **overrides)


@pytest.fixture(scope="module")
def trained(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    """A 'trained' checkpoint: the tiny one with its head, SAM and upper policy block moved."""
    model = load_segcompass(tiny_checkpoint)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for module in (model.head, model.sam, model.policy):
            for param in module.parameters():
                if param.requires_grad:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    directory = tmp_path_factory.mktemp("init") / "trained"
    save_segcompass(model, directory, sae_path=tiny_checkpoint / "sae")
    return directory


def _fresh(ckpt: Path, seed: int = 1):
    cfg = _cfg(ckpt, ckpt.parent / "unused")
    return build_segcompass(cfg.model_config(), policy_path=cfg.policy, sae_path=cfg.sae, seed=seed)


def _state(model) -> dict[str, torch.Tensor]:
    state = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    state.update({f"sam.{k}": v for k, v in model.sam.state_dict().items()})
    state.update({f"policy.{k}": v for k, v in model.policy.state_dict().items()})
    return state


def test_init_from_loads_the_checkpoints_head_sam_and_policy(tiny_checkpoint, trained):  # noqa: F811
    model = _fresh(tiny_checkpoint)
    before, target = _state(model), _state(load_segcompass(trained))
    assert any(not torch.equal(before[k], target[k]) for k in target if k.startswith("head."))
    init_from_checkpoint(model, trained, tiny_checkpoint / "sae")
    after = _state(model)
    for key, value in target.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert model.policy.config._name_or_path == str((trained / "policy").resolve())  # GRPO's reference


def _edited(trained: Path, tmp_path: Path, edit) -> Path:
    copy = tmp_path / "edited"
    shutil.copytree(trained, copy)
    meta = json.loads((copy / "segcompass.json").read_text())
    edit(meta, copy)
    (copy / "segcompass.json").write_text(json.dumps(meta))
    return copy


def _other_sae(meta, copy):
    weights = load_file(str(copy / "sae" / "sae_weights.safetensors"))
    weights["b_enc"] = weights["b_enc"] + 1.0
    from safetensors.torch import save_file

    save_file(weights, str(copy / "sae" / "sae_weights.safetensors"))
    meta["files"].pop("sae/sae_weights.safetensors", None)  # sizes agree anyway; the bytes differ


@pytest.mark.parametrize("edit, message", [
    (lambda meta, copy: meta["config"].update(policy_preset="llava-1.5-7b"), "field 'policy_preset' is 'llava-1.5-7b'"),
    (lambda meta, copy: meta["config"].update(sae_layer=2), "field 'sae_layer' is 2 there, 1 in this run"),
    (lambda meta, copy: meta["head"].update(d_sae=512), "head field 'd_sae' is 512 there, 256 in this run"),
    (lambda meta, copy: meta["head"].update(num_slots=6), "head field 'num_slots'"),
    (_other_sae, "field 'sae' differs"),
])
def test_init_from_refuses_a_checkpoint_of_another_make_in_one_line(tiny_checkpoint, trained, tmp_path, edit,
                                                                    message):  # noqa: F811
    copy = _edited(trained, tmp_path, edit)
    with pytest.raises(UserError, match=message) as info:
        check_init_checkpoint(_fresh(tiny_checkpoint), copy, tiny_checkpoint / "sae")
    assert "\n" not in str(info.value)


def test_seg_training_refuses_before_writing_and_starts_from_the_checkpoint(tiny_checkpoint, trained,
                                                                           tmp_path):  # noqa: F811
    bad = _edited(trained, tmp_path, lambda meta, copy: meta["head"].update(d_sae=512))
    with pytest.raises(UserError, match="head field 'd_sae'"):
        train(_cfg(tiny_checkpoint, tmp_path / "refused", init_from=bad), progress=False)
    assert not (tmp_path / "refused").exists()
    # one step at a vanishing learning rate: the final head is the checkpoint's
    final = train(_cfg(tiny_checkpoint, tmp_path / "run", init_from=trained, lr=1e-12), progress=False)
    got, want = load_file(str(final / "head.safetensors")), load_file(str(trained / "head.safetensors"))
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


# ---- --curriculum first-errors --------------------------------------------------------------

def test_template_of_is_the_template_make_sample_draws():
    from segcompass.world.scenes import make_sample, template_of

    for index in range(25):
        sample = make_sample("train", index, 3)
        assert template_of("train", index, 3).template_id == sample.template_id


def test_family_weights_from_a_warm_starts_eval_json(tmp_path):
    from segcompass.world.scenes import SPLITS

    record = {"groups": {"family/direct": {"n": 10}, "family/spatial": {"n": 20}, "all": {"n": 30}},
              "teacher_forced": {"first_errors": {"direct": [["the C S . [the]", 4], ["x [y]", 1]]}}}
    (tmp_path / "eval.json").write_text(json.dumps(record))
    rates = curriculum.error_rates_from_eval(tmp_path / "eval.json")
    assert rates == {"direct": 0.5, "spatial": 0.0}
    weights = curriculum.family_weights(rates)
    base = SPLITS["train"].family_weights
    raw = {f: p * (rates.get(f, 0.0) + curriculum.FLOOR) for f, p in base.items()}
    assert weights == pytest.approx({f: w / sum(raw.values()) for f, w in raw.items()})
    assert weights["direct"] > base["direct"] and weights["spatial"] < base["spatial"]
    (tmp_path / "plain.json").write_text(json.dumps({"groups": {}}))
    assert curriculum.error_rates_from_eval(tmp_path / "plain.json") is None  # no teacher-forced part


def test_curriculum_stream_draws_families_by_weight_keyed_by_position():
    from segcompass.world.scenes import template_of

    weights = {"direct": 0.7, "multi": 0.2, "spatial": 0.1}
    stream = curriculum.CurriculumStream(weights, seed=4)
    families = [stream.family(g) for g in range(600)]
    shares = {f: families.count(f) / 600 for f in weights}
    assert shares == pytest.approx(weights, abs=0.05)
    for g in range(40):
        assert template_of("train", stream.index(g), 4).family == stream.family(g)
    again = curriculum.CurriculumStream(dict(reversed(list(weights.items()))), seed=4)
    assert [again.index(g) for g in range(40)] == [stream.index(g) for g in range(40)]
    assert stream[7].sample_id == f"train-4-{stream.index(7):07d}"


def test_curriculum_weights_are_written_once_and_read_back_on_resume(tiny_checkpoint, tmp_path,
                                                                     monkeypatch):  # noqa: F811
    monkeypatch.setattr(curriculum, "SCORING_SAMPLES", 6)
    cfg = _cfg(tiny_checkpoint, tmp_path, curriculum="first-errors")
    model = load_segcompass(tiny_checkpoint)
    weights = curriculum.curriculum_weights(cfg, model.loaded, tmp_path, resuming=False)  # no eval.json: scored
    record = json.loads((tmp_path / curriculum.CURRICULUM_FILE).read_text())
    assert record["source"].startswith("scoring pass") and record["family_weights"] == weights
    assert sum(weights.values()) == pytest.approx(1.0)
    record["family_weights"] = {"direct": 1.0}
    (tmp_path / curriculum.CURRICULUM_FILE).write_text(json.dumps(record))
    assert curriculum.curriculum_weights(cfg, model.loaded, tmp_path, resuming=True) == {"direct": 1.0}
    with pytest.raises(UserError, match="curriculum is lost"):
        curriculum.curriculum_weights(cfg, model.loaded, tmp_path / "elsewhere", resuming=True)


def test_seg_run_with_curriculum_reads_the_curriculum_stream(tiny_checkpoint, tmp_path):  # noqa: F811
    from segcompass.training.supervised import step_samples, train_stream

    (tmp_path / curriculum.CURRICULUM_FILE).write_text(json.dumps({"family_weights": {"multi": 1.0}}))
    cfg = _cfg(tiny_checkpoint, tmp_path, curriculum="first-errors", steps=2)
    stream = train_stream(cfg, 4, curriculum.curriculum_weights(cfg, None, tmp_path, resuming=True))
    assert {s.family for step in range(2) for s in step_samples(cfg, step, stream)} == {"multi"}


# ---- the curves ---------------------------------------------------------------------------------

def test_grpo_curves_png_from_metrics(tmp_path):
    from PIL import Image

    from segcompass.training.plots import plot_grpo_curves, read_curves

    lines = [json.dumps({"step": s, "reward/total": 0.1 * s, "reward/mask": 0.05 * s, "entropy": 0.08,
                         "kl": 0.001 * s, "clip_fraction": 0.0, "reward/frac_zero_std_groups": 0.5})
             for s in range(1, 6)]
    lines += ["{not json", json.dumps({"step": 5, "train_runtime": 3.0})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    curves = read_curves(tmp_path / "metrics.jsonl")
    assert curves["kl"][0] == [1, 2, 3, 4, 5] and "dynamic/zero_spread_drawn" not in curves
    png = plot_grpo_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png", title="test")
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 500
    assert plot_grpo_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
