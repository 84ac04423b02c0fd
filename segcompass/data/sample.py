"""The one sample type every segcompass loader yields (RefCOCO/+/g, gRefCOCO, ReasonSeg, world)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SegSample:
    """One image with its referring instruction(s) and target instances."""

    sample_id: str
    """Unique id within its dataset split (e.g. RefCOCO `ref_id`, ReasonSeg file stem)."""
    image: np.ndarray
    """(H, W, 3) uint8 RGB."""
    instructions: tuple[str, ...]
    """Referring expressions / questions; several for one RefCOCO ref, one for ReasonSeg."""
    target_masks: np.ndarray
    """(N, H, W) bool, one mask per target instance; N = 0 for a no-target sample."""
    ignore_mask: np.ndarray | None = None
    """(H, W) bool pixels excluded from every metric, or None."""
    dataset: str = ""
    """Where it came from: 'refcoco', 'grefcoco', 'reasonseg', 'world', ..."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Source ids (image_id, ann_ids, ref_id, split, is_sentence, ...)."""

    @property
    def union_mask(self) -> np.ndarray:
        """(H, W) bool union of the target instances (all False when there are none)."""
        if len(self.target_masks) == 0:
            return np.zeros(self.image.shape[:2], dtype=bool)
        return self.target_masks.any(axis=0)

    @property
    def is_no_target(self) -> bool:
        return len(self.target_masks) == 0
