"""The lip/face-weighted loss (issue 24's first parts): the weight formula on a hand-built batch, a run with the
weights at 0 is today's run bitwise, a weighted run differs, cached and online weighted runs train to the same
weights, entries without a track train with weight 1 (or are refused with --require_tracks)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file

from fantasytalk_cli.cache.build import build_cache
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.metadata_write import write_entries_atomic
from fantasytalk_cli.runtime.flow import flow_matching_loss
from fantasytalk_cli.train.init_from import InitFromError
from fantasytalk_cli.train.loop import run_training
from fantasytalk_cli.train.preflight import RunFolderError
from fantasytalk_cli.train.setup import TrainingError
from tests.tiny_world import world_config

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (kept for the session)


def test_the_weighted_loss_is_the_formula_on_a_hand_built_batch() -> None:
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 3, 4, 6, generator=g)
    per_sample = torch.tensor([1.0, 0.5])
    cells = torch.ones(2, 3, 4, 6)
    cells[0, :, 1:3, 2:4] = 3.0  # a mouth region weighing 1 + 2
    got = flow_matching_loss(pred, target, per_sample, 50.0, cells).loss
    sq = (pred - target) ** 2
    want = ((sq * cells[:, None]).flatten(1).mean(1) * per_sample).mean()
    assert torch.allclose(got, want, rtol=1e-6)
    plain = flow_matching_loss(pred, target, per_sample, 50.0).loss
    assert torch.equal(flow_matching_loss(pred, target, per_sample, 50.0, torch.ones(2, 3, 4, 6)).loss, plain)
    assert got > plain


@pytest.fixture()
def tracked(tiny_world: dict, tmp_path: Path) -> dict:
    """The tiny world's data (whose clips carry the tracks `make-demo-data` drew) with the last clip's track
    removed."""
    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    entries = load_entries(data / "clean.json")
    assert all(entry.extra.get("track") for entry in entries)
    del entries[-1].extra["track"]
    write_entries_atomic(data / "clean.json", entries)
    return {**tiny_world, "data": data, "clean": data / "clean.json"}


def _run(world: dict, run: Path, **overrides: object) -> dict[str, torch.Tensor]:
    steps = {"max_train_steps": 3, "checkpointing_steps": 3}
    summary = run_training(world_config(world, run, **steps, **overrides), QUIET)
    assert summary.steps == 3
    return load_file(run / "checkpoint-3" / "trainable.safetensors")


@pytest.mark.slow
def test_weights_at_zero_train_bitwise_today_and_a_weighted_run_differs(tracked: dict, tmp_path: Path) -> None:
    today = _run(tracked, tmp_path / "today")
    zero = _run(tracked, tmp_path / "zero", lip_loss_weight=0.0, face_loss_weight=0.0)
    assert all(torch.equal(zero[k], today[k]) for k in today)
    weighted = _run(tracked, tmp_path / "lip", lip_loss_weight=2.0, face_loss_weight=0.5)
    assert any(not torch.equal(weighted[k], today[k]) for k in today)


@pytest.mark.slow
def test_cached_and_online_weighted_runs_train_to_the_same_weights(tracked: dict, tmp_path: Path) -> None:
    weights = {"lip_loss_weight": 2.0, "face_loss_weight": 0.5}
    cache = tmp_path / "cache"
    report = build_cache(world_config(tracked, tmp_path / "unused", cache_dir=cache, max_train_steps=3, **weights))
    assert report.items > 0 and not report.failed
    cached = _run(tracked, tmp_path / "cached", cache_dir=cache, cache_required=True, **weights)
    online = _run(tracked, tmp_path / "online", **weights)
    for name, want in online.items():
        torch.testing.assert_close(cached[name], want, rtol=0, atol=1e-6)


def test_require_tracks_refuses_entries_without_one_before_loading(tracked: dict, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"--require_tracks, but 1 of \d+ entries have no `track`"):
        run_training(world_config(tracked, tmp_path / "run", lip_loss_weight=1.0, require_tracks=True), QUIET)
    entries = load_entries(tracked["clean"])
    entries[0].extra["track"] = "tracks/missing.json"
    write_entries_atomic(tracked["clean"], entries)
    with pytest.raises(TrainingError, match="name a `track` file that does not exist"):
        run_training(world_config(tracked, tmp_path / "run2", lip_loss_weight=1.0), QUIET)


@pytest.mark.slow
def test_stage_two_starts_from_stage_one_with_a_fresh_optimizer(
    tracked: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage1 = _run(tracked, tmp_path / "stage1")
    weights = {"lip_loss_weight": 2.0, "face_loss_weight": 0.5}
    cfg = world_config(tracked, tmp_path / "stage2", max_train_steps=1, checkpointing_steps=1, learning_rate=1e-12,
                       init_from=tmp_path / "stage1", **weights)  # fmt: skip
    summary = run_training(cfg, QUIET)
    assert summary.steps == 1  # step 0 of a new run, not step 3 of stage 1
    stage2 = load_file(tmp_path / "stage2" / "checkpoint-1" / "trainable.safetensors")
    for name, want in stage1.items():  # one step at lr 1e-12 away from stage 1's weights
        torch.testing.assert_close(stage2[name], want, rtol=0, atol=1e-9)
    optimizer = torch.load(tmp_path / "stage2" / "checkpoint-1" / "accelerate" / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {1.0}  # a fresh AdamW
    # resuming stage 1 with stage 2's objective is refused: a new stage is --init_from's
    with pytest.raises(RunFolderError, match="lip_loss_weight 0 -> 2 \\(a new stage: start it with --init_from\\)"):
        run_training(world_config(tracked, tmp_path / "stage1", max_train_steps=4, resume_from_checkpoint="latest",
                                  **weights), QUIET)  # fmt: skip
    # a checkpoint of another model size is refused before anything loads
    import fantasytalk_cli.train.setup as setup

    monkeypatch.setattr(setup, "load_training_models", lambda *a, **k: pytest.fail("the models were loaded"))
    other = tmp_path / "other.safetensors"
    save_file({"proj_model.proj.weight": torch.zeros(64, 32), "proj_model.norm.weight": torch.zeros(64),
               "proj_model.norm.bias": torch.zeros(64)}, str(other))  # fmt: skip
    with pytest.raises(InitFromError, match="--init_from .*other.safetensors"):
        run_training(world_config(tracked, tmp_path / "stage2b", init_from=other, **weights), QUIET)
