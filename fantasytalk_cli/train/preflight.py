"""What `ftalk train` checks before anything slow (data probing, model load, distributed set-up of
ZeRO-3): every check that needs no model, so that a mistake costs seconds, not a queued GPU job, and a
run that cannot start leaves no run folder behind.

- the run folder: writable, and not the folder of another run that would be overwritten;
- the resume request: a named checkpoint exists, `latest` on an empty folder says it starts anew, and the
  checkpoint trained the tensors this run would train (`check_resume_trains_the_same`).

The model paths are checked by `models.paths.check_model_paths`.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from fantasytalk_cli.checkpoints.folder import CHECKPOINT_RE, LATEST_NAME, list_checkpoints, recorded_model_config
from fantasytalk_cli.config.schema import CheckpointConfig, ModelConfig, TrainConfig
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.locks import LOCK_NAME, refuse_if_held
from fantasytalk_cli.train.checkpoint import resolve_resume

RUN_FILES = ("config.yaml", LATEST_NAME, "logs")
"""What ftalk writes into a run folder besides `checkpoint-N/` (and the `.checkpoint-N.tmp` of a save)."""


RUN_FOLDER_FIX = (
    "wait for that run to end, stop it, or give this run another --output_dir (two runs in one folder would "
    "overwrite each other's checkpoints)"
)


class RunFolderError(FtalkError):
    """The run folder cannot be used as asked: exit 2, nothing written."""

    exit_code = 2


@dataclass
class RunFolderPlan:
    """What the start-up checks decided about the run folder."""

    output_dir: Path
    resume: Path | None = None
    """The checkpoint folder to resume from (None: a new run)."""
    notes: list[str] = field(default_factory=list)
    set_aside: list[Path] = field(default_factory=list)
    """A previous run's files to move into `replaced_dir` when the run starts (`--overwrite_output_dir`)."""
    replaced_dir: Path | None = None


def _nearest_existing(path: Path) -> Path:
    current = path.absolute()
    while not current.exists():
        current = current.parent
    return current


def check_writable(output_dir: Path) -> None:
    """`output_dir` is (or can be made as) a folder this process may write into; else a message saying why."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunFolderError(f"--output_dir {output_dir} is a file, not a folder: pick a folder path")
    base = _nearest_existing(output_dir)
    if not base.is_dir():
        raise RunFolderError(f"--output_dir {output_dir}: {base} is a file, so the folder cannot be made there")
    if not os.access(base, os.W_OK | os.X_OK):
        what = "the run folder" if base == output_dir.absolute() else f"{base}, where the run folder would be made,"
        raise RunFolderError(f"--output_dir {output_dir}: {what} is not writable: pick a folder you can write to")


def ftalk_files(output_dir: Path) -> list[Path]:
    """The files and folders of a run that ftalk wrote into `output_dir` (nothing else there)."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()]
    found += [output_dir / name for name in RUN_FILES if (output_dir / name).exists()]
    return sorted(found)


