"""Conflict test: one image, two referents; the raw states say A, the SAE codes say B.

Pairs. For each single-target sample A of a split, B is the same sample (same image, scene,
prompt kind) under a second instruction whose one target is a different object. The world's
generator draws a template and a scene together (`make_sample`), so B is built with the
world's own templates (`segcompass.world.language.TEMPLATES`): A's family first (same held-out
flag), then the other single-target families, each template's builder run on A's objects
with a seeded generator until it names another object. B's target mask is read off the
scene's label map, and the pair is kept only if the two target masks differ.

Trials. Both A and B are decoded greedily and run through the policy once. The head then
gets everything from A's pass (e_k, policy image states, SAM embedding) except the SAE codes
and their rows, which come from B's pass ("A state, B codes"), and the reverse. Each mask is
judged against both targets: it lands on the *codes'* referent or the *state's* referent when
its IoU with that target is >= 0.5 and above its IoU with the other, else *elsewhere* (an
empty mask included). Shares are reported per family of A and over all trials, also over
"clean" trials only, where both unedited passes landed on their own targets (IoU >= 0.5).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd

from analyses.causal_inputs import concat_inputs, take_samples
from analyses.causal_pass import SplitPass, mask_ious, run_condition, run_split_pass
from segcompass.world.language import TEMPLATES

SINGLE_TARGET_FAMILIES = ("direct", "attribute", "spatial", "indirect")
LAND_IOU = 0.5
"""A mask lands on a target when its IoU with it is at least this (and above its IoU with the other)."""
DRAWS_PER_TEMPLATE = 8


class ConflictPair(NamedTuple):
    index: int
    """A's position in the split pass."""
    a: object
    """The split's `WorldSample`."""
    b: object
    """The same image and scene under an instruction for another object."""


def _templates_for(sample) -> list:
    """A's family first, then the other single-target families (held-out flag as A's template)."""
    held_out = sample.template_id.startswith("reason/")
    order = [sample.family] + [f for f in SINGLE_TARGET_FAMILIES if f != sample.family]
    return [t for family in order for t in TEMPLATES if t.family == family and t.held_out == held_out]


def second_referent(sample, seed: int):
    """`sample` under an instruction with one target other than its own, or None when no template applies."""
    from segcompass.world.render import instance_masks

    rng = np.random.default_rng([seed, zlib.crc32(sample.sample_id.encode())])
    for template in _templates_for(sample):
        for _ in range(DRAWS_PER_TEMPLATE):
            ref = template.build(sample.objects, rng)
            if ref is None:
                break  # the builder does not apply to this scene at all
            if len(ref.targets) == 1 and ref.targets != sample.targets:
                masks = instance_masks(sample.labels, len(sample.objects))[list(ref.targets)]  # (1, H, W)
                if masks.any() and not np.array_equal(masks, sample.target_masks):
                    return dataclasses.replace(sample, sample_id=f"{sample.sample_id}-conflict",
                                               instruction=ref.instruction, family=template.family,
                                               template_id=template.template_id, targets=ref.targets, cot=ref.cot,
                                               target_masks=masks)
    return None


def conflict_pairs(samples: Sequence, *, seed: int = 0, max_pairs: int | None = None) -> list[ConflictPair]:
    """A pair for each single-target sample that admits a second referent (module docstring)."""
    pairs = []
    for i, sample in enumerate(samples):
        if len(sample.targets) != 1 or sample.family not in SINGLE_TARGET_FAMILIES:
            continue
        if (b := second_referent(sample, seed)) is not None:
            pairs.append(ConflictPair(i, sample, b))
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
    return pairs


def landing(iou_codes: np.ndarray, iou_state: np.ndarray) -> np.ndarray:
    """(n,) 'codes' / 'state' / 'elsewhere' for masks with these IoUs against the two targets."""
    codes = (iou_codes >= LAND_IOU) & (iou_codes > iou_state)
    state = (iou_state >= LAND_IOU) & (iou_state > iou_codes)
    return np.where(codes, "codes", np.where(state, "state", "elsewhere"))


def conflict_trials(model, sp: SplitPass, pairs: list[ConflictPair], *, batch_size: int = 16,
                    conf_threshold: float = 0.5, max_new_tokens: int = 96, progress: bool = False) -> pd.DataFrame:
    """One row per trial (2 per pair): split, pair, family_a, family_b, direction, iou_codes, iou_state,
    lands, clean, plus both unedited IoUs with their own targets."""
    m = len(pairs)
    a_samples, b_samples = [p.a for p in pairs], [p.b for p in pairs]
    b_pass = run_split_pass(model, f"{sp.split} (conflict B)", b_samples, batch_size=batch_size,
                            max_new_tokens=max_new_tokens, progress=progress)
    both = concat_inputs([take_samples(sp.inputs, [p.index for p in pairs]), b_pass.inputs])  # A: 0..m-1, B: m..2m-1
    a, b = np.arange(m), np.arange(m, 2 * m)
    run = {"batch_size": batch_size, "conf_threshold": conf_threshold}
    own_a = mask_ious(run_condition(model, both, a_samples, index=a, **run), [s.target_masks[0] for s in a_samples])
    own_b = mask_ious(run_condition(model, both, b_samples, index=b, **run), [s.target_masks[0] for s in b_samples])
    rows = []
    for direction, state, codes, state_samples, code_samples in (("A_state_B_codes", a, b, a_samples, b_samples),
                                                                 ("B_state_A_codes", b, a, b_samples, a_samples)):
        masks = run_condition(model, both, state_samples, index=state, codes_from=codes, **run)
        iou_codes = mask_ious(masks, [s.target_masks[0] for s in code_samples])
        iou_state = mask_ious(masks, [s.target_masks[0] for s in state_samples])
        rows.append(pd.DataFrame({
            "split": sp.split, "pair": np.arange(m), "family_a": [p.a.family for p in pairs],
            "family_b": [p.b.family for p in pairs], "direction": direction, "iou_codes": iou_codes,
            "iou_state": iou_state, "lands": landing(iou_codes, iou_state),
            "unedited_iou_a": own_a, "unedited_iou_b": own_b, "clean": (own_a >= LAND_IOU) & (own_b >= LAND_IOU)}))
    return pd.concat(rows, ignore_index=True)


def _shares(trials: pd.DataFrame) -> dict[str, float | int]:
    n = len(trials)
    share = (lambda where: float((trials.lands == where).mean()) if n else float("nan"))
    return {"n_trials": n, "follows_codes": share("codes"), "follows_state": share("state"),
            "elsewhere": share("elsewhere")}


def conflict_summary(trials: pd.DataFrame, n_candidates: int) -> dict:
    """Shares over all trials and clean trials, overall and per family of A."""
    clean = trials[trials.clean]
    return {"n_pairs": int(trials.pair.nunique()) if len(trials) else 0,
            "n_single_target_samples": n_candidates, "land_iou": LAND_IOU,
            "all": _shares(trials), "clean": _shares(clean),
            "unedited_on_own_target": float(((trials.unedited_iou_a >= LAND_IOU).mean()
                                             + (trials.unedited_iou_b >= LAND_IOU).mean()) / 2) if len(trials) else
            float("nan"),
            "by_family": {family: {"all": _shares(part), "clean": _shares(part[part.clean])}
                          for family, part in trials.groupby("family_a", sort=True)}}
