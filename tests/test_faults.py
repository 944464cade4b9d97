"""Faults injected the way users meet them: an existing run folder, damaged and malicious checkpoints, a
read-only or full output disk, a model path that does not exist. Each case asserts the exit code, the
message's key words, that no traceback is printed, and that no file that was there before changed."""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fantasytalk_cli.checkpoints.folder import LATEST_NAME, STATE_DIR, newest_checkpoint
from fantasytalk_cli.checkpoints.manifest import MANIFEST_NAME, write_manifest
from fantasytalk_cli.cli import app
from fantasytalk_cli.config.flags import expand_multi_value_flags
from tests.tiny_world import build_world, world_argv

MARKER_NAME = "pwned"


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (to prove nothing changed)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def train(world: dict, run: Path, *extra: str, **overrides: object) -> tuple[int, str]:
    argv = world_argv(world, run, **{"max_train_steps": 2, "checkpointing_steps": 1, **overrides})
    result = CliRunner().invoke(app, expand_multi_value_flags(["train", *argv, *extra]))  # as `main` does
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def finished_run(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with checkpoint-1 and checkpoint-2, copied by each test that damages it."""
    run = tmp_path_factory.mktemp("faults") / "run"
    code, output = train(tiny_world, run)
    assert code == 0, output
    return run


@pytest.fixture
def run_copy(finished_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    subprocess.run(["cp", "-a", str(finished_run), str(target)], check=True)
    return target


# ---------------------------------------------------------------------------------------------- run folder


def test_existing_run_folder_is_not_overwritten(tiny_world: dict, run_copy: Path) -> None:
    (run_copy / "notes.txt").write_text("mine")
    before = snapshot(run_copy)
    code, output = train(tiny_world, run_copy, seed=99)
    assert code == 2 and "holds another run" in output and "--resume_from_checkpoint latest" in output
    assert snapshot(run_copy) == before


def test_overwrite_output_dir_sets_the_previous_run_aside(tiny_world: dict, run_copy: Path) -> None:
    (run_copy / "notes.txt").write_text("mine")
    before = snapshot(run_copy)
    code, output = train(tiny_world, run_copy, overwrite_output_dir=True, seed=99)
    assert code == 0, output
    (replaced,) = run_copy.glob("replaced-*")
    assert "--overwrite_output_dir" in output and replaced.name in output
    assert (run_copy / "notes.txt").read_text() == "mine"  # not ftalk's: left where it was
    moved = {f"{replaced.name}/{k}": v for k, v in before.items() if k != "notes.txt"}
    assert {k: v for k, v in snapshot(run_copy).items() if k.startswith(replaced.name)} == moved


def test_resume_latest_on_an_empty_folder_says_it_starts_anew(tiny_world: dict, tmp_path: Path) -> None:
    code, output = train(tiny_world, tmp_path / "new", "--resume_from_checkpoint", "latest", max_train_steps=1)
    assert code == 0 and "holds no checkpoint yet, so this starts a new run" in output


def test_resume_from_a_missing_checkpoint_is_an_error_before_anything_is_written(
    tiny_world: dict, tmp_path: Path
) -> None:
    code, output = train(tiny_world, tmp_path / "new", "--resume_from_checkpoint", str(tmp_path / "checkpoint-9"))
    assert code == 1 and "no checkpoint folder at" in output
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", ["file", "missing-model"])
def test_bad_paths_fail_first_and_leave_no_run_folder(kind: str, tiny_world: dict, tmp_path: Path) -> None:
    if kind == "file":
        out = tmp_path / "out"
        out.write_text("a file")
        code, output = train(tiny_world, out)
        assert code == 2 and "is a file, not a folder" in output and out.read_text() == "a file"
        return
    out = tmp_path / "run"
    code, output = train(tiny_world, out, pretrained_model_name_or_path=tmp_path / "nope")
    assert code == 1 and "does not exist" in output and "--pretrained_model_name_or_path" in output
    assert "probe" not in output and "plan" not in output  # reported before any data work
    assert not out.exists()


def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    before = snapshot(mine)
    for extra in ([], ["--overwrite"]):
        result = CliRunner().invoke(app, ["demo", "--work-dir", str(mine), *extra])
        assert result.exit_code == 2 and "not made by `ftalk demo`" in result.output
        assert "Traceback" not in result.output
    assert snapshot(mine) == before and len(list(mine.iterdir())) == 1


# ---------------------------------------------------------------------------------------------- disks


@contextlib.contextmanager
def tmpfs(path: Path, *options: str) -> Iterator[bool]:
    """Mount a small tmpfs at `path` (True), or yield False where mounting is not possible here."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                             capture_output=True).returncode == 0  # fmt: skip
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_output_folder_is_reported_before_the_model_loads(
    tiny_world: dict, tmp_path: Path, monkeypatch
) -> None:
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as mounted:
        if not mounted:  # a patched check: the folder says it is not writable
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == tmp_path / "ro" else real(p, m))
        code, output = train(tiny_world, tmp_path / "ro" / "run")
    assert code == 2 and "is not writable" in output


