"""`ftalk train` in one process on the tiny world when things go wrong: broken clips, NaN/inf losses and
gradients, a signal during set-up, a resume with a changed config; plus condition dropout and the
logged loss under gradient accumulation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.train import loop, setup
from fantasytalk_cli.train.loop import TrainingError, render_summary, run_training
from tests.tiny_world import world_config

NAN = float("nan")


def _console() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, width=250), text


@pytest.fixture(scope="module")
def broken_world(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """3 of the tiny world's clips (copied; model shared), entry 2's video replaced by garbage."""
    data = tmp_path_factory.mktemp("broken") / "data"
    shutil.copytree(tiny_world["data"], data)
    entries = json.loads((data / "clean.json").read_text())[:3]
    (data / "clean3.json").write_text(json.dumps(entries))
    broken = entries[2]["file_path"]
    (data / broken).write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))  # a truncated mp4
    return {**tiny_world, "data": data, "clean": data / "clean3.json", "broken": broken}


def test_a_broken_clip_is_skipped_logged_and_counted_once(broken_world: dict, tmp_path: Path) -> None:
    console, text = _console()
    # one batch of the 3 clips per epoch, 2 epochs: both meet the broken clip and train on the other two
    cfg = world_config(
        broken_world, tmp_path / "run", num_train_epochs=2, train_batch_size=3, max_bad_sample_fraction=0.4
    )
    summary = run_training(cfg, console)
    assert summary.steps == 2 and summary.epochs_started == 2
    assert summary.failed_entries == [2]
    output = text.getvalue()
    assert output.count("skipped entry 2") == 1, output
    assert f"rank 0: skipped entry 2 ({broken_world['broken']}):" in output
    Console(file=text, width=250).print(render_summary(summary))
    assert "1: entries 2" in text.getvalue()


def test_too_many_broken_clips_abort_naming_the_fraction(broken_world: dict, tmp_path: Path) -> None:
    cfg = world_config(broken_world, tmp_path / "run", max_train_steps=3, max_bad_sample_fraction=0.3)
    with pytest.raises(TrainingError, match=r"1 clips failed to load, more than max_bad_sample_fraction=0\.3 of 3"):
        run_training(cfg, _console()[0])


def test_fail_policy_stops_naming_the_file(broken_world: dict, tmp_path: Path) -> None:
    cfg = world_config(broken_world, tmp_path / "run", max_train_steps=3, bad_sample_policy="fail")
    with pytest.raises(TrainingError, match=rf"entry 2 \({broken_world['broken']}\) failed to load: .*skip"):
        run_training(cfg, _console()[0])


def _break_steps(monkeypatch: pytest.MonkeyPatch, bad: set[int], kind: str, losses: list[float] | None = None) -> None:
    """Micro-steps in `bad` get a NaN loss (`loss`) or NaN audio (`audio`: NaN activations, whose loss the
    outlier guard keeps finite while the gradient is NaN). `losses` receives every micro-batch's loss."""
    real = loop.training_step

    def step(model: torch.nn.Module, encoders: Any, wav2vec: Any, batch: dict, ctx: Any, micro_step: int) -> Any:
        if micro_step in bad and kind == "audio":
            batch = {**batch, "audio": [clip * NAN for clip in batch["audio"]]}
        out = real(model, encoders, wav2vec, batch, ctx, micro_step)
        if micro_step in bad and kind == "loss":
            out = dataclasses.replace(out, loss=out.loss * NAN)
        if losses is not None:
            losses.append(out.loss.item())
        return out

    monkeypatch.setattr(loop, "training_step", step)


