import os
from pathlib import Path

import pytest

# Tests are CPU-only, seeded and small; keep BLAS from oversubscribing the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "voc-labelme"  # copied from shared/fixtures


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real photos with instance polygons (shared/fixtures/voc-labelme)."""
    if not FIXTURES.is_dir():
        raise FileNotFoundError(f"fixtures missing: {FIXTURES}")
    return FIXTURES