def test_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tiny_world: dict, finished_run: Path, tmp_path: Path, monkeypatch
) -> None:
    one = sum(p.stat().st_size for p in (finished_run / "checkpoint-1").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    with tmpfs(disk, f"size={one + 48 * 1024}") as mounted:  # checkpoint-1 fits (pages rounded), checkpoint-2 not
        if not mounted:  # a patched writer: the second save runs out of space
            import errno

            import fantasytalk_cli.train.checkpoint as ckpt

            calls = {"n": 0}
            real = ckpt.save_file

            def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                calls["n"] += 1
                if calls["n"] > 1:
                    raise OSError(errno.ENOSPC, "No space left on device", str(args[1]))
                return real(*args, **kwargs)

            monkeypatch.setattr(ckpt, "save_file", full)
        run = disk / "run"
        code, output = train(tiny_world, run, max_train_steps=3)
        assert code == 1, output
        assert "could not save checkpoint-2" in output and "The disk looks full" in output and "MB are free" in output
        assert (
            newest_checkpoint(run) == run / "checkpoint-1" and (run / LATEST_NAME).read_text().strip() == "checkpoint-1"
        )
        assert not list(run.glob(".checkpoint-*.tmp")) and not (run / "checkpoint-2").exists()


# ---------------------------------------------------------------------------------------------- checkpoints


class Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(
    "name",
    ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl", "zip:optimizer.bin"],
)
def test_resume_never_runs_code_from_a_checkpoint(name: str, tiny_world: dict, run_copy: Path) -> None:
    """The attacker rewrites the manifest too: it is the pickle check that stops it."""
    marker = run_copy.parent / MARKER_NAME
    target = run_copy / "checkpoint-2" / STATE_DIR / name.removeprefix("zip:")
    if name.startswith("zip:"):
        torch.save({"state": Payload(marker)}, target)  # a torch zip archive with the payload in data.pkl
    else:
        target.write_bytes(pickle.dumps({"state": Payload(marker)}))
    write_manifest(run_copy / "checkpoint-2")
    before = snapshot(run_copy)
    code, output = train(tiny_world, run_copy, "--resume_from_checkpoint", "latest", max_train_steps=3)
    assert not marker.exists(), "code from the checkpoint ran"
    assert snapshot(run_copy) == before
    # custom_checkpoint_0.pkl is never read (ftalk's run state is run_state.json), yet a pickle that names code
    # is a sign of tampering: the whole checkpoint is refused
    assert code == 1 and "refers to posix.system" in output and "Refused; nothing was loaded" in output


def test_damaged_latest_falls_back_to_the_newest_that_verifies(tiny_world: dict, run_copy: Path) -> None:
    weights = run_copy / "checkpoint-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    code, output = train(tiny_world, run_copy, "--resume_from_checkpoint", "latest", max_train_steps=3)
    assert code == 0, output
    assert "trainable.safetensors has 100 bytes" in output and "resuming from" in output
    assert f"resumed from {run_copy / 'checkpoint-1'} at step 1" in output


@pytest.mark.parametrize("damage", ["truncate-weights", "remove-optimizer", "remove-rng", "remove-manifest"])
def test_a_damaged_named_checkpoint_is_refused_naming_the_file(damage: str, tiny_world: dict, run_copy: Path) -> None:
    folder = run_copy / "checkpoint-2"
    target = {
        "truncate-weights": folder / "trainable.safetensors",
        "remove-optimizer": folder / STATE_DIR / "optimizer.bin",
        "remove-rng": folder / STATE_DIR / "random_states_0.pkl",
        "remove-manifest": folder / MANIFEST_NAME,
    }[damage]
    if damage.startswith("truncate"):
        target.write_bytes(target.read_bytes()[:10])
    else:
        target.unlink()
    before = snapshot(run_copy)
    code, output = train(tiny_world, run_copy, "--resume_from_checkpoint", str(folder), max_train_steps=3)
    assert code == 1 and target.name in output and "--allow_unverified_resume" in output, output
    assert snapshot(run_copy) == before


def test_allow_unverified_resume_says_which_guarantee_is_lost(tiny_world: dict, run_copy: Path) -> None:
    folder = run_copy / "checkpoint-2"
    (folder / STATE_DIR / "random_states_0.pkl").unlink()
    code, output = train(
        tiny_world, run_copy, "--resume_from_checkpoint", str(folder), allow_unverified_resume=True, max_train_steps=3
    )
    assert code == 0, output
    assert "resuming from it anyway" in output and "noise, timesteps and dropout will differ" in output


def test_outputs_follow_the_umask(tmp_path: Path) -> None:
    """Plans, clean metadata, checkpoints (safetensors too), converted adapters and tiny models: 0666 & ~umask."""
    from fantasytalk_cli.cli import main

    old = os.umask(0o027)
    try:
        world = build_world(tmp_path / "world", num_clips=4)
        run = tmp_path / "run"
        argv = [
            *world_argv(world, run, max_train_steps=1, checkpointing_steps=1),
            "--bucket_plan",
            str(tmp_path / "p.json"),
        ]
        for command in (
            ["plan-buckets", *argv, "--write", str(tmp_path / "p.json")],
            ["train", *argv],
            ["convert-zero", str(run), str(tmp_path / "adapter")],
        ):
            with pytest.raises(SystemExit) as exc:
                main(command)
            assert exc.value.code in (0, None), command
    finally:
        os.umask(old)
    written = [world["clean"], tmp_path / "p.json", *run.rglob("*"), *(tmp_path / "adapter").rglob("*"),
               *world["model"].rglob("*")]  # fmt: skip
    modes = {p: p.stat().st_mode & 0o777 for p in written}
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o750 if p.is_dir() else 0o640)}
    assert not wrong, wrong


