"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_world import build_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model + synthetic clips + clean metadata, built once per test session."""
    return build_world(tmp_path_factory.mktemp("tiny_world"))
