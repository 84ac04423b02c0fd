"""Training on real-format datasets (RefCOCO, gRefCOCO, ReasonSeg roots built from the
voc-labelme photos): `--mode seg` on the policy's own responses, `--mode rl+seg` (GRPO), weighted
mixtures, identical resume after an interruption, and responses without `<REF_POS>` skipped
and counted.

The random tiny policy writes ': : : …' and never a `<REF_POS>`; `ref_policy` is the same
policy with the `<REF_POS>` embedding (tied to its output row) set to 1.1 x that of ':', so
that greedy responses carry concentration tokens and sampled ones sometimes do.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loaders_fixtures import build_grefcoco, build_reasonseg, build_refcoco
from saekit.models import load_model, save_pretrained
from segcompass.training.supervised import TrainConfig, train
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401 (session fixture)


@pytest.fixture(scope="module")
def roots(fixtures_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("real")
    build_reasonseg(fixtures_dir, base / "ReasonSeg" / "train")
    return {"refcoco": build_refcoco(fixtures_dir, base / "refer"),
            "grefcoco": build_grefcoco(fixtures_dir, base / "gref"), "reasonseg": base / "ReasonSeg"}


@pytest.fixture(scope="module")
def ref_policy(tiny_checkpoint, tmp_path_factory):  # noqa: F811
    loaded = load_model("tiny-llava", tiny_checkpoint / "policy")
    tokenizer, embeddings = loaded.tokenizer, loaded.model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[tokenizer.convert_tokens_to_ids("<REF_POS>")] = 1.1 * embeddings[tokenizer.convert_tokens_to_ids(":")]
    return save_pretrained(loaded, tmp_path_factory.mktemp("ref-policy") / "policy")


def _cfg(policy: Path, sae: Path, out: Path, data, **overrides) -> TrainConfig:
    settings = dict(policy=policy, sae=sae, out=out, data=tuple(data), sae_layer=TINY_SAE_LAYER, steps=2,
                    batch_size=2, log_every=1, checkpoint_every=1, threads=1, device="cpu", max_new_tokens=8)
    settings.update(overrides)
    return TrainConfig(**settings)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(final: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in ("head.safetensors", "sam/model.safetensors", "policy/model.safetensors"):
        tensors.update({f"{name}:{k}": v for k, v in load_file(str(final / name)).items()})
    return tensors


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind", ["refcoco", "grefcoco", "reasonseg"])
def test_seg_trains_on_the_policys_own_responses(kind, roots, ref_policy, tiny_checkpoint, tmp_path):  # noqa: F811
    final = train(_cfg(ref_policy, tiny_checkpoint / "sae", tmp_path, [f"{kind}:{roots[kind]}"]), progress=False)
    records = _records(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert records[-1]["self_generated"] == 4 and records[-1]["skipped_no_ref"] == 0
    assert all(r["loss"] > 0 and r["targets"] >= 1 for r in records)
    start = load_file(str(tiny_checkpoint / "head.safetensors"))  # same seed: the same initial head
    end = load_file(str(final / "head.safetensors"))
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_responses_without_ref_tokens_are_skipped_and_counted(roots, tiny_checkpoint, tmp_path):  # noqa: F811
    final = train(_cfg(tiny_checkpoint / "policy", tiny_checkpoint / "sae", tmp_path,
                       [f"refcoco:{roots['refcoco']}"]), progress=False)
    records = _records(tmp_path)
    assert all(r["skipped_step"] for r in records) and records[-1]["skipped_no_ref"] == 4
    start, end = load_file(str(tiny_checkpoint / "head.safetensors")), load_file(str(final / "head.safetensors"))
    assert all(torch.equal(start[k], end[k]) for k in start)  # no usable response: no update


@pytest.mark.parametrize("mode", ["seg", "rl+seg"])
def test_mixture_resumes_identically_after_an_interruption(mode, roots, ref_policy, tiny_checkpoint, tmp_path):  # noqa: F811
    data = [f"refcoco:{roots['refcoco']}@1", f"grefcoco:{roots['grefcoco']}@1", f"reasonseg:{roots['reasonseg']}@1"]
    extra = (dict(responses="sampled", temperature=0.1, batch_size=3, steps=3) if mode == "seg" else
             dict(mode="rl+seg", group_size=2, rl_prompts=2, steps=2, temperature=0.5))

    def cfg(out):
        return _cfg(ref_policy, tiny_checkpoint / "sae", out, data, **extra)

    full = train(cfg(tmp_path / "full"), progress=False)
    stopped = train(cfg(tmp_path / "resumed"), progress=False, stop_after=1)
    assert not (tmp_path / "resumed" / "final").exists() and stopped.is_dir()
    resumed = train(cfg(tmp_path / "resumed"), progress=False)
    _assert_same(_weights(full), _weights(resumed))
    a, b = _records(tmp_path / "full"), _records(tmp_path / "resumed")
    if mode != "seg":  # TRL's log ends with a run summary line
        a, b = [r for r in a if "reward/total" in r], [r for r in b if "reward/total" in r]
        assert [r["step"] for r in a] == [1, 2]
    names = ("loss", "skipped_no_ref", "self_generated") if mode == "seg" else ("loss", "reward/total", "grad_norm")
    for name in names:
        assert [r.get(name) for r in a] == [r.get(name) for r in b], name
    if mode == "seg":
        from segcompass.training.supervised import step_samples

        families = {s.family for step in range(3) for s in step_samples(cfg(tmp_path / "x"), step)}
        assert families == {"refcoco", "grefcoco", "reasonseg"}
        assert 0 < a[-1]["skipped_no_ref"] < 9 and a[-1]["self_generated"] == 9


def test_train_cli_on_a_dataset(roots, ref_policy, tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from segcompass.cli import main

    code = main(["train", "--policy", str(ref_policy), "--sae", str(tiny_checkpoint / "sae"), "--sae-layer", "1",
                 "--data", f"reasonseg:{roots['reasonseg']}@2", f"refcoco:{roots['refcoco']}", "--steps", "1",
                 "--batch-size", "2", "--max-new-tokens", "8", "--threads", "1", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "own responses: 2, skipped without <REF_POS>: 0" in out
    assert f"--data reasonseg:{roots['reasonseg']} --split val" in out
    assert main(["train", "--policy", str(ref_policy), "--sae", str(tiny_checkpoint / "sae"),
                 "--data", f"reasonseg:{roots['reasonseg']}", "--responses", "teacher", "--out", str(tmp_path)]) == 2
