"""Run-folder checkpoints: `checkpoint-N/` written atomically, `latest`, `meta.json`, pruning, resume.

Layout of one checkpoint::

    checkpoint-N/
      meta.json                        step, epoch, config hash + the resolved config, versions
      trainable.safetensors            the trainable weights (fp32, our parameter names)
      fantasytalking_model.ckpt        the same adapter in the released FantasyTalking format
      run_state.json                   the loop's counters and the sampler's position (JSON: nothing to unpickle)
      accelerate/                      accelerate state: optimizer (+ trainable model) shards, scheduler, RNG
      manifest.json                    every file's size and sha256, written last (resume verifies it first)

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
import logging
import pickle
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import follow_umask, swap_folder, write_text_atomic
from fantasytalk_cli.models.adapter_file import adapter_to_format
from fantasytalk_cli.models.trainable import released_adapter
from fantasytalk_cli.train.distributed import Strategy, fsdp_clean_name, gather_trainable_state
from fantasytalk_cli.train.manifest import checkpoint_size, verify_manifest, write_manifest
from fantasytalk_cli.train.safe_pickle import DCP_METADATA_GLOBALS, TENSOR_STATE_GLOBALS, check_pickle_file

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
META_NAME = "meta.json"
WEIGHTS_NAME = "trainable.safetensors"
ADAPTER_CKPT_NAME = "fantasytalking_model.ckpt"
STATE_DIR = "accelerate"
LATEST_NAME = "latest"
RUN_STATE_NAME = "run_state.json"
META_VERSION = 1


class CheckpointError(FtalkError, RuntimeError):
    """A checkpoint to resume from is missing, incomplete or unreadable."""


@dataclass
class CheckpointMeta:
    """The small record every checkpoint carries."""

    step: int
    epoch: int
    config_hash: str
    config: dict[str, Any]
    strategy: str
    world_size: int
    versions: dict[str, str] = field(default_factory=dict)
    format_version: int = META_VERSION

    def write(self, folder: Path) -> None:
        write_text_atomic(folder / META_NAME, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, folder: Path) -> CheckpointMeta:
        path = folder / META_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise CheckpointError(f"{folder} has no {META_NAME}: it is not a complete ftalk checkpoint") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is corrupt ({exc}); resume from an older checkpoint") from exc
        try:
            return cls(**data)
        except TypeError as exc:
            raise CheckpointError(f"{path}: unexpected fields ({exc}); was it written by another tool?") from exc


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def temp_checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f".checkpoint-{step}.tmp"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with meta.json), oldest first."""
    found = []
    if output_dir.is_dir():
        for child in output_dir.iterdir():
            m = CHECKPOINT_RE.match(child.name)
            if m and child.is_dir() and (child / META_NAME).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The checkpoint `latest` names, else the highest complete one, else None."""
    pointer = output_dir / LATEST_NAME
    if pointer.is_file():
        named = output_dir / pointer.read_text().strip()
        if (named / META_NAME).is_file():
            return named
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """Turn `--resume_from_checkpoint` into a checkpoint folder (None: start fresh)."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        return latest_checkpoint(output_dir)  # nothing yet: start fresh, as the reference does
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
    latest = latest_checkpoint(output_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        if path != latest:
            shutil.rmtree(path)
            removed.append(path)
    return removed


# --- saving and restoring a training run (collective: every rank calls these) -------------------


def install_state_hooks(accelerator: Accelerator, strategy: Strategy) -> None:
    """Plain (DDP) runs: accelerate would write the whole model (the 14B base included, the
    reference's waste) and read it back. The trainable weights already sit in `trainable.safetensors`,
    so accelerate skips the model and `load_training_checkpoint` restores it from that file. (ZeRO and
    FSDP leave the frozen weights out in `save_training_checkpoint` itself.)"""
    if strategy.name != "ddp":
        return

    def skip_model_save(models: list, weights: list, output_dir: str) -> None:  # noqa: ARG001
        weights.clear()

    def skip_model_load(models: list, input_dir: str) -> None:  # noqa: ARG001
        models.clear()

    accelerator.register_save_state_pre_hook(skip_model_save)
    accelerator.register_load_state_pre_hook(skip_model_load)


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
        if strategy.name in ("zero2", "zero3"):
            accelerator.save_state(str(tmp / STATE_DIR), exclude_frozen_parameters=True)
        elif strategy.name == "fsdp":
            with fsdp_trainable_only(model):
                accelerator.save_state(str(tmp / STATE_DIR))
        else:
            accelerator.save_state(str(tmp / STATE_DIR))
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as a RuntimeError of its zip writer
        failure = exc
    _stop_if_failed(accelerator, model, failure, output_dir, meta.step)
    weights = gather_trainable_state(accelerator, model, strategy)
    accelerator.wait_for_everyone()  # every rank's files are written before the manifest lists them
    if main:
        try:
            save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "step": str(meta.step)})
            follow_umask(tmp / WEIGHTS_NAME)
            adapter = released_adapter(weights)
            if adapter is not None:
                released = adapter_to_format({k: v.to(torch.bfloat16) for k, v in adapter.items()}, "fantasytalking")
                torch.save(released, tmp / ADAPTER_CKPT_NAME)
            write_text_atomic(tmp / RUN_STATE_NAME, json.dumps(run_state, sort_keys=True))
            meta.write(tmp)
            write_manifest(tmp)
            finalize_checkpoint(output_dir, meta.step)
        except (OSError, RuntimeError) as exc:
            failure = exc
    _stop_if_failed(accelerator, model, failure, output_dir, meta.step)
    if main:
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


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
    previous = latest_checkpoint(output_dir)
    kept = f"the previous checkpoint {previous} and `latest` are kept" if previous else "no earlier checkpoint exists"
    cause = "another process failed to write its part"
    if isinstance(failure, OSError):
        cause = f"{failure.strerror or failure}" + (f" ({failure.filename})" if failure.filename else "")
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
    raise CheckpointError(message)


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
    if meta.world_size != accelerator.num_processes and strategy.name != "ddp":
        raise CheckpointError(
            f"{folder} was written by {meta.world_size} processes ({meta.strategy}); this run has "
            f"{accelerator.num_processes}: sharded optimizer state cannot be re-split, resume with the same count"
        )
    state = folder / STATE_DIR
    check_state_pickles(state, strategy)
    if strategy.name in ("zero2", "zero3"):
        notes.append(
            f"DeepSpeed reads its engine files in {state} with pickle, which can run code: resume only from "
            "checkpoints you or a source you trust wrote"
        )
    rng = state / f"random_states_{accelerator.process_index}.pkl"
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
        _load_state(accelerator, model, strategy, folder, state)
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
        elif path.suffix == ".pt" and strategy.name not in ("zero2", "zero3"):
            check_pickle_file(path, TENSOR_STATE_GLOBALS)


