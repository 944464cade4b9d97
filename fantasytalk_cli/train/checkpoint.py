"""Run-folder checkpoints: `checkpoint-N/` written atomically, `latest`, `meta.json`, pruning, resume.

Layout of one checkpoint::

    checkpoint-N/
      meta.json                        step, epoch, config hash + the resolved config, versions
      trainable.safetensors            the trainable weights (fp32, our parameter names)
      fantasytalking_model.ckpt        the same adapter in the released FantasyTalking format
      accelerate/                      accelerate state: model/optimizer shards, scheduler, RNG, sampler

Every rank writes its part of the accelerate state into `.checkpoint-N.tmp/`; the main process
then writes the weights and meta, renames the folder into place (an atomic rename on one
filesystem) and only then rewrites `latest`. A crash at any point leaves the previous checkpoint
and `latest` intact; leftover `.tmp` folders are ignored and cleaned on the next save.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from fantasytalk_cli.models.loaders import adapter_to_format
from fantasytalk_cli.models.state_dict_adapters import is_adapter_name
from fantasytalk_cli.train.distributed import Strategy, gather_trainable_state

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
META_NAME = "meta.json"
WEIGHTS_NAME = "trainable.safetensors"
ADAPTER_CKPT_NAME = "fantasytalking_model.ckpt"
STATE_DIR = "accelerate"
LATEST_NAME = "latest"
META_VERSION = 1


class CheckpointError(RuntimeError):
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


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and an atomic replace (fsync'd)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


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
    if not path.is_absolute() and not path.exists():
        path = output_dir / resume_from
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint {resume_from}: no such checkpoint folder ({path})")
    CheckpointMeta.read(path)  # complete?
    return path


def finalize_checkpoint(output_dir: Path, step: int) -> Path:
    """Main process only: move the written temporary folder into place and point `latest` at it."""
    tmp = temp_checkpoint_dir(output_dir, step)
    final = checkpoint_dir(output_dir, step)
    if final.exists():  # a re-run of the same step (resumed run): replace it only now, when complete
        old = output_dir / f".checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(output_dir)
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- saving and restoring a training run (collective: every rank calls these) -------------------


def install_state_hooks(accelerator: Accelerator) -> None:
    """Plain (DDP) runs: accelerate would write the whole model (the 14B base included, the
    reference's waste) and read it back. The trainable weights already sit in `trainable.safetensors`,
    so accelerate skips the model and `load_training_checkpoint` restores it from that file."""

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
) -> Path:
    """Write `checkpoint-<step>/` atomically; returns its final path (on every rank)."""
    tmp = temp_checkpoint_dir(output_dir, meta.step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if strategy.name in ("zero2", "zero3") else {}
    accelerator.save_state(str(tmp / STATE_DIR), **kwargs)
    weights = gather_trainable_state(accelerator, model, strategy)
    final = checkpoint_dir(output_dir, meta.step)
    if accelerator.is_main_process:
        save_file(weights, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "step": str(meta.step)})
        adapter = {k: v for k, v in weights.items() if is_adapter_name(k)}
        if adapter and len(adapter) == len(weights):
            released = adapter_to_format({k: v.to(torch.bfloat16) for k, v in adapter.items()}, "fantasytalking")
            torch.save(released, tmp / ADAPTER_CKPT_NAME)
        meta.write(tmp)
        finalize_checkpoint(output_dir, meta.step)
        prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def load_training_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, strategy: Strategy, folder: Path
) -> CheckpointMeta:
    """Restore model, optimizer, scheduler, RNG and registered objects (sampler, counters)."""
    meta = CheckpointMeta.read(folder)
    if meta.world_size != accelerator.num_processes and strategy.name != "ddp":
        raise CheckpointError(
            f"{folder} was written by {meta.world_size} processes ({meta.strategy}); this run has "
            f"{accelerator.num_processes}: sharded optimizer state cannot be re-split, resume with the same count"
        )
    state = folder / STATE_DIR
    if strategy.name in ("zero2", "zero3"):
        accelerator.load_state(str(state), load_module_strict=False)
    elif strategy.name == "fsdp":
        accelerator.load_state(str(state))
    else:
        accelerator.load_state(str(state))
        _restore_plain_trainable(accelerator, model, folder)
    return meta


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
