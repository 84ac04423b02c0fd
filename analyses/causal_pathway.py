"""Pathway ablation: which of the head's inputs do the masks actually depend on?

Per split, gIoU / cIoU / N-acc / T-acc (`segcompass.metrics`) of the final masks under:

    unedited              the head as trained
    r_zero / r_mean / r_shuffled
                          r_k (the aggregator's concept representations) replaced by zeros, by
                          their mean over the split's samples (per slot), or by another sample's
    query_zero / query_mean / query_shuffled
                          the same for the slot mapper's query input: e_k, the raw last-layer
                          state of the k-th <REF_POS> (paper routing), or u_k, that token's own
                          SAE code read by the codebook (concept routing); zeroing u_k equals
                          slot_rows = -1
    keys_no_policy_term   the keys without their policy-image term (raw image states, or the
                          image tokens' codes under concept routing); skipped when the keys have none
    codes_removed         every SAE code removed (empty CSR: the codebook gets no atom): insertion
                          at 0%, the floor of the concept pathway
    codes_shuffled        sample b reads sample pi(b)'s codes (rows and token_sample_index with
                          them), everything else its own

"Shuffled" is one seeded derangement pi of the split's samples (no sample keeps its own), the
same for r, the query input and the codes.

Off-target share: among single-target samples (exactly one target), the share whose final
mask has IoU < 0.5 with the target (an empty mask counts as off target; ignore pixels are left
out). Reported for every condition; under codes_shuffled it says how often the mask follows the
other sample's codes away from this sample's target.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from analyses.causal_edits import (HeadEdit, dataset_mean, derangement, from_samples, reads_policy_keys,
                                   record_head, zeroed)
from analyses.causal_inputs import empty_codes, inputs_to, take_samples
from analyses.causal_pass import (SplitPass, final_masks, mask_ious, n_targets, run_condition, score_masks,
                                  target_union)
from segcompass.data.sources import ignore_of
from segcompass.metrics import SplitScores

OFF_TARGET_IOU = 0.5
"""A single-target sample's mask is off target when its IoU with the target is below this."""
CONDITIONS = ("unedited", "r_zero", "r_mean", "r_shuffled", "query_zero", "query_mean", "query_shuffled",
              "keys_no_policy_term", "codes_removed", "codes_shuffled")


class Unedited(NamedTuple):
    """The unedited head over a split, with the tables the mean / shuffle edits read."""

    masks: list[np.ndarray]
    """Final (H, W) bool masks."""
    concepts: torch.Tensor
    """(n, K, d_c) r_k (CPU)."""
    queries: torch.Tensor
    """(n, K, d_q_in) the slot mapper's query input (CPU)."""


class PathwayResult(NamedTuple):
    scores: dict[str, SplitScores]
    """Condition -> scores (conditions that ran, in CONDITIONS order)."""
    off_target: dict[str, float]
    """Condition -> off-target share among single-target samples (NaN if there are none)."""
    n_single_target: int
    skipped: dict[str, str]
    """Condition -> why it did not run."""
    query_input: str
    """What the query conditions edit, in words."""


@torch.no_grad()
def record_split(model, sp: SplitPass, *, batch_size: int = 16, conf_threshold: float = 0.5) -> Unedited:
    """The unedited head over all samples of `sp`, batch by batch."""
    device = next(model.head.parameters()).device
    masks, concepts, queries = [], [], []
    for start in range(0, len(sp.samples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(sp.samples)))
        rec = record_head(model, inputs_to(take_samples(sp.inputs, index), device))
        masks += final_masks(model, rec.output, sp.samples[start:start + len(index)], conf_threshold)
        concepts.append(rec.concepts.float().cpu())
        queries.append(rec.queries.float().cpu())
    return Unedited(masks, torch.cat(concepts), torch.cat(queries))


def query_description(model) -> str:
    if model.head.concept_routed:
        return "u_k: the k-th <REF_POS> token's own SAE code read by the codebook (concept routing)"
    return "e_k: the raw last-layer state of the k-th <REF_POS> token (paper routing)"


