"""Write the analysis notebooks from the cell sources below (run from anywhere:
`python notebooks/make_notebooks.py`). The .ipynb files are generated, never edited by hand,
so a review reads this file; `tests/analyses/test_notebooks.py` checks they are in sync.

Every notebook: a title, a cell tagged `parameters` (papermill's convention: a tool, or
the tests, insert a cell after it that overrides the values), then calls into `analyses`
whose figures render inline. Paths are relative to this folder (Jupyter's working
directory); the default checkpoint is what `make demo` trains.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}

_COMMON_PARAMETERS = '''CHECKPOINT = "../runs/demo/segcompass/final"  # `make demo` trains it (any checkpoint folder)
SPLIT = "val"  # world split
N_SAMPLES = 24  # the first N samples of the split
SEED = 1  # world seed (1 = the evaluation seed, held out from training)
DEVICE = "cpu"'''

_SETUP = '''%matplotlib inline
from analyses.collect import collect_checkpoint
from analyses import run_all

model, collected = collect_checkpoint(CHECKPOINT, split=SPLIT, n=N_SAMPLES, seed=SEED, device=DEVICE)
print(f"{len(collected.samples)} samples, {collected.codes.n_tokens} SAE tokens, "
      f"codebook threshold {collected.threshold}, teacher forced: {collected.teacher_forced}")'''

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "figure4_activation_patterns.ipynb": [
        ("markdown", """# Figure 4: active SAE atoms per token type

For every SAE token of the samples (teacher-forced ground-truth chain of thought), the number of
atoms with activation above τ, averaged per group: question tokens, chain-of-thought tokens, image
tokens whose patch overlaps the referred (target) instance, image tokens over the image's other
objects, and the image tokens over no object (background).
τ is swept in fractions of the head's own codebook threshold (the SAE's units).

**Caveat.** The image tokens come before the instruction (`USER: <image>\n{prompt}`), so under
causal attention their codes cannot depend on which object is referred: "referred instance vs
background" measures how salient objects are, not reference. The control (right panel) compares,
within each image, the referred instance with the other instances (same image, same code);
background stays as the secondary reference. Even a referred-vs-other gap can only come from what
the referred objects are (e.g. "the largest" picks large ones), never from the instruction.
Functions: `analyses.activation_patterns`, `analyses.run_all.activation_patterns`."""),
        ("parameters", _COMMON_PARAMETERS),
        ("code", _SETUP),
        ("code", """result = run_all.activation_patterns(collected)
result.figure"""),
        ("markdown", "Mean active atoms per group (columns) and threshold τ (rows):"),
        ("code", """result.table.pivot(index="tau", columns="group", values="mean").round(2)"""),
        ("code", """control = result.summary["referred_vs_other_instances"]
print(f"referred - other instances, within {control['n_images']} images, by τ:", control["mean_by_tau"])
print("above 0 by more than 2 s.e.m. at every τ:", control["above_zero_beyond_2sem_every_tau"])
margins = result.summary["min_margin_vs_background"]
print("min over τ of (group - background), pooled:", {k: round(v, 3) for k, v in margins.items()})
print("instance above background at every τ:", result.summary["instance_above_background_every_tau"])
print("CoT above background at every τ:", result.summary["cot_above_background_every_tau"])"""),
    ],
    "figure5_instance_coverage.ipynb": [
        ("markdown", """# Figure 5: instance coverage of the top-K% image tokens

Per sample, image tokens are ranked by the magnitude of their SAE code; an instance's coverage is
the fraction of its pixels inside the top-K% patches. The referred (target) instances are compared
with the other objects of the same images, ranked by the same codes, and with the random-K%
expectation.

**Caveat.** The image tokens come before the instruction, so under causal attention their codes,
and this ranking, are the same whichever object is referred: coverage above random shows that
objects are salient, not that the referred one is. The control is referred vs other instances
(`paired_difference`: within each image, referred minus other coverage).
Functions: `analyses.instance_coverage`, `analyses.run_all.instance_coverage`."""),
        ("parameters", _COMMON_PARAMETERS + '\nMAGNITUDE = "l2"  # l2, l1 or max norm of a token\'s code'),
        ("code", _SETUP),
        ("code", """result = run_all.instance_coverage(collected, magnitude=MAGNITUDE)
