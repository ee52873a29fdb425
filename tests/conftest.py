"""Shared fixtures: the real slides in ../shared/data/real and small synthetic slides made per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    """Two cores here: keep torch from oversubscribing them."""
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    if not (REAL / "CMU-1-Small-Region.svs").is_file():
        pytest.skip(f"real slides not found at {REAL} (see shared/data/real/SOURCE.md)")
    return REAL
