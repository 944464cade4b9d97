"""One run per folder (`locks.py`): two real `ftalk train` into one folder, a killed holder's stale lock, resume into
a live run's folder, a second `ftalk cache` process of one rank, a second `convert-zero` to one output, and a save
that fails inside the safetensors writer."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from fantasytalk_cli.checkpoints.folder import LATEST_NAME, list_checkpoints, newest_checkpoint
from fantasytalk_cli.checkpoints.manifest import verify_manifest
from fantasytalk_cli.cli import app
from fantasytalk_cli.config.flags import expand_multi_value_flags
from fantasytalk_cli.locks import LOCK_NAME, FolderBusyError, acquire, beside
from tests.tiny_world import world_argv

REPO = Path(__file__).resolve().parents[1]
HOLD = "import sys, time; from fantasytalk_cli.locks import acquire; acquire(__import__('pathlib').Path(sys.argv[1]), 'x', 'y'); print('held', flush=True); time.sleep(600)"  # noqa: E501


def _holder(lock: Path) -> subprocess.Popen:
    """A live process holding `lock` (as a running run's main process does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _ftalk(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fantasytalk_cli", *expand_multi_value_flags(list(argv))],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_lock_is_exclusive_and_released_with_its_file(tmp_path: Path) -> None:
    lock = acquire(tmp_path / LOCK_NAME, "the folder", "the fix")
    with pytest.raises(FolderBusyError, match=rf"the folder is in use by pid {os.getpid()} on .*: the fix"):
        acquire(tmp_path / LOCK_NAME, "the folder", "the fix")
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    acquire(tmp_path / LOCK_NAME, "the folder", "the fix").release()


def test_a_killed_holder_does_not_block(tmp_path: Path) -> None:
    proc = _holder(tmp_path / LOCK_NAME)
    with pytest.raises(FolderBusyError, match=f"pid {proc.pid}"):
        acquire(tmp_path / LOCK_NAME, "the folder", "fix")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the stale file stays, but the OS released its lock
    acquire(tmp_path / LOCK_NAME, "the folder", "fix").release()


@pytest.mark.slow
def test_two_trains_into_one_folder(tiny_world: dict, tmp_path: Path) -> None:
    """The second `ftalk train` (plain or resuming `latest`) exits 2 at once naming the first; the first trains on and
    its checkpoints verify; after it ends, and after a killed holder (kill -9), the folder is free again."""
    run = tmp_path / "run"
    argv = world_argv(tiny_world, run, max_train_steps=100_000, checkpointing_steps=2)
    first = subprocess.Popen(
        [sys.executable, "-m", "fantasytalk_cli", "train", *argv], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 180
    while newest_checkpoint(run) is None and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)  # training is under way: its lock is held and it has checkpoints to lose
    assert (run / LOCK_NAME).is_file() and first.poll() is None, first.communicate()[0]
    for extra in ([], ["--resume_from_checkpoint", "latest"]):
        t0 = time.perf_counter()
        second = _ftalk("train", *argv, *extra)
        said = second.stdout + second.stderr
        assert second.returncode == 2, said
        assert f"is in use by pid {first.pid}" in said and "Traceback" not in said and "another --output_dir" in said
        assert time.perf_counter() - t0 < 60  # refused before any model loads
    assert first.poll() is None  # the first trains on
    first.send_signal(signal.SIGTERM)  # it stops cleanly with a last checkpoint
    output, _ = first.communicate(timeout=300)
    assert first.returncode == 0, output
    saved = list_checkpoints(run)
    assert saved and all(verify_manifest(folder) is None for _, folder in saved)
    assert not (run / LOCK_NAME).exists()  # released with the run
    holder = _holder(run / LOCK_NAME)  # a run killed with kill -9 leaves its lock file behind
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    step = saved[-1][0]
    resumed = _ftalk("train", *world_argv(tiny_world, run, max_train_steps=step + 1, checkpointing_steps=1000,
                                           resume_from_checkpoint="latest"))  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert newest_checkpoint(run) == run / f"checkpoint-{step + 1}"


def test_resume_into_a_live_runs_folder_is_refused(tiny_world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    holder = _holder(run / LOCK_NAME)
    try:
        argv = world_argv(tiny_world, run, max_train_steps=1, resume_from_checkpoint="latest")
        result = CliRunner().invoke(app, expand_multi_value_flags(["train", *argv]))
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2, result.output
    assert f"in use by pid {holder.pid}" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written


def test_a_second_cache_process_of_one_rank_is_refused(tiny_world: dict, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    argv = world_argv(tiny_world, tmp_path / "unused", cache_dir=cache)
    first = CliRunner().invoke(app, expand_multi_value_flags(["cache", *argv]))  # makes the cache folder
    assert first.exit_code == 0, first.output
    holder = _holder(cache / ".ftalk-rank0.lock")
    try:
        second = CliRunner().invoke(app, expand_multi_value_flags(["cache", *argv]))
        other_rank = CliRunner().invoke(
            app, expand_multi_value_flags(["cache", *argv]), env={"RANK": "1", "WORLD_SIZE": "2"}
        )
    finally:
        holder.kill()
        holder.wait()
    assert (
        second.exit_code == 2 and f"rank 0 of the feature cache {cache} is in use by pid {holder.pid}" in second.output
    )
    assert other_rank.exit_code == 0, other_rank.output  # another rank cooperates, as ranks do


def test_a_second_conversion_to_one_output_is_refused(tiny_world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    trained = CliRunner().invoke(
        app, expand_multi_value_flags(["train", *world_argv(tiny_world, run, max_train_steps=1)])
    )
    assert trained.exit_code == 0, trained.output
    out = tmp_path / "adapter"
    holder = _holder(beside(out.absolute()))
    try:
        result = CliRunner().invoke(app, ["convert-zero", str(run), str(out)])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2 and f"in use by pid {holder.pid}" in result.output, result.output
    assert not out.exists()


def test_a_save_failing_inside_safetensors_is_one_line(tiny_world: dict, tmp_path: Path, monkeypatch) -> None:
    import fantasytalk_cli.train.checkpoint as ckpt

    calls = {"n": 0}
    real = ckpt.save_file

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > 1:
            raise SafetensorError("Error while serializing: I/O error: No such file or directory (os error 2)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", broken)
    run = tmp_path / "run"
    argv = world_argv(tiny_world, run, max_train_steps=3, checkpointing_steps=1)
    result = CliRunner().invoke(app, expand_multi_value_flags(["train", *argv]))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    line = next(line for line in result.output.splitlines() if "could not save checkpoint-2" in line)
    assert "SafetensorError" in line and "trainable.safetensors" in line and "--resume_from_checkpoint latest" in line
    assert newest_checkpoint(run) == run / "checkpoint-1" and (run / LATEST_NAME).read_text().strip() == "checkpoint-1"
    assert verify_manifest(run / "checkpoint-1") is None and not list(run.glob(".checkpoint-*.tmp"))