result.figure"""),
        ("code", """result.table[["k_percent", "coverage", "other_coverage", "random", "ratio", "paired_difference",
              "paired_difference_sem", "n_instances", "n_other_instances", "n_paired_images"]].round(3)"""),
        ("markdown", "At K = 10%, for each way of measuring a token's magnitude: referred vs random and "
                     "referred minus other instances (within image):"),
        ("code", """{m: {k: round(v, 3) for k, v in run_all.instance_coverage(collected, magnitude=m).summary.items()
     if k in ("ratio_top10", "paired_difference_top10")} for m in ("l2", "l1", "max")}"""),
    ],
    "figure8_correlation.ipynb": [
        ("markdown", """# Figure 8: correlation between modules

Left (when the run folder holds the training log `metrics.jsonl`): per logged training step, the
frozen SAE's reconstruction MSE vs the Dice loss of the masks. Both fall as training goes on, so
the panel holds the step fixed: each is regressed on a smooth function of the step and the
residuals are correlated (partial correlation; the raw r is in the box). OLS line, 95% band of the
mean, Pearson r and p.

Right: the paper plots heatmap IoU vs mask IoU per test instance, but the mask decoder takes the
heatmap as its dense prompt, so that correlation holds by construction. Instead, per test image,
the most confident slot's heatmap (chosen without the ground truth) is scored on the referred
object and on the image's other objects (mean heatmap probability inside each); a point above the
diagonal is an image whose best-scoring object is a referred one, against the chance rate
n_referred / n_objects.
Functions: `analyses.correlation`, `analyses.run_all.correlation`."""),
        ("parameters", _COMMON_PARAMETERS),
        ("code", _SETUP),
        ("code", """log = run_all.training_log(CHECKPOINT)
print("training log:", log)
result = run_all.correlation(collected, log)
result.figure"""),
        ("code", """result.summary"""),
    ],
    "faithfulness.ipynb": [
        ("markdown", """# Causal faithfulness of the concept pathway

For each sample's top slot (its best-matched slot), the atoms that fed it most (provenance) are
zeroed in the sparse code (deletion) or kept alone (insertion), and the mask IoU is measured again;
the baseline does the same with random active atoms. If the provenance is faithful, deleting the
top atoms hurts far more than deleting as many random ones.
Functions: `analyses.faithfulness`, `analyses.run_all.faithfulness`."""),
        ("parameters", _COMMON_PARAMETERS + """
KS = (0, 1, 2, 3, 5, 8, 12, 20)  # atoms deleted / kept
N_DRAWS = 3  # random rankings per item
MAX_ITEMS = 12  # (sample, top slot) items
MIN_IOU = 0.05  # skip items whose mask already misses"""),
        ("code", _SETUP),
        ("code", """result = run_all.faithfulness(model, collected, ks=KS, n_draws=N_DRAWS, max_items=MAX_ITEMS,
                              min_iou=MIN_IOU)
print(result.summary.get("skipped", f"{result.summary['n_items']} items"))
result.figure"""),
        ("code", """result.table"""),
    ],
}


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook of (kind, source) cells; kind 'parameters' is a code cell tagged `parameters`."""
    made = []
    for kind, source in cells:
        if kind == "markdown":
            made.append(new_markdown_cell(source))
        else:
            metadata = {"tags": ["parameters"]} if kind == "parameters" else {}
            made.append(new_code_cell(source, metadata=metadata))
    notebook = new_notebook(cells=made, metadata={"kernelspec": KERNELSPEC,
                                                  "language_info": {"name": "python"}})
    for i, cell in enumerate(notebook.cells):
        cell["id"] = f"cell-{i}"  # stable ids: regenerating gives identical files
    return notebook


def main(out_dir: Path = HERE) -> list[Path]:
    written = []
    for name, cells in NOTEBOOKS.items():
        path = Path(out_dir) / name
        nbformat.write(build(cells), path)
        written.append(path)
    return written


if __name__ == "__main__":
    for path in main():
        print(path)
