"""Saving and resuming a training run: `checkpoint-N/` written atomically by every rank, `latest`, pruning, and the
verified resume (the folder's layout and names: `checkpoints/folder.py`).

The frozen base is never written (`docs/training.md#checkpoints`: only 0.84B of the 14B parameters train; the base
comes from the base model on resume): ZeRO through DeepSpeed's `exclude_frozen_parameters`, FSDP through
state-dict hooks around accelerate's save and load (`fsdp_trainable_only`), DDP by skipping the model
(`install_state_hooks`; `trainable.safetensors` is its model state).

Every rank writes its part of the accelerate state into `.checkpoint-N.tmp/`; the main process
then writes the weights and meta, renames the folder into place (an atomic rename on one
filesystem) and only then rewrites `latest`. A crash at any point leaves the previous checkpoint
and `latest` intact; leftover `.tmp` folders are ignored and cleaned on the next save.
"""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from fantasytalk_cli.checkpoints.folder import (
    ADAPTER_CKPT_NAME,
    CHECKPOINT_RE,
    LATEST_NAME,
    RUN_STATE_NAME,
    STATE_DIR,
    WEIGHTS_NAME,
    CheckpointError,
    CheckpointMeta,
    checkpoint_dir,
    list_checkpoints,
    newest_checkpoint,
    temp_checkpoint_dir,
)
from fantasytalk_cli.checkpoints.manifest import checkpoint_size, verify_manifest, write_manifest
from fantasytalk_cli.checkpoints.safe_pickle import DCP_METADATA_GLOBALS, TENSOR_STATE_GLOBALS, check_pickle_file
from fantasytalk_cli.fileio import follow_umask, swap_folder, write_text_atomic
from fantasytalk_cli.models.adapter_file import adapter_to_format
from fantasytalk_cli.models.trainable import released_adapter
from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.train.distributed import Strategy, gather_trainable_state, load_state, save_state


