"""`segcompass ablate`: equal budgets across runs, the convergence measure, and a whole tiny
`modes` study through the CLI (CSV + markdown, finished runs skipped on a re-run)."""

import csv
import json

import pytest

from segcompass.experiments.ablate import AblateConfig, rollouts_to_convergence, study_runs, train_config
from segcompass_tiny import TINY_SAE_LAYER, tiny_checkpoint  # noqa: F401  (session fixture)


def _cfg(ckpt, out, study="modes", **overrides):
    settings = dict(study=study, policy=ckpt / "policy", sae=ckpt / "sae", out=out, sae_layer=TINY_SAE_LAYER,
                    steps=2, sequences=4, group_size=2, eval_n=2, eval_splits=("reason", "multi"),
                    threads=1, device="cpu")
    settings.update(overrides)
    return AblateConfig(**settings)


@pytest.mark.parametrize("study, names", [
    ("modes", ["seg", "rl", "rl+seg"]),
    ("reward", ["format-only", "mask-only", "format+mask"]),
    ("group-size", ["G=2", "G=4", "G=8"]),
    ("backbone", ["sam-tiny-16", "sam-tiny-32"]),
])
def test_every_run_of_a_study_has_the_same_budget(tmp_path, study, names):
    cfg = AblateConfig(study=study, policy=tmp_path, sae=tmp_path, steps=10, sequences=16)
    runs = study_runs(cfg)
    assert [r.name for r in runs] == names
    for run in runs:
        t = train_config(cfg, run)
        assert t.steps == 10
        assert (t.batch_size if t.mode == "seg" else t.rl_prompts * t.group_size) == 16


def test_reward_and_group_size_settings(tmp_path):
    reward = {r.name: r.settings for r in study_runs(AblateConfig("reward", tmp_path, tmp_path))}
    assert (reward["format-only"]["format_reward_weight"], reward["format-only"]["mask_reward_weight"]) == (1.0, 0.0)
    assert (reward["format+mask"]["format_reward_weight"], reward["format+mask"]["mask_reward_weight"]) == (0.3, 0.7)
    sizes = {r.name: r.settings["rl_prompts"] for r in study_runs(AblateConfig("group-size", tmp_path, tmp_path))}
    assert sizes == {"G=2": 8, "G=4": 4, "G=8": 2}


def test_real_data_reaches_every_run(tmp_path):
    """--data / --eval-data: every run of a study trains on the given sources."""
    cfg = AblateConfig("modes", tmp_path, tmp_path, data=("refcoco:/r@0.5", "reasonseg:/d@0.5"),
                       eval_data="reasonseg:/d", eval_splits=("val",))
    assert {train_config(cfg, run).data for run in study_runs(cfg)} == {("refcoco:/r@0.5", "reasonseg:/d@0.5")}


def test_rollouts_to_convergence_by_hand():
    losses = [(step, 10.0 - step) for step in range(1, 6)] + [(step, 1.0) for step in range(6, 30)]
    # rolling mean over 3 records first equals the final value once three 1.0s are in: step 8
    assert rollouts_to_convergence(losses, 16, window=3, tolerance=0.05) == 8 * 16
    assert rollouts_to_convergence(losses[:2], 16, window=3) is None


def test_modes_study_through_the_cli(tiny_checkpoint, tmp_path, capsys):  # noqa: F811
    from segcompass.cli import main

    cfg = _cfg(tiny_checkpoint, tmp_path)
    argv = ["ablate", "--study", "modes", "--policy", str(cfg.policy), "--sae", str(cfg.sae), "--out", str(tmp_path),
            "--sae-layer", str(TINY_SAE_LAYER), "--steps", "2", "--sequences", "4", "--group-size", "2",
            "--eval-n", "2", "--eval-splits", "reason", "multi", "--threads", "1", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    folder = tmp_path / "modes"
    rows = list(csv.DictReader((folder / "results.csv").open()))
    assert [r["run"] for r in rows] == ["seg", "rl", "rl+seg"]
    for row in rows:
        assert 0.0 <= float(row["reason/giou"]) <= 1.0 and row["multi/ciou"] != ""
    assert rows[1]["rollouts"] == str(2 * 4) and rows[0]["rollouts"] == "0"
    table = (folder / "results.md").read_text()
    assert "| rl+seg |" in table and "reason gIoU" in table
    # a re-run reads the finished runs back instead of training again
    result = folder / "rl" / "result.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "reason/giou": 0.5}))
    capsys.readouterr()
    assert main(argv) == 0
    assert "| rl | 50.0 |" in capsys.readouterr().out