def _load_state(
    accelerator: Accelerator, model: torch.nn.Module, strategy: Strategy, folder: Path, state: Path
) -> None:
    if strategy.name in ("zero2", "zero3"):
        # not strict: the frozen weights were excluded at save; that every trainable one is there is checked
        module = accelerator.unwrap_model(model)
        with recorded_load_keys(module) as loads:
            accelerator.load_state(str(state), load_module_strict=False)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        verify_module_state(loads, trainable, state)
    elif strategy.name == "fsdp":
        if strategy.fsdp_version == 1:
            for optimizer in accelerator._optimizers:  # the prepared ones (accelerate keeps no public list)
                init_optimizer_state(optimizer.optimizer)
        with fsdp_trainable_only(model):
            accelerator.load_state(str(state))
    else:
        accelerator.load_state(str(state))
        _restore_plain_trainable(accelerator, model, folder)


def _restore_plain_trainable(accelerator: Accelerator, model: torch.nn.Module, folder: Path) -> None:
    """DDP: the trainable weights come from `trainable.safetensors`, which must name exactly them."""
    saved = load_file(str(folder / WEIGHTS_NAME))
    unwrapped = accelerator.unwrap_model(model)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainable))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME} does not match this run's trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was --trainable_modules changed?)"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name].to(param.dtype))