def plan_run_folder(checkpoint: CheckpointConfig, overwrite: bool) -> RunFolderPlan:
    """Check the run folder against the resume request; raises `RunFolderError` before anything is written.

    A folder holding checkpoints is another run: continuing it needs `--resume_from_checkpoint`, replacing it
    `--overwrite_output_dir` (which sets that run's own files aside into `replaced-<time>/`, deleting nothing
    and leaving every other file where it is)."""
    out = checkpoint.output_dir
    check_writable(out)
    refuse_if_held(out / LOCK_NAME, f"the run folder {out}", RUN_FOLDER_FIX)  # a live run's folder: say so first
    plan = RunFolderPlan(out)
    resume = checkpoint.resume_from_checkpoint
    existing = list_checkpoints(out)
    if resume == "latest":
        plan.resume = resolve_resume(out, resume)
        if not existing:
            plan.notes.append(
                f"--resume_from_checkpoint latest: {out} holds no checkpoint yet, so this starts a new run"
            )
        return plan
    if resume is not None:
        plan.resume = resolve_resume(out, resume)  # a named checkpoint must exist
        return plan
    if existing and not overwrite:
        names = ", ".join(p.name for _, p in existing[-3:])
        raise RunFolderError(
            f"--output_dir {out} holds another run ({names}): continue it with --resume_from_checkpoint latest, "
            "set it aside with --overwrite_output_dir, or pick a new --output_dir. Nothing was changed"
        )
    if overwrite:
        plan.set_aside = ftalk_files(out)
        if plan.set_aside:
            plan.replaced_dir = out / time.strftime("replaced-%Y%m%d-%H%M%S", time.gmtime())
            plan.notes.append(
                f"--overwrite_output_dir: the previous run's {len(plan.set_aside)} files and folders go to "
                f"{plan.replaced_dir} (delete it when you no longer need them)"
            )
    return plan


def set_aside_previous_run(plan: RunFolderPlan) -> None:
    """Main process, when the run starts: move the previous run's own files into `plan.replaced_dir`."""
    if plan.replaced_dir is None:
        return
    plan.replaced_dir.mkdir(parents=True)
    for path in plan.set_aside:
        shutil.move(str(path), str(plan.replaced_dir / path.name))


WHAT_TRAINS = ("trainable_modules", "lora_rank", "lora_alpha", "lora_target_modules")
"""`model` settings that decide which tensors train and how the LoRA scales: a resume must keep them."""
RECORDED_DEFAULTS: dict[str, object] = {"lora_rank": 0, "lora_alpha": None, "lora_target_modules": None}
"""What a checkpoint written before the LoRA existed trained (no LoRA)."""


OBJECTIVE = ("lip_loss_weight", "face_loss_weight")
"""`train` settings that change what the run optimises: a resume must keep them (`--init_from` starts a new stage)."""


def check_resume_trains_the_same(resume: Path, model: ModelConfig, train: TrainConfig) -> None:
    """Refuse, before anything loads, to resume ``resume`` with other trainable tensors, another LoRA or another
    objective: its optimizer state belongs to the tensors and the loss it trained (and the LoRA's scale to its
    alpha)."""
    recorded = recorded_model_config(resume)
    if not recorded:
        return  # not our checkpoint, or no meta.json: loading it says what does not match
    now = _what_trains(model.model_dump(mode="json"))
    then = _what_trains({key: recorded.get(key, RECORDED_DEFAULTS.get(key)) for key in WHAT_TRAINS})
    changed = [f"{key} {then[key]!r} -> {now[key]!r}" for key in WHAT_TRAINS if then[key] != now[key]]
    objective = recorded_model_config(resume, "train")
    for key in OBJECTIVE:
        was, asked = float(objective.get(key, 0.0) or 0.0), float(getattr(train, key))
        if was != asked:
            changed.append(f"{key} {was:g} -> {asked:g} (a new stage: start it with --init_from)")
    if changed:
        raise RunFolderError(
            f"--resume_from_checkpoint {resume}: it trained other tensors or another loss than this run would "
            f"({'; '.join(changed)}). A resume continues the same training: give the checkpoint's settings back, or "
            "start a new run in another --output_dir"
        )


def _what_trains(settings: dict[str, object]) -> dict[str, object]:
    """`WHAT_TRAINS` of ``settings`` in one spelling: no LoRA has no alpha or targets; alpha unset is the rank."""
    out = {key: settings.get(key) for key in WHAT_TRAINS}
    if not out["lora_rank"]:
        out.update(lora_alpha=None, lora_target_modules=None)
    elif out["lora_alpha"] is None:
        out["lora_alpha"] = float(out["lora_rank"])  # type: ignore[arg-type]
    else:
        out["lora_alpha"] = float(out["lora_alpha"])  # type: ignore[arg-type]
    return out
