"""Checkpoint folder mechanics: atomic finalize, `latest`, pruning, resume resolution; the model-state
checks and hooks of saving and resuming, on a plain module (their multi-process use: test_train_distributed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fantasytalk_cli.checkpoints.folder import (
    CheckpointError,
    CheckpointMeta,
    list_checkpoints,
    newest_checkpoint,
    temp_checkpoint_dir,
)
from fantasytalk_cli.train.checkpoint import finalize_checkpoint, prune_checkpoints, resolve_resume
from fantasytalk_cli.train.sharded_state import (
    fsdp_trainable_only,
    init_optimizer_state,
    recorded_load_keys,
    verify_module_state,
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
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert CheckpointMeta.read(tmp_path / "checkpoint-4").step == 4


def test_interrupted_save_leaves_previous_latest(tmp_path: Path) -> None:
    _save(tmp_path, 2)
    partial = temp_checkpoint_dir(tmp_path, 4)
    partial.mkdir()
    (partial / "trainable.safetensors").write_bytes(b"half")
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
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
    with pytest.raises(CheckpointError, match="no checkpoint folder at"):
        resolve_resume(tmp_path, "checkpoint-9")
    (tmp_path / "checkpoint-9").mkdir()
    with pytest.raises(CheckpointError, match="not a complete ftalk checkpoint"):
        resolve_resume(tmp_path, "checkpoint-9")


def _half_frozen() -> nn.Module:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    model[0].requires_grad_(False)
    return model


def test_zero_resume_checks_the_loaded_module_state() -> None:
    model = _half_frozen()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    saved = {k: v for k, v in model.state_dict().items() if k.startswith("1.")}  # frozen weights excluded
    with recorded_load_keys(model) as loads:
        model.load_state_dict(saved, strict=False)
    verify_module_state(loads, trainable, Path("ckpt"))
    del saved["1.bias"]
    saved["2.weight"] = torch.zeros(1)
    with recorded_load_keys(model) as loads:
        model.load_state_dict(saved, strict=False)
    with pytest.raises(CheckpointError, match=r"ckpt: .*missing 1 \['1.bias'\], unknown 1 \['2.weight'\]"):
        verify_module_state(loads, trainable, Path("ckpt"))
    with pytest.raises(CheckpointError, match="restored no module state"):
        verify_module_state([], trainable, Path("ckpt"))
    assert not model._load_state_dict_post_hooks  # the hook is gone after the block


def test_fsdp_state_leaves_frozen_out() -> None:
    model = _half_frozen()
    with fsdp_trainable_only(model):
        state = model.state_dict()
        assert sorted(state) == ["1.bias", "1.weight"]
        state = {k: torch.full_like(v, 2.0) for k, v in state.items()}
        model.load_state_dict(state)  # strict: the frozen ones may be absent, they keep their values
        with pytest.raises(RuntimeError, match="1.bias"):
            model.load_state_dict({"1.weight": state["1.weight"]})  # a trainable one may not
    assert torch.equal(model[1].weight, torch.full((3, 3), 2.0))
    assert len(model.state_dict()) == 4  # hooks removed


def test_init_optimizer_state_keeps_weights_and_accepts_a_saved_state() -> None:
    model = _half_frozen()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    before = [p.detach().clone() for p in params]
    init_optimizer_state(optimizer)
    assert set(optimizer.state) == set(params) and all(p.grad is None for p in params)
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert optimizer.param_groups[0]["lr"] == 0.1
    state = optimizer.state_dict()
    init_optimizer_state(optimizer)  # already there: untouched
    assert optimizer.state_dict()["state"][0]["step"] == state["state"][0]["step"]
