"""`--curriculum first-errors`: world training prompts drawn more often from the instruction
families the policy gets wrong (world only).

Family f is drawn with probability q_f ∝ p_f · (e_f + FLOOR): p_f the train split's family
share, e_f the share of f's samples on which the policy, reading the ground-truth response
(teacher forcing), gets a token wrong (`world.policy_eval.first_errors`). e_f comes from the
warm start's eval.json beside `--policy` (`teacher_forced.first_errors`: the counts of each
family's commonest first errors over its n, so a lower bound) or, when there is none or the
run starts from `--init-from` (whose policy that file does not describe), from a scoring pass
of the policy over SCORING_SAMPLES `val` samples. The weights are written to OUT/curriculum.json
when a run starts and read back when it resumes, so a resumed run draws the same prompts.

Position g of the stream: a family drawn with q by a generator keyed (seed, g), then the first
train-split index among g·SCAN .. g·SCAN + SCAN - 1 whose template is of that family (the
template draw of `scenes.make_sample`, `scenes.template_of`: no scene is built), so templates
keep their within-family mix; index g·SCAN when none is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from saekit.atomic import atomic_write_json
from saekit.errors import UserError
from saekit.integrity import read_json_object

CURRICULUM_FILE = "curriculum.json"
FLOOR = 0.1
"""Added to every family's error share, so a family the policy gets right is still drawn."""
SCAN = 64
"""Train-split indices searched per stream position for one of the drawn family."""
SCORING_SAMPLES = 256
"""`val` samples of the scoring pass (seed SCORING_SEED, the warm start's evaluation seed)."""
SCORING_SEED = 1


def error_rates_from_eval(path: Path) -> dict[str, float] | None:
    """Family -> error share from a warm start's eval.json; None when it has no teacher-forced part."""
    record = read_json_object(path, fix="delete it to score the policy instead")
    forced, groups = record.get("teacher_forced"), record.get("groups")
    if not (isinstance(forced, dict) and isinstance(forced.get("first_errors"), dict) and isinstance(groups, dict)):
        return None
    rates = {}
    for name, group in groups.items():
        if name.startswith("family/") and isinstance(group, dict) and group.get("n"):
            family = name.removeprefix("family/")
            errors = sum(int(count) for _, count in forced["first_errors"].get(family, []))
            rates[family] = min(1.0, errors / int(group["n"]))
    return rates


def error_rates_by_scoring(loaded, n: int | None = None, seed: int = SCORING_SEED) -> dict[str, float]:
    """Family -> share of `n` (default SCORING_SAMPLES) val samples with a teacher-forced first
    error, from `loaded`'s policy."""
    from segcompass.world.policy_eval import first_errors
    from segcompass.world.scenes import generate

    samples = generate("val", SCORING_SAMPLES if n is None else n, seed)
    vision = getattr(loaded.model.config, "vision_config", None)
    grid = max(1, getattr(vision, "image_size", 1) // getattr(vision, "patch_size", 1))  # the probes' grid, unread here
    was_training = loaded.model.training
    loaded.model.eval()
    try:
        errors = first_errors(loaded, samples, grid=grid)
    finally:
        loaded.model.train(was_training)
    seen, wrong = Counter(s.family for s in samples), Counter(s.family for s, e in zip(samples, errors) if e)
    return {family: wrong[family] / count for family, count in sorted(seen.items())}


def family_weights(rates: dict[str, float], split: str = "train") -> dict[str, float]:
    """q_f ∝ p_f · (e_f + FLOOR) over `split`'s families (a family without a rate counts 0)."""
    from segcompass.world.scenes import SPLITS

    raw = {f: p * (rates.get(f, 0.0) + FLOOR) for f, p in SPLITS[split].family_weights.items()}
    total = sum(raw.values())
    return {f: w / total for f, w in raw.items()}


def curriculum_weights(cfg, loaded, out: Path, *, resuming: bool) -> dict[str, float]:
    """The run's family weights: read back from OUT/curriculum.json when resuming, else computed
    (see the module docstring) and written there."""
    path = Path(out) / CURRICULUM_FILE
    if resuming:
        record = read_json_object(path, fields={"family_weights": dict},
                                  fix="the run's curriculum is lost: start again with --no-resume")
        return {str(f): float(w) for f, w in record["family_weights"].items()}
    eval_file = Path(cfg.policy).parent / "eval.json"
    rates = error_rates_from_eval(eval_file) if cfg.init_from is None and eval_file.is_file() else None
    source = str(eval_file.resolve())
    if rates is None:
        rates, source = error_rates_by_scoring(loaded), f"scoring pass, {SCORING_SAMPLES} val samples"
    weights = family_weights(rates)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"source": source, "error_rates": rates, "family_weights": weights})
    return weights


class CurriculumStream:
    """The world's train samples with families drawn by `weights` (the `TrainStream` interface)."""

    def __init__(self, weights: dict[str, float], *, seed: int, split: str = "train"):
        if not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise UserError(f"curriculum: family weights must be >= 0 and not all 0, got {weights}")
        self.families = sorted(weights)
        self.p = np.array([weights[f] for f in self.families], dtype=np.float64)
        self.p /= self.p.sum()
        self.seed, self.split = seed, split
        self.skipped_empty = 0
        """World targets always have masks: nothing is skipped."""

    def family(self, g: int) -> str:
        """The family drawn for position g."""
        rng = np.random.default_rng([self.seed, int(g), 0xC0C0A])
        return self.families[int(rng.choice(len(self.families), p=self.p))]

    def index(self, g: int) -> int:
        """The train-split index read at position g."""
        from segcompass.world.scenes import template_of

        family, start = self.family(g), int(g) * SCAN
        return next((i for i in range(start, start + SCAN)
                     if template_of(self.split, i, self.seed).family == family), start)

    def __getitem__(self, g: int):
        from segcompass.world.scenes import make_sample

        return make_sample(self.split, self.index(g), self.seed)
