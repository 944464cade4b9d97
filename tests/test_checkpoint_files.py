"""Checkpoint folder mechanics: atomic finalize, `latest`, pruning, resume resolution."""

from __future__ import annotations

from pathlib import Path

import pytest

from fantasytalk_cli.train.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    finalize_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    resolve_resume,
    temp_checkpoint_dir,
)


def _save(out: Path, step: int) -> Path:
    tmp = temp_checkpoint_dir(out, step)
    tmp.mkdir(parents=True)
    (tmp / "trainable.safetensors").write_bytes(b"x")
    CheckpointMeta(step=step, epoch=0, config_hash="h", config={}, strategy="ddp", world_size=1).write(tmp)
    return finalize_checkpoint(out, step)


def test_finalize_and_latest(tmp_path: Path) -> None:
    first = _save(tmp_path, 2)
    assert first.name == "checkpoint-2" and (tmp_path / "latest").read_text().strip() == "checkpoint-2"
    _save(tmp_path, 4)
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert CheckpointMeta.read(tmp_path / "checkpoint-4").step == 4


def test_interrupted_save_leaves_previous_latest(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    partial = temp_checkpoint_dir(tmp_path, 4)
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert resolve_resume(tmp_path, "latest") == tmp_path / "checkpoint-2"
    prune_checkpoints(tmp_path, None)
    assert not partial.exists()  # cleaned by the next successful save


def test_prune_keeps_newest(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
        prune_checkpoints(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_resave_same_step_replaces_only_when_complete(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    _save(tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not list(tmp_path.glob(".checkpoint-*"))


def test_resolve_resume_errors(tmp_path: Path) -> None:
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # nothing yet: fresh start
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(tmp_path, "checkpoint-9")
    (tmp_path / "checkpoint-9").mkdir()
    with pytest.raises(CheckpointError, match="not a complete ftalk checkpoint"):
        resolve_resume(tmp_path, "checkpoint-9")
