"""The demo's index page: HTML tables from the run's files, escaped, with what to look for."""

import json

from segcompass.experiments.index_page import write_index


def test_index_page_tables_from_the_run_files(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"splits": {
        "testA": {"giou": 0.836, "ciou": 0.81, "n_acc": None, "t_acc": 0.995, "n_samples": 200},
        "<b>x</b>": {"giou": 0.5, "ciou": 0.5, "n_acc": 0.9, "t_acc": 1.0, "n_samples": 3}}}))
    causal = tmp_path / "analyses" / "causal"
    causal.mkdir(parents=True)
    (causal / "causal.json").write_text(json.dumps({"acceptance": {
        "zero_codes_giou_drop": {"testA": 0.52},
        "deletion_cost_ratio_top10_vs_random10": {"testA": {"attribution": 4.25, "provenance": None}}}}))
    (causal / "causal_pathway.png").write_bytes(b"png")
    page = write_index(tmp_path, quick=True, routing="concepts", reports=[], timings={"total": 600.0},
                       files={"faithfulness": {"png": "faithfulness.png"}}, policy_summary="p").read_text()
    assert "<td>83.6</td>" in page and "<td>99.5</td>" in page and "<td>n/a</td>" in page  # percent, n/a
    assert "<td>52.0</td>" in page and "<td>4.2</td>" in page  # gIoU points lost; ratio unscaled
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page  # split names escaped
    assert "numbers mean nothing" in page and "<b>concepts</b>" in page
    assert "analyses/causal/causal_pathway.png" in page and "top atoms are deleted" in page
    assert "<td>10.0</td>" in page  # stage minutes