@contextmanager
def recorded_load_keys(module: torch.nn.Module) -> Iterator[list[tuple[list[str], list[str]]]]:
    """Record (missing, unexpected) keys of every `load_state_dict` on `module` inside the block."""
    loads: list[tuple[list[str], list[str]]] = []

    def record(_module: torch.nn.Module, incompatible: Any) -> None:
        loads.append((list(incompatible.missing_keys), list(incompatible.unexpected_keys)))

    handle = module.register_load_state_dict_post_hook(record)
    try:
        yield loads
    finally:
        handle.remove()


def verify_module_state(loads: list[tuple[list[str], list[str]]], trainable: Iterable[str], where: Path) -> None:
    """ZeRO resume: the module state DeepSpeed loaded (non-strict, frozen weights excluded) held every
    trainable parameter and nothing this model lacks; else a CheckpointError naming them."""
    if not loads:
        raise CheckpointError(f"{where}: DeepSpeed restored no module state; the trainable weights were not loaded")
    for missing, unexpected in loads:
        lost = sorted(set(missing) & set(trainable))
        if lost or unexpected:
            raise CheckpointError(
                f"{where}: the checkpoint's module state does not match this run's trainable parameters: "
                f"missing {len(lost)} {lost[:10]}, unknown {len(unexpected)} {sorted(unexpected)[:10]} "
                "(was --trainable_modules or the model changed?)"
            )


class _SkipMissingFrozen(logging.Filter):
    """FSDP1's sharded load warns once per parameter absent from the state dict: expected for frozen ones."""

    def __init__(self, frozen: set[str]) -> None:
        super().__init__()
        self.frozen = frozen

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Did not find param with FQN "):
            return True
        return fsdp_clean_name(message.split()[6].rstrip(",")) not in self.frozen


@contextmanager
def fsdp_trainable_only(model: torch.nn.Module) -> Iterator[None]:
    """FSDP (1 and 2): while accelerate saves or loads the sharded model state, leave the frozen parameters
    out of it. accelerate has no switch for that (DeepSpeed's `exclude_frozen_parameters`; accelerate's
    `adapter_only` is for PEFT models), so hooks on the wrapped model do it: its state dict drops them
    (saving writes, and loading reads, only the trainable shards), and loading accepts their absence
    (they keep the values built from the base model). Checkpoints that do hold them still load."""
    frozen = {fsdp_clean_name(n) for n, p in model.named_parameters() if not p.requires_grad}

    def drop_frozen(_module: torch.nn.Module, state_dict: dict, _prefix: str, _metadata: Any) -> None:
        for key in [k for k in state_dict if fsdp_clean_name(k) in frozen]:
            del state_dict[key]

    def allow_missing_frozen(_module: torch.nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if fsdp_clean_name(k) not in frozen]

    fsdp_log = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
    quiet = _SkipMissingFrozen(frozen)
    handles = [
        model.register_state_dict_post_hook(drop_frozen),
        model.register_load_state_dict_post_hook(allow_missing_frozen),
    ]
    fsdp_log.addFilter(quiet)
    try:
        yield
    finally:
        fsdp_log.removeFilter(quiet)
        for handle in handles:
            handle.remove()


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """FSDP1 resume: accelerate loads the optimizer into a template made from the live optimizer's state
    dict, which holds no state before the first step: the saved Adam moments and step counts would be
    dropped without a word (the resumed run then drifts from an uninterrupted one; FSDP2's
    `get_optimizer_state_dict` guards against that itself). Create the state first with a step on zero
    gradients at learning rate 0, which leaves the weights as they are (as torch does for FSDP2)."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        return
    for param in params:
        param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
