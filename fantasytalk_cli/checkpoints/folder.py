"""The checkpoint room: how a run folder and its checkpoints are laid out and named, the record each carries
(`meta.json`), and how one is found (the newest complete checkpoint of a run folder, the kind of a checkpoint folder
whoever wrote it). Training, resume, `convert-zero` and `ftalk sample --adapter` all ask here.

Layout of one of ftalk's checkpoints::

    checkpoint-N/
      meta.json                        step, epoch, config hash + the resolved config, versions
      trainable.safetensors            the trainable weights (fp32, our parameter names)
      fantasytalking_model.ckpt        the same adapter in the released FantasyTalking format
      run_state.json                   the loop's counters and the sampler's position (JSON: nothing to unpickle)
      accelerate/                      accelerate state: optimizer (+ trainable model) shards, scheduler, RNG
      manifest.json                    every file's size and sha256, written last (resume verifies it first)

`latest` in the run folder names the newest complete one; a save in progress is `.checkpoint-N.tmp/`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import write_text_atomic

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
META_NAME = "meta.json"
WEIGHTS_NAME = "trainable.safetensors"
ADAPTER_CKPT_NAME = "fantasytalking_model.ckpt"
STATE_DIR = "accelerate"
LATEST_NAME = "latest"
BEST_NAME = "best"
"""Names the best checkpoint by a metric, written by `ftalk evaluate --select` (`checkpoints/metrics.py`)."""
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


FSDP_MODEL_DIR = "pytorch_model_fsdp_0"
FSDP_OPTIM_DIR = "optimizer_0"
STEMS: dict[str, str] = {
    "fantasytalking": "fantasytalking_model",
    "comfyui": "fantasytalking_comfyui",
    "diffusers": "diffusion_pytorch_model",
    "original": "diffusion_pytorch_model",
    "kohya": "fantasytalking_model",
}
"""File stem of each `convert-zero --format` output (the DiT's own stem for the two transformer namings)."""
CONVERTED_FILES = (
    ADAPTER_CKPT_NAME,
    f"{STEMS['fantasytalking']}.safetensors",
    f"{STEMS['fantasytalking']}.safetensors.index.json",
    f"{STEMS['comfyui']}.safetensors",
    f"{STEMS['comfyui']}.safetensors.index.json",
    f"{STEMS['diffusers']}.safetensors.index.json",
    f"{STEMS['diffusers']}.safetensors",
)
"""What a folder written by ``convert-zero`` holds, in the order `converted_file` looks for it."""


def is_complete(folder: Path) -> bool:
    """A checkpoint ftalk finished writing: its `meta.json` is there (it is written last but for the manifest)."""
    return (folder / META_NAME).is_file()


def list_checkpoints(run_dir: Path, complete: Callable[[Path], bool] = is_complete) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the run folder's ``checkpoint-N/`` that ``complete`` accepts, oldest first."""
    found = []
    if run_dir.is_dir():
        for child in run_dir.iterdir():
            m = CHECKPOINT_RE.match(child.name)
            if m and child.is_dir() and complete(child):
                found.append((int(m.group(1)), child))
    return sorted(found)


def newest_checkpoint(run_dir: Path, complete: Callable[[Path], bool] = is_complete) -> Path | None:
    """The one rule for a run folder's newest checkpoint: the one `latest` names, else the highest ``checkpoint-N/``,
    each only if ``complete`` accepts it (ftalk's own: `is_complete`; any kind: `looks_like_checkpoint`); else None."""
    pointer = run_dir / LATEST_NAME
    if pointer.is_file():
        named = run_dir / pointer.read_text().strip()
        if named != run_dir and named.is_dir() and complete(named):
            return named
    found = list_checkpoints(run_dir, complete)
    return found[-1][1] if found else None


def named_checkpoint(run_dir: Path, name: str) -> Path:
    """``checkpoint-N``, or the one the run folder's ``best`` / ``latest`` file names; a missing one is refused,
    saying what the folder holds."""
    run_dir = Path(run_dir)
    if name in (BEST_NAME, LATEST_NAME):
        pointer = run_dir / name
        if not pointer.is_file():
            made = (
                "`ftalk evaluate RUN --eval_meta HELD_OUT.json --select audio_gap`" if name == BEST_NAME else "training"
            )
            raise CheckpointError(f"{run_dir}: no `{name}` file; it is written by {made}")
        folder = run_dir / pointer.read_text().strip()
    else:
        folder = run_dir / name
    if not folder.is_dir() or folder == run_dir:
        have = [f.name for _, f in list_checkpoints(run_dir, lambda _: True)]
        raise CheckpointError(f"{run_dir}: no checkpoint {folder.name!r} (`{name}`); the folder holds {have or 'none'}")
    return folder


class ConversionError(FtalkError, RuntimeError):
    """The checkpoint cannot be converted: a file is missing, truncated or not what its kind needs."""


class ConversionUsageError(ConversionError):
    exit_code = 2

    """The request itself is wrong: no such folder, an output that exists, contradictory options."""


# --------------------------------------------------------------------------------------------------------------------
# Finding the checkpoint.


def _has_zero_files(folder: Path) -> bool:
    return folder.is_dir() and (any(folder.glob("*_optim_states.pt")) or any(folder.glob("*_model_states.pt")))


def deepspeed_tag(root: Path, tag: str | None) -> str | None:
    """The DeepSpeed tag folder under ``root``: ``tag``, else what ``latest`` names, else the only folder of ZeRO
    files (several without ``latest``: ask for ``--tag``); None when ``root`` holds no DeepSpeed checkpoint."""
    if tag is not None:
        return tag if _has_zero_files(root / tag) else None
    latest = root / "latest"
    if latest.is_file():
        named = latest.read_text().strip()
        if named and _has_zero_files(root / named):
            return named
    found = sorted(child.name for child in root.iterdir() if _has_zero_files(child))
    if len(found) > 1:
        raise ConversionUsageError(f"{root}: several DeepSpeed tag folders {found} and no 'latest': pass --tag")
    return found[0] if found else None


def state_roots(folder: Path) -> list[Path]:
    """Where accelerate's state may sit: ``accelerate/`` (ours) or the checkpoint folder itself (the reference's)."""
    return [p for p in (folder / STATE_DIR, folder) if p.is_dir()]


def looks_like_checkpoint(folder: Path) -> bool:
    """True for a folder holding one checkpoint of a kind this module reads."""
    if (folder / WEIGHTS_NAME).is_file() or (folder / META_NAME).is_file():
        return True
    return any(
        (root / FSDP_MODEL_DIR / ".metadata").is_file() or any(_has_zero_files(child) for child in root.iterdir())
        for root in state_roots(folder)
    )


def resolve_checkpoint(path: Path) -> Path:
    """``checkpoint-N/`` as given, or a run folder's newest checkpoint of any kind (`newest_checkpoint`)."""
    path = Path(path)
    if not path.is_dir():
        raise ConversionUsageError(f"{path}: no such checkpoint or run folder")
    if looks_like_checkpoint(path):
        return path
    newest = newest_checkpoint(path, looks_like_checkpoint)
    if newest is not None:
        return newest
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise ConversionUsageError(
        f"{path} is neither a checkpoint (trainable.safetensors, a DeepSpeed 'latest' + tag folder, or "
        f"{FSDP_MODEL_DIR}/, directly or under {STATE_DIR}/) nor a run folder with checkpoint-N/ in it; "
        f"it holds: {listing}"
    )


def converted_file(folder: Path) -> Path | None:
    """The weights file of a folder ``convert-zero`` wrote (the first of `CONVERTED_FILES` there), else None."""
    for name in CONVERTED_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


def recorded_model_config(folder: Path, section: str = "model") -> dict[str, Any]:
    """A section (default ``model``) of the run config our ``meta.json`` records ({} for other checkpoints)."""
    try:
        recorded = json.loads((folder / META_NAME).read_text())["config"][section]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def trainable_patterns(folder: Path) -> list[str] | None:
    """``model.trainable_modules`` from our ``meta.json``, when there is one."""
    patterns = recorded_model_config(folder).get("trainable_modules")
    return [str(p) for p in patterns] if isinstance(patterns, list) else None