def resolve_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """Turn `--resume_from_checkpoint` into a checkpoint folder (None: start fresh)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        return newest_checkpoint(output_dir)  # nothing yet: start fresh, as the reference does
    path = Path(resume_from)
    looked = [path]
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume_from
        looked.append(path)
    if not path.is_dir():
        where = " or ".join(map(str, looked))
        raise CheckpointError(f"--resume_from_checkpoint {resume_from}: no checkpoint folder at {where}")
    CheckpointMeta.read(path)  # complete?
    return path


def finalize_checkpoint(output_dir: Path, step: int) -> Path:
    """Main process only: move the written temporary folder into place and point `latest` at it."""
    tmp = temp_checkpoint_dir(output_dir, step)
    final = checkpoint_dir(output_dir, step)
    swap_folder(tmp, final)  # a re-run of the same step (resumed run) replaces it only now, when complete
    write_text_atomic(output_dir / LATEST_NAME, final.name + "\n")
    return final


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Main process only, after a successful save: delete the oldest complete checkpoints beyond `keep`,
    and stale temporary folders of interrupted saves."""
    removed: list[Path] = []
    for child in output_dir.glob(".checkpoint-*.tmp"):
        shutil.rmtree(child, ignore_errors=True)
    if keep is None:
        return removed
    found = list_checkpoints(output_dir)
    latest = newest_checkpoint(output_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        if path != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


# --- saving and restoring a training run (collective: every rank calls these) -------------------


def save_training_checkpoint(
    accelerator: Accelerator,
    model: torch.nn.Module,
    strategy: Strategy,
    output_dir: Path,
    meta: CheckpointMeta,
    total_limit: int | None,
    run_state: dict[str, Any],
) -> Path:
    """Write `checkpoint-<step>/` atomically; returns its final path (on every rank). `run_state` (the loop's
    counters and sampler position, JSON data) goes to `run_state.json`. A file-system failure on any rank
    (a full disk, a folder made read-only) removes the partial temporary folder, keeps the previous
    checkpoint and `latest`, and raises `CheckpointError` with the cause on every rank."""
    tmp = temp_checkpoint_dir(output_dir, meta.step)
    final = checkpoint_dir(output_dir, meta.step)
    main = accelerator.is_main_process
    failure: Exception | None = None
    if main:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            failure = exc
    _stop_if_failed(accelerator, model, failure, output_dir, meta.step)
    try:
        save_state(accelerator, model, strategy, tmp / STATE_DIR)
    except Exception as exc:  # noqa: BLE001 (torch, accelerate, DeepSpeed: any writer error ends as one line)
        failure = _while_writing(exc, tmp / STATE_DIR)
    _stop_if_failed(accelerator, model, failure, output_dir, meta.step)
    weights = gather_trainable_state(accelerator, model, strategy)
    accelerator.wait_for_everyone()  # every rank's files are written before the manifest lists them
    if main:
        writing = tmp / WEIGHTS_NAME
        try:
            save_file(weights, str(writing), metadata={"format": "pt", "step": str(meta.step)})
            follow_umask(writing)
            adapter = released_adapter(weights)
            if adapter is not None:
                released = adapter_to_format({k: v.to(torch.bfloat16) for k, v in adapter.items()}, "fantasytalking")
                writing = tmp / ADAPTER_CKPT_NAME
                torch.save(released, writing)
            writing = tmp / RUN_STATE_NAME
            write_text_atomic(writing, json.dumps(run_state, sort_keys=True))
            writing = tmp
            meta.write(tmp)
            write_manifest(tmp)
            writing = checkpoint_dir(output_dir, meta.step)
            finalize_checkpoint(output_dir, meta.step)
        except Exception as exc:  # noqa: BLE001 (safetensors, torch: any writer error ends as one line)
            failure = _while_writing(exc, writing)
    _stop_if_failed(accelerator, model, failure, output_dir, meta.step)
    if main:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def _while_writing(exc: Exception, path: Path) -> Exception:
    """`exc` as the cause to report: an OSError names its file itself; another error gets the file it met."""
    if isinstance(exc, OSError):
        exc.filename = exc.filename or str(path)
        return exc
    failure = _WriteFailure(f"{type(exc).__name__}: {exc} (writing {path})")
    failure.__cause__ = exc  # `--debug` shows the writer's own traceback
    return failure


class _WriteFailure(Exception):
    """A non-OS error of a checkpoint writer, with the file it was writing."""


def _stop_if_failed(
    accelerator: Accelerator, model: torch.nn.Module, failure: Exception | None, output_dir: Path, step: int
) -> None:
    """A collective: when any rank failed to write, every rank removes nothing but the temporary folder
    (main) and raises the same kind of error, so none waits forever for the others."""
    flag = torch.tensor(float(failure is not None), device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() == 0:
        return
    tmp = temp_checkpoint_dir(output_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = newest_checkpoint(output_dir)
    kept = f"the previous checkpoint {previous} and `latest` are kept" if previous else "no earlier checkpoint exists"
    cause = "another process failed to write its part"
    if isinstance(failure, OSError):
        cause = f"{failure.strerror or failure}" + (f" ({failure.filename})" if failure.filename else "")
    elif isinstance(failure, _WriteFailure):
        cause = str(failure)
    elif failure is not None:
        cause = f"{type(failure).__name__}: {failure}"
    message = f"could not save checkpoint-{step} in {output_dir}: {cause}. The partial {tmp.name} was removed; {kept}."
    trainable = sum(p.numel() for p in accelerator.unwrap_model(model).parameters() if p.requires_grad)
    # fp32 weights + AdamW's two fp32 moments + the bf16 release copy, or what the last checkpoint took
    need = checkpoint_size(previous) if previous else trainable * 14
    free = shutil.disk_usage(_existing(output_dir)).free
    full = isinstance(failure, OSError) and failure.errno in (errno.ENOSPC, errno.EDQUOT)
    if full or free < 2 * need:
        message += (
            f" The disk looks full: a checkpoint needs about {need / 1e6:,.2f} MB and {free / 1e6:,.2f} MB are free "
            "there. Free space, or move --output_dir to a larger disk and resume with --resume_from_checkpoint"
        )
    elif failure is not None:
        message += (
            f" Check that {output_dir} is writable and nothing else writes there, then continue with "
            "--resume_from_checkpoint latest (`--debug` shows the traceback)"
        )
    raise CheckpointError(message) from failure


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def pick_resume(
    output_dir: Path, requested: str | None, candidate: Path | None, allow_unverified: bool
) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, verified against its manifest (main process; reads every byte).
    With `latest`, a damaged newest checkpoint falls back to the newest one that verifies, saying so; a named
    one that fails is an error naming the file; `allow_unverified` resumes anyway with a warning."""
    if candidate is None:
        return None, []
    problem = verify_manifest(candidate)
    if problem is None:
        return candidate, []
    if allow_unverified:
        return candidate, [f"{problem}; resuming from it anyway (--allow_unverified_resume)"]
    if requested == "latest":
        named = CHECKPOINT_RE.match(candidate.name)
        step = int(named.group(1)) if named else None
        for older_step, older in reversed(list_checkpoints(output_dir)):
            if (step is None or older_step < step) and verify_manifest(older) is None:
                return older, [f"{problem}; resuming from {older}, the newest checkpoint that verifies"]
    raise CheckpointError(
        f"cannot resume: {problem}. Resume from an earlier checkpoint (--resume_from_checkpoint "
        f"{output_dir}/checkpoint-N), or pass --allow_unverified_resume to load it as it is"
    )


def load_training_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, strategy: Strategy, folder: Path, allow_unverified: bool = False
) -> tuple[CheckpointMeta, dict[str, Any], list[str]]:
    """Restore model, optimizer, scheduler and RNG; returns the meta, the loop's run state (`run_state.json`)
    and notes. Every pickle that loading would read is checked first (`safe_pickle`): nothing in a checkpoint
    runs code, except DeepSpeed's own engine files (pickles by design, said in the notes)."""
    meta = CheckpointMeta.read(folder)
    notes: list[str] = []
    world = World.of(accelerator)
    if meta.world_size != world.dp_size and not strategy.reshards:
        raise CheckpointError(
            f"{folder} was written by {meta.world_size} processes ({meta.strategy}); this run has "
            f"{world.dp_size}: sharded optimizer state cannot be re-split, resume with the same count"
        )
    state = folder / STATE_DIR
    check_state_pickles(state, strategy)
    if strategy.engine_pickles:
        notes.append(
            f"DeepSpeed reads its engine files in {state} with pickle, which can run code: resume only from "
            "checkpoints you or a source you trust wrote"
        )
    rng = state / f"random_states_{world.dp_rank}.pkl"
    if not rng.is_file():
        if not allow_unverified:
            raise CheckpointError(
                f"{rng} is missing: the resumed run would draw other noise, timesteps and dropout than an "
                "uninterrupted one. Resume from another checkpoint, or accept that with --allow_unverified_resume"
            )
        notes.append(f"{rng} is missing: noise, timesteps and dropout will differ from an uninterrupted run")
    try:
        run_state = json.loads((folder / RUN_STATE_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"{folder / RUN_STATE_NAME} cannot be read ({exc}): resume from another checkpoint"
        ) from exc
    try:
        load_state(accelerator, model, strategy, folder, state)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError, KeyError, OSError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"{state}: loading the optimizer, scheduler or model state failed ({type(exc).__name__}: {exc}); "
            "resume from another checkpoint"
        ) from exc
    return meta, run_state, notes


def check_state_pickles(state: Path, strategy: Strategy) -> None:
    """Every pickle accelerate (or torch's distributed checkpoint) would read from `state`, checked against
    the allow-lists; DeepSpeed's own `.pt` engine files are left to DeepSpeed (see the resume note)."""
    if not state.is_dir():
        raise CheckpointError(f"{state} is missing: the checkpoint holds no optimizer or RNG state")
    for path in sorted(state.rglob("*")):
        if path.suffix in (".pkl", ".bin"):
            check_pickle_file(path, TENSOR_STATE_GLOBALS)
        elif path.name == ".metadata":
            check_pickle_file(path, DCP_METADATA_GLOBALS)
        elif path.suffix == ".pt" and not strategy.engine_pickles:
            check_pickle_file(path, TENSOR_STATE_GLOBALS)