def pathway_edits(model, unedited: Unedited, order: np.ndarray | None
                  ) -> tuple[dict[str, HeadEdit], dict[str, str]]:
    """The HeadEdit of every condition but codes_shuffled (`order` None: no shuffles), and the
    skipped conditions with a reason."""
    empty = HeadEdit(inputs=lambda inputs, samples: inputs._replace(codes=empty_codes(inputs.codes)))
    edits = {"unedited": HeadEdit(),
             "r_zero": HeadEdit(concepts=zeroed()), "r_mean": HeadEdit(concepts=dataset_mean(unedited.concepts)),
             "query_zero": HeadEdit(queries=zeroed()), "query_mean": HeadEdit(queries=dataset_mean(unedited.queries)),
             "codes_removed": empty}
    skipped = {}
    if order is None:
        skipped.update({c: "a shuffle needs at least 2 samples" for c in CONDITIONS if c.endswith("shuffled")})
    else:
        edits["r_shuffled"] = HeadEdit(concepts=from_samples(unedited.concepts, order))
        edits["query_shuffled"] = HeadEdit(queries=from_samples(unedited.queries, order))
    if reads_policy_keys(model):
        edits["keys_no_policy_term"] = HeadEdit(drop_policy_keys=True)
    else:
        skipped["keys_no_policy_term"] = "the slot mapper's keys have no policy-image term (SAM keys only)"
    return edits, skipped


def off_target_share(masks: list[np.ndarray], samples: list) -> tuple[float, int]:
    """(share of single-target samples whose mask has IoU < OFF_TARGET_IOU with the target, their count)."""
    single = [i for i, s in enumerate(samples) if n_targets(s) == 1]
    if not single:
        return float("nan"), 0
    ious = mask_ious([masks[i] for i in single], [target_union(samples[i]) for i in single],
                     [ignore_of(samples[i]) for i in single])
    return float((ious < OFF_TARGET_IOU).mean()), len(single)


def pathway_ablation(model, sp: SplitPass, *, seed: int = 0, batch_size: int = 16, conf_threshold: float = 0.5,
                     unedited: Unedited | None = None, progress: bool = False) -> PathwayResult:
    """Scores of every condition of the module docstring on one split's pass."""
    from tqdm.auto import tqdm

    unedited = unedited or record_split(model, sp, batch_size=batch_size, conf_threshold=conf_threshold)
    order = derangement(len(sp.samples), seed) if len(sp.samples) >= 2 else None
    edits, skipped = pathway_edits(model, unedited, order)
    masks = {}
    for name in tqdm([c for c in CONDITIONS if c not in skipped], desc=f"pathway {sp.split}", disable=not progress):
        if name == "unedited":
            masks[name] = unedited.masks
        elif name == "codes_shuffled":
            masks[name] = run_condition(model, sp.inputs, sp.samples, codes_from=order, batch_size=batch_size,
                                        conf_threshold=conf_threshold)
        else:
            masks[name] = run_condition(model, sp.inputs, sp.samples, edits[name], batch_size=batch_size,
                                        conf_threshold=conf_threshold)
    scores = {name: score_masks(m, sp.samples) for name, m in masks.items()}
    off = {name: off_target_share(m, sp.samples) for name, m in masks.items()}
    n_single = next(iter(off.values()))[1]
    return PathwayResult(scores, {k: v[0] for k, v in off.items()}, n_single, skipped, query_description(model))


def pathway_summary(result: PathwayResult) -> dict:
    """JSON-able: per condition its scores and off-target share, and the drops that matter."""
    conditions = {name: {**s.as_dict(), "off_target_share": result.off_target[name]}
                  for name, s in result.scores.items()}
    base = result.scores["unedited"]
    drops = {f"giou_drop_{name}": base.giou - s.giou for name, s in result.scores.items() if name != "unedited"}
    return {"query_input": result.query_input, "n_single_target": result.n_single_target,
            "off_target_iou_below": OFF_TARGET_IOU, "conditions": conditions, **drops, "skipped": result.skipped}