@pytest.mark.parametrize("kind", ["loss", "audio"])
def test_a_nonfinite_step_changes_nothing_and_is_counted(
    kind: str, tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _break_steps(monkeypatch, {1}, kind)
    run = tmp_path / "run"
    summary = run_training(world_config(tiny_world, run, max_train_steps=3, checkpointing_steps=1), _console()[0])
    assert summary.steps == 3 and summary.nonfinite_skipped == 1
    assert len(summary.losses) == (2 if kind == "loss" else 3)  # the NaN-audio loss is finite, its gradient is not
    weights = [load_file(run / f"checkpoint-{n}" / "trainable.safetensors") for n in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 made no update
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # step 3 did
    optim = [torch.load(run / f"checkpoint-{n}" / "accelerate" / "optimizer.bin", weights_only=True) for n in (1, 2)]
    for a, b in zip(optim[0]["state"].values(), optim[1]["state"].values(), strict=True):
        assert all(torch.equal(a[name], b[name]) for name in a)  # no moment decay, no step count either


def test_nonfinite_steps_in_a_row_abort(tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _break_steps(monkeypatch, set(range(10)), "loss")
    cfg = world_config(tiny_world, tmp_path / "run", max_train_steps=5, max_consecutive_nonfinite=2)
    with pytest.raises(TrainingError, match="2 steps in a row had a NaN/inf loss or gradient: lower --learning_rate"):
        run_training(cfg, _console()[0])


def test_accumulation_logs_the_window_mean_of_finite_losses(
    tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    micro: list[float] = []
    _break_steps(monkeypatch, {1}, "loss", micro)
    cfg = world_config(tiny_world, tmp_path / "run", max_train_steps=2, gradient_accumulation_steps=2)
    summary = run_training(cfg, _console()[0])
    assert summary.steps == 2 and summary.nonfinite_skipped == 0  # window 1 still had a finite micro-batch
    assert len(micro) == 4
    assert summary.losses == pytest.approx([micro[0], (micro[2] + micro[3]) / 2], rel=1e-6)


def test_a_signal_during_set_up_stops_cleanly(
    tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = setup.load_training_models

    def load(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the models load
        return real(*args, **kwargs)

    monkeypatch.setattr(setup, "load_training_models", load)
    before = signal.getsignal(signal.SIGTERM)
    console, text = _console()
    run = tmp_path / "run"
    summary = run_training(world_config(tiny_world, run, max_train_steps=3), console)
    assert summary.stopped_by == "SIGTERM" and summary.steps == 0 and summary.checkpoints == []
    assert not list(run.glob("checkpoint-*"))  # nothing trained, nothing saved
    assert "stopped by SIGTERM at step 0" in text.getvalue()
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_resume_reports_each_changed_config_key(tiny_world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_training(world_config(tiny_world, run, max_train_steps=1, checkpointing_steps=1), _console()[0])
    console, text = _console()
    cfg = world_config(
        tiny_world, run, max_train_steps=2, checkpointing_steps=1, learning_rate=2e-3, resume_from_checkpoint="latest"
    )
    assert run_training(cfg, console).steps == 2
    output = text.getvalue()
    assert "config changed since the checkpoint: train.learning_rate: 0.001 -> 0.002" in output, output
    assert "config changed since the checkpoint: train.max_train_steps: 1 -> 2" in output
    assert "resume_from_checkpoint" not in output  # checkpoint.* keys are expected to change


@pytest.fixture(scope="module")
def step_world(tiny_world: dict) -> dict[str, Any]:
    """Tiny models and one real batch of 2, for calling `training_step` directly."""
    from fantasytalk_cli.data.dataset import ClipBatchDataset
    from fantasytalk_cli.data.metadata import load_entries
    from fantasytalk_cli.data.plan import plan_from_metadata
    from fantasytalk_cli.data.sampler import BucketBatchSampler
    from fantasytalk_cli.train.model_setup import load_training_models

    cfg = world_config(tiny_world, tiny_world["root"] / "unused", train_batch_size=2)
    models = load_training_models(cfg.model, cfg.train, device=torch.device("cpu"), uniform_dtype=False)
    plan, _, _ = plan_from_metadata(
        data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=cfg.data.train_data_meta
    )
    dataset = ClipBatchDataset(load_entries(cfg.data.train_data_meta), plan, cfg.data.train_data_dir, seed=1)
    batch = dataset[next(iter(BucketBatchSampler(plan, batch_size=2, seed=1)))]
    return {"cfg": cfg, "models": models, "batch": batch}


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_condition_dropout(p: float, step_world: dict) -> None:
    from fantasytalk_cli.runtime.flow import FlowSchedule
    from fantasytalk_cli.train.step import StepContext, training_step

    cfg, models, batch = step_world["cfg"], step_world["models"], step_world["batch"]
    train = cfg.train.model_copy(update={"text_dropout": p, "image_dropout": p, "audio_dropout": p})
    cpu = torch.device("cpu")
    ctx = StepContext(train, cfg.model, FlowSchedule().sigmas(), World(), cpu, torch.float32, contextlib.nullcontext)
    with torch.no_grad():
        inputs = training_step(models.transformer, models.encoders, models.wav2vec, batch, ctx, 0).inputs
        with models.encoders.on(cpu):
            empty = models.encoders.text.encode(["", ""])
            captions = models.encoders.text.encode(batch["text"])
    assert not torch.equal(empty, captions)
    text, image, scale = inputs["encoder_hidden_states"], inputs["encoder_hidden_states_image"], inputs["audio_scale"]
    if p == 1.0:
        assert torch.equal(text, empty.float())
        assert not image.any()
        assert scale.tolist() == [0.0, 0.0]
    else:
        assert torch.equal(text, captions.float())
        assert image.abs().sum(dim=(1, 2)).min() > 0
        assert scale.tolist() == [cfg.model.audio_scale] * 2
