"""`ftalk train` in one process on the tiny world: it learns, it resumes exactly, it survives signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fantasytalk_cli.checkpoints.folder import CheckpointMeta, list_checkpoints, newest_checkpoint
from fantasytalk_cli.train.loop import run_training
from tests.tiny_world import world_argv, world_config

REPO = Path(__file__).resolve().parents[1]
QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (kept for the session)


def _eval_loss(world: dict[str, Path], weights: dict[str, torch.Tensor] | None, cfg_overrides: dict) -> float:
    """Loss on a fixed batch with fixed noise and timesteps (no condition dropout)."""
    from fantasytalk_cli.train.evaluate import fixed_batch_loss

    cfg = world_config(world, world["root"] / "unused", **cfg_overrides)
    return fixed_batch_loss(cfg.data, cfg.buckets, cfg.model, cfg.train, weights)


@pytest.mark.slow
def test_loss_falls_on_a_fixed_batch(tiny_world: dict, tmp_path: Path) -> None:
    overrides = {"max_train_steps": 30, "checkpointing_steps": 30, "learning_rate": 3e-3}
    before = _eval_loss(tiny_world, None, {})
    summary = run_training(world_config(tiny_world, tmp_path / "run", **overrides), QUIET)
    assert summary.steps == 30
    trained = load_file(tmp_path / "run" / "checkpoint-30" / "trainable.safetensors")
    after = _eval_loss(tiny_world, trained, {})
    assert after < 0.9 * before, (before, after)


@pytest.mark.slow
def test_two_plus_two_steps_equal_four(tiny_world: dict, tmp_path: Path) -> None:
    full = run_training(world_config(tiny_world, tmp_path / "full", max_train_steps=4, checkpointing_steps=2), QUIET)
    half = run_training(world_config(tiny_world, tmp_path / "half", max_train_steps=2, checkpointing_steps=2), QUIET)
    rest = run_training(
        world_config(
            tiny_world, tmp_path / "half", max_train_steps=4, checkpointing_steps=2, resume_from_checkpoint="latest"
        ),
        QUIET,
    )
    assert full.steps == 4 and half.steps == 2 and rest.steps == 4
    assert full.losses == half.losses + rest.losses  # same batches, noise and timesteps after resume
    a = load_file(tmp_path / "full" / "checkpoint-4" / "trainable.safetensors")
    b = load_file(tmp_path / "half" / "checkpoint-4" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(tmp_path / "full" / "checkpoint-4" / "accelerate" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(tmp_path / "half" / "checkpoint-4" / "accelerate" / "optimizer.bin", weights_only=True)
    for (ka, sa), (kb, sb) in zip(opt_a["state"].items(), opt_b["state"].items(), strict=True):
        assert ka == kb
        for name in sa:
            assert torch.equal(sa[name], sb[name]), name
    meta = CheckpointMeta.read(tmp_path / "half" / "checkpoint-4")
    assert meta.step == 4 and meta.strategy == "ddp"
    run = tmp_path / "half"
    assert (run / "config.yaml").is_file()
    assert (run / "checkpoint-4" / "fantasytalking_model.ckpt").is_file()
    assert not (run / "checkpoint-4" / "accelerate" / "model.safetensors").exists()  # no 14B copy per checkpoint


@pytest.mark.slow
def test_total_limit_prunes_old_checkpoints(tiny_world: dict, tmp_path: Path) -> None:
    overrides = {"max_train_steps": 3, "checkpointing_steps": 1, "checkpoints_total_limit": 2}
    run_training(world_config(tiny_world, tmp_path / "run", **overrides), QUIET)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2, 3]
    assert newest_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-3"


def _spawn(argv: list[str], env_extra: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "fantasytalk_cli", "train", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def sigterm_after_first_checkpoint(argv: list[str], run: Path) -> str:
    """Start `ftalk train argv` into ``run``, send SIGTERM once its first checkpoint is saved (however slow the
    set-up on a busy machine), and return its output after a clean exit. The child computes with this process's
    torch thread count (a test before may have set it: the benches do), so its sums round as an in-process run's."""
    proc = _spawn(argv, {"OMP_NUM_THREADS": str(torch.get_num_threads())})
    deadline = time.time() + 180
    while newest_checkpoint(run) is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    if newest_checkpoint(run) is None:
        proc.kill()
        pytest.fail(f"no first checkpoint within 180 s:\n{proc.communicate()[0]}")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    return output


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tiny_world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    output = sigterm_after_first_checkpoint(
        world_argv(tiny_world, run, max_train_steps=200, checkpointing_steps=2), run
    )
    latest = newest_checkpoint(run)
    assert latest is not None, output
    meta = CheckpointMeta.read(latest)
    assert 0 < meta.step < 200
    assert "SIGTERM" in output
    resumed = run_training(
        world_config(
            tiny_world, run, max_train_steps=meta.step + 1, checkpointing_steps=1000, resume_from_checkpoint="latest"
        ),
        QUIET,
    )
    assert resumed.steps == meta.step + 1


KILL_DURING_SAVE = """
import os, signal, sys
from fantasytalk_cli.train import checkpoint
real = checkpoint.CheckpointMeta.write
def write(self, folder):
    if self.step == 4:  # the second checkpoint: die half-way through writing it
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, folder)
checkpoint.CheckpointMeta.write = write
from fantasytalk_cli.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_sigkill_during_a_save_keeps_the_previous_checkpoint(tiny_world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = world_argv(tiny_world, run, max_train_steps=6, checkpointing_steps=2)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, "train", *argv], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert (run / "latest").read_text().strip() == "checkpoint-2"
    assert newest_checkpoint(run) == run / "checkpoint-2"
    assert (run / ".checkpoint-4.tmp").is_dir()  # the partial one, never pointed at
    resumed = run_training(
        world_config(tiny_world, run, max_train_steps=3, checkpointing_steps=2, resume_from_checkpoint="latest"), QUIET
    )
    assert resumed.steps == 3
    assert not (run / ".checkpoint-4.tmp").exists()  # cleaned by the next successful save


def test_train_reports_missing_metadata(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fantasytalk_cli.cli import app

    result = CliRunner().invoke(app, ["train", "--output_dir", str(tmp_path / "run"), "--mixed_precision", "no"])
    assert result.exit_code == 1
    assert "--train_data_meta is required" in result.output
