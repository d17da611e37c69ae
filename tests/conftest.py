"""Shared fixtures. Tests that need ../shared data skip with a reason on a user's clone, and fail in CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the study's data sits beside the checkout in the development workspace; KDSCOPE_SHARED_DATA points elsewhere
SHARED = Path(os.environ.get("KDSCOPE_SHARED_DATA", REPO.parent / "shared" / "data" / "kd-generalization"))


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when ``condition`` is false, except in CI where a missing prerequisite is a failure."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"{reason} (CI=true: this must not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data/kd-generalization (the study's data)."""
    require(SHARED.is_dir(), f"{SHARED} is absent: the study's data is only in the development workspace")
    return SHARED