# ---------------------------------------------------------------------------------------------- data folder


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_media_outside_the_data_folder_is_refused_alike(kind: str, tiny_world: dict, tmp_path: Path) -> None:
    import json
    import shutil

    from fantasytalk_cli.data.synthetic import make_demo_dataset

    data = tmp_path / "data"
    make_demo_dataset(data, seed=2, num_clips=4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    meta = data / "metadata_control.json"
    entries = json.loads(meta.read_text())
    moved = elsewhere / Path(entries[0]["file_path"]).name
    shutil.move(data / entries[0]["file_path"], moved)
    entries[0]["file_path"] = {
        "absolute": str(moved),
        "dotdot": f"../elsewhere/{moved.name}",
        "symlink": "train/linked.mp4",
    }[kind]
    if kind == "symlink":
        (data / "train" / "linked.mp4").symlink_to(moved)
    meta.write_text(json.dumps(entries))
    before = snapshot(tmp_path)
    small = ["--video_sample_size=48", "--video_sample_n_frames=9", "--no-enable_bucket"]
    validate = CliRunner().invoke(app, ["validate-metadata", str(meta), "--workers=1", *small])
    assert validate.exit_code == 1 and "E302" in validate.output and "outside" in validate.output
    plan = CliRunner().invoke(app, ["plan-buckets", str(meta), *small])
    if kind == "symlink":  # plan-buckets judges paths as written (it opens no file); validate and train follow links
        assert plan.exit_code == 0, plan.output
    else:
        assert plan.exit_code == 2 and "outside the data folder" in plan.output and "entry 0" in plan.output
    code, output = train(tiny_world, tmp_path / "run", train_data_meta=meta, train_data_dir=None, transformer_path=None)
    assert code == 1 and "outside the data folder" in output and "--allow_outside_data_dir" in output
    assert not (tmp_path / "run").exists()
    after = {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".ftalk-probe-cache.jsonl")}
    assert after == {k: v for k, v in before.items() if not k.endswith(".ftalk-probe-cache.jsonl")}
    allowed = CliRunner().invoke(
        app, ["validate-metadata", str(meta), "--workers=1", "--allow_outside_data_dir", *small]
    )
    assert allowed.exit_code == 0 and "E302" not in allowed.output, allowed.output
