"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

# CI clones the repository beside ../shared, so the sample lives outside the repo.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared/data/wmt14-en-fr"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real WMT'14 En-Fr sample (train/dev/test), at ../shared relative to the repo root."""
    if not (SHARED_DATA / "README.md").exists():
        raise FileNotFoundError(f"{SHARED_DATA}: WMT'14 sample not found; clone the shared data beside the repo")
    return SHARED_DATA
