"""The dashboard's configuration (`saekit dashboard` flags)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from saekit.errors import UserError
from saekit.inputs import token_type_codes


@dataclasses.dataclass(frozen=True)
class DashboardConfig:
    """Which SAE, over which data, into which folder."""

    sae: Path
    """SAE folder (saekit or sae-lens format)."""
    data: Path
    """An activation cache (`saekit cache`) or image-text data (.jsonl, saved dataset)."""
    out: Path
    """Output folder (index.html and the pages)."""
    source: Path | None = None
    """A cache's image-text data (default: the path its manifest records)."""
    model: str | None = None
    """Model preset (default: the cache's or the SAE's)."""
    model_path: Path | None = None
    """Model weights folder (default: the HF cache; tiny presets build in-process)."""
    layer: int | None = None
    """Layer L = HF hidden_states[L] (default: the SAE's)."""
    token_types: tuple[str, ...] | None = None
    """Token types to read (default: those the SAE was trained on)."""
    max_samples: int | None = None
    """Samples to read (default: all)."""
    top_examples: int = 6
    """Top-activating samples shown per atom."""
    atoms_per_page: int = 16
    """Atoms per atom page."""
    atoms_per_index: int = 1024
    """Atoms per index page."""
    promoted_tokens: int = 10
    """Tokens listed per atom (decoder direction through the unembedding)."""
    batch_size: int = 8
    """Capture: samples per forward pass."""
    chunk_tokens: int = 1024
    """Tokens encoded at once."""
    device: str = "auto"
    """auto (cuda when available, else cpu), cpu, cuda, ..."""

    def __post_init__(self) -> None:
        for name in ("top_examples", "atoms_per_page", "atoms_per_index", "promoted_tokens",
                     "batch_size", "chunk_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UserError(f"max_samples must be >= 1, got {self.max_samples}")
        if self.atoms_per_index % self.atoms_per_page:
            raise UserError(f"atoms_per_index ({self.atoms_per_index}) must be a multiple of "
                            f"atoms_per_page ({self.atoms_per_page})")
        if self.token_types is not None:
            token_type_codes(self.token_types)
