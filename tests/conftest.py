"""Shared fixtures: the default model's converted checkpoint (converted once per machine)."""

from __future__ import annotations

import pytest

from cluster.model_store import DEFAULT_MODEL, resolve_model


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return str(resolve_model(DEFAULT_MODEL))
