"""The causal suite on real-format datasets (`segcompass analyze --data`): pathway, dose and variance
run on a dataset split, the world-only tests are recorded as skipped, and the unedited condition
scores exactly what `segcompass eval --data` scores on the same samples (ReasonSeg's ignore pixels,
gRefCOCO's multi- and no-target samples included)."""

import json
from pathlib import Path

import pytest

from analyses.causal import CAUSAL_FILE, WORLD_ONLY_TESTS, run_causal_suite
from analyses.run_all import SUMMARY_FILE, WORLD_ONLY_ANALYSES
from loaders_fixtures import build_grefcoco, build_reasonseg
from segcompass.cli import main
from segcompass_tiny import tiny_checkpoint, tiny_model  # noqa: F401 (pytest fixtures)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "voc-labelme"


@pytest.fixture(scope="module")
def reasonseg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ReasonSeg")
    build_reasonseg(FIXTURES, root / "val")
    return root


def test_analyze_reasonseg_causal_only_matches_eval(tiny_checkpoint, reasonseg_root, tmp_path, capsys):
    data = f"reasonseg:{reasonseg_root}"
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "analyze"), "--data", data,
            "--split", "val", "--causal-only", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    skipped_lines = [line for line in printed.splitlines() if "skipped" in line]
    assert len(skipped_lines) == 1 and all(f"causal {t}" in skipped_lines[0] for t in WORLD_ONLY_TESTS)
    folder = tmp_path / "analyze" / "causal"
    record = json.loads((folder / CAUSAL_FILE).read_text())
    assert record["config"]["data"] == data and record["skipped"] == WORLD_ONLY_TESTS
    split = record["splits"]["val"]
    assert split["n_samples"] == 3
    assert split["conflict"] == {"skipped": WORLD_ONLY_TESTS["conflict"]}
    assert split["concept_edit"] == {"skipped": WORLD_ONLY_TESTS["concept_edit"]}
    assert {"unedited", "codes_removed", "codes_shuffled"} <= set(split["pathway"]["conditions"])
    assert split["dose"]["n_items"] == 3  # every ReasonSeg sample has one target
    assert next(iter(split["dose"]["settings"]["e_present"])) == "floor_insertion_0"
    assert split["variance_explained"]["n_tokens"] > 0
    assert record["acceptance"]["conflict_follow_codes_share"] == {"val": None, "all_splits": None}
    for name in ("causal_pathway.csv", "causal_dose.csv", "causal_pathway.png", "causal_dose_val.png"):
        assert (folder / name).is_file(), name
    assert not (folder / "causal_conflict.csv").exists() and not (tmp_path / "analyze" / SUMMARY_FILE).exists()

    assert main(["eval", "--checkpoint", str(tiny_checkpoint), "--data", data, "--split", "val",
                 "--out", str(tmp_path / "eval"), "--device", "cpu"]) == 0
    want = json.loads((tmp_path / "eval" / "metrics.json").read_text())["splits"]["val"]
    assert split["pathway"]["conditions"]["unedited"]["n_samples"] == want["n_samples"] == 3
    for metric in ("giou", "ciou"):
        assert split["pathway"]["conditions"]["unedited"][metric] == want[metric], metric


def test_analyze_on_a_dataset_records_the_world_analyses_as_skipped(tiny_checkpoint, reasonseg_root, tmp_path):
    argv = ["analyze", "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path), "--data",
            f"reasonseg:{reasonseg_root}", "--split", "val", "--causal-samples", "1", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["analyses"] == {stem: {"skipped": why} for stem, why in WORLD_ONLY_ANALYSES.items()}
    assert json.loads((tmp_path / "causal" / CAUSAL_FILE).read_text())["splits"]["val"]["n_samples"] == 1


def test_grefcoco_multi_and_no_target_samples_score_as_eval(tiny_model, tmp_path):
    from segcompass.evaluate import run_evaluation
    from segcompass.predictor import PredictorConfig

    data = f"grefcoco:{build_grefcoco(FIXTURES, tmp_path / 'gref')}"
    record = run_causal_suite(tiny_model, tmp_path / "causal", splits=["val"], n=10, data=data, max_new_tokens=8,
                              percents=(0, 10, 100))
    want = run_evaluation(tiny_model, ["val"], None, data=data, config=PredictorConfig(max_new_tokens=8))["val"]
    got = record["splits"]["val"]
    assert got["pathway"]["conditions"]["unedited"] | {"off_target_share": None} == \
        want.scores.as_dict() | {"off_target_share": None}
    assert want.scores.n_samples == 4 and want.scores.n_no_target == 1  # 2 multi-target, 1 no-target, 1 single
    assert got["dose"]["n_items"] == got["pathway"]["n_single_target"] == 1
