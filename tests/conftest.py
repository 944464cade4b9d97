"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import decord
import pytest
from PIL import Image

from tests.tiny_world import build_world


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny model + synthetic clips + clean metadata, built once per test session."""
    return build_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def sample_inputs(tiny_world: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A portrait (frame 0 of a demo clip, 96x160) and its speech."""
    root = tmp_path_factory.mktemp("sample_inputs")
    frame = decord.VideoReader(str(tiny_world["data"] / "train" / "00000001.mp4"))[0].asnumpy()
    Image.fromarray(frame).save(root / "face.png")
    return {"root": root, "image": root / "face.png", "audio": tiny_world["data"] / "wav" / "00000001.wav"}
