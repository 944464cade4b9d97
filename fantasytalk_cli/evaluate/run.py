"""`ftalk evaluate RUN_OR_CHECKPOINTS --eval_meta HELD_OUT.json`: score checkpoints on held-out clips.

For each checkpoint (a run folder means all its complete checkpoints; any form `ftalk sample --adapter` takes
works): the audio reliance (`train/audio_reliance.py`) and, with ``--syncnet``, lip sync (LSE-D / LSE-C) of videos
sampled from held-out pairs, with the ground-truth clips scored once as the reference row. Everything is appended
to the run's ``metrics.jsonl``, logged as TensorBoard scalars (``logs/evaluate``), plotted into ``metrics.png``;
each checkpoint gets a sheet of its samples' frame strips; ``--select`` writes ``best``.

The run's own config (what its newest checkpoint recorded) is the default; `--config` and flags override it. The
models load once; each checkpoint's trained tensors are loaded over the same base.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fantasytalk_cli.checkpoints.folder import CHECKPOINT_RE, META_NAME, list_checkpoints, looks_like_checkpoint
from fantasytalk_cli.checkpoints.metrics import MetricRow, Selection, append_rows, read_rows, write_best
from fantasytalk_cli.config import FtalkConfig
from fantasytalk_cli.config.load import load_config
from fantasytalk_cli.config.schema import DataConfig, ModelConfig, TrainConfig
from fantasytalk_cli.evaluate.plots import plot_metrics, sample_sheet
from fantasytalk_cli.runtime.dtypes import DTYPES
from fantasytalk_cli.runtime.flow import FlowSchedule
from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.sample.adapter_source import load_adapter, resolve_adapter
from fantasytalk_cli.train.audio_reliance import (
    EvaluationError,
    HeldOut,
    RelianceReport,
    clip_losses,
    held_out_clips,
    overlap_with_training,
    reliance_report,
)
from fantasytalk_cli.train.model_setup import TrainingModels, load_training_models
from fantasytalk_cli.train.step import StepContext

EVAL_DIR = "eval"
"""Under the run folder: the held-out inputs, each checkpoint's samples and sheet, the evaluation's TensorBoard log."""


@dataclass(frozen=True)
class Target:
    """One set of weights to score: its step (0 when the form records none), path and label."""

    step: int
    path: Path
    label: str


@dataclass(frozen=True)
class EvaluateOptions:
    eval_meta: Path
    select: Selection | None = None
    syncnet: Path | None = None
    samples: int = 2
    """Held-out pairs sampled per checkpoint for its sheet (all of them with ``syncnet``)."""
    sample_size: int = 256
    sample_frames: int = 49
    sample_steps: int = 20
    metrics_dir: Path | None = None
    """Where metrics.jsonl goes when the targets are not a run's checkpoints (default: the first target's folder)."""


@dataclass
class EvaluateReport:
    run_dir: Path
    rows: list[MetricRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    reports: dict[str, RelianceReport] = field(default_factory=dict)
    plot: Path | None = None
    sheets: list[Path] = field(default_factory=list)
    best: MetricRow | None = None


def evaluation_targets(paths: Sequence[Path], metrics_dir: Path | None = None) -> tuple[Path, list[Target]]:
    """The run folder the record goes to and the weights to score, oldest step first."""
    targets: list[Target] = []
    run_dir: Path | None = metrics_dir
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not looks_like_checkpoint(path) and list_checkpoints(path):
            run_dir = run_dir or path
            targets += [Target(step, folder, folder.name) for step, folder in list_checkpoints(path)]
            continue
        if not path.exists():
            raise EvaluationError(f"{path}: no such checkpoint, run folder or adapter file")
        match = CHECKPOINT_RE.match(path.name)
        step = int(match.group(1)) if match else _recorded_step(path)
        run_dir = run_dir or (path.parent if match or path.is_file() else path)
        targets.append(Target(step, path, path.name))
    if not targets:
        raise EvaluationError(f"{', '.join(map(str, paths))}: no complete checkpoint to evaluate")
    assert run_dir is not None
    return run_dir, sorted(targets, key=lambda t: (t.step, t.label))


def _recorded_step(path: Path) -> int:
    meta = path / META_NAME if path.is_dir() else None
    if meta is not None and meta.is_file():
        return int(json.loads(meta.read_text()).get("step", 0))
    return 0


def recorded_config(targets: Sequence[Target]) -> dict[str, Any] | None:
    """The config the newest checkpoint that records one ran with (None: no target records one)."""
    for target in reversed(targets):
        meta = target.path / META_NAME
        if target.path.is_dir() and meta.is_file():
            return dict(json.loads(meta.read_text()).get("config") or {})
    return None


def evaluation_config(targets: Sequence[Target], config: Path | None, flags: dict[str, Any]) -> FtalkConfig:
    """The run's recorded config, then `--config`, then the flags."""
    base = recorded_config(targets)
    return load_config(config, flags, base=base)


def eval_context(train: TrainConfig, model: ModelConfig, device: torch.device) -> StepContext:
    """The step context of an evaluation, as training's on the same device: the frozen weights' dtype (per
    --mixed_precision) and autocast to it, on a GPU or the CPU (what accelerate's autocast does), so the numbers of
    `ftalk evaluate` equal the run's own validation metrics."""
    dtype = DTYPES[train.mixed_precision]
    return StepContext(
        train=train,
        model_cfg=model,
        sigmas=FlowSchedule.of(model).sigmas(),
        world=World(),
        device=device,
        dtype=dtype,
        autocast=lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32),
    )


def evaluate(
    paths: Sequence[Path],
    options: EvaluateOptions,
    *,
    config: Path | None = None,
    flags: dict[str, Any] | None = None,
    say: Callable[[str], None] = print,
) -> EvaluateReport:
    """The `ftalk evaluate` command's one library call (see the module docstring)."""
    run_dir, targets = evaluation_targets(paths, options.metrics_dir)
    cfg = evaluation_config(targets, config, {**(flags or {}), "eval_meta": options.eval_meta})
    report = EvaluateReport(run_dir)
    say(f"evaluating {len(targets)} checkpoint(s) of {run_dir} on {options.eval_meta}")
    held = held_out_clips(options.eval_meta, cfg.data, cfg.buckets, cfg.train, say=say)
    report.notes += _held_out_notes(held, cfg.data)
    for note in report.notes:
        say(note)
    lip_sync = None
    if options.syncnet is not None:
        from fantasytalk_cli.evaluate.lip_sync import LipSync

        lip_sync = LipSync.open(options.syncnet, held, say=say)
        reference = lip_sync.reference_rows()
        append_rows(run_dir, reference)
        report.rows += reference
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = load_training_models(cfg.model, cfg.train, device=device, uniform_dtype=False)
    models.transformer.eval()
    ctx = eval_context(cfg.train, cfg.model, device)
    fresh = _trainable_snapshot(models)
    writer = _tensorboard(run_dir)
    for target in targets:
        _restore(models, fresh)
        say(f"{target.label}: {load_adapter(resolve_adapter(target.path), models.transformer)}")
        results = clip_losses(models.transformer, models.encoders, models.wav2vec, held, range(len(held.batches)),
                              ctx, timesteps=cfg.train.eval_timesteps)  # fmt: skip
        found = reliance_report(results, held.left_out)
        report.reports[target.label] = found
        rows = found.rows(target.step, str(target.path), "evaluate")
        if lip_sync is not None or options.samples:
            samples = _sample_held_out(cfg.model, cfg.train, held, target, options, run_dir, lip_sync is not None)
            report.sheets.append(samples.sheet)
            if lip_sync is not None:
                rows += lip_sync.rows(samples.videos, target.step, str(target.path))
        for line in found.lines():
            say(f"  {line}")
        append_rows(run_dir, rows)
        report.rows += rows
        if writer is not None:
            for row in rows:
                writer.add_scalar(f"eval/{row.metric}", row.value, row.step)
            writer.flush()
    if writer is not None:
        writer.close()
    report.plot = plot_metrics(run_dir, read_rows(run_dir))
    if options.select is not None:
        report.best = write_best(run_dir, options.select)
    return report


def _held_out_notes(held: HeldOut, data: DataConfig) -> list[str]:
    notes = [f"{len(held.batches)} held-out clips planned ({held.tracked} with a face/mouth track)"]
    for reason, indices in held.left_out.items():
        notes.append(f"[yellow]held out but not planned ({reason}): {len(indices)} clips, e.g. entry {indices[0]}[/]")
    meta = data.train_data_meta
    if meta is not None and Path(meta).is_file():
        shared = overlap_with_training(held, Path(meta), data.media_root())
        if shared:
            notes.append(
                f"[yellow]warning: {len(shared)} held-out media files are also in the training metadata {meta}, e.g. "
                f"{shared[0]}: the scores of those clips measure memory, not generalisation; hold out other clips[/]"
            )
    return notes


def _trainable_snapshot(models: TrainingModels) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in models.transformer.named_parameters() if p.requires_grad}


def _restore(models: TrainingModels, snapshot: dict[str, torch.Tensor]) -> None:
    """Back to the configured adapter before the next checkpoint loads (one that trained fewer tensors leaves none
    of the previous checkpoint's)."""
    params = dict(models.transformer.named_parameters())
    with torch.no_grad():
        for name, tensor in snapshot.items():
            params[name].copy_(tensor)


def _tensorboard(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: the jsonl and the plot still hold everything
        return None
    return SummaryWriter(str(run_dir / "logs" / "evaluate"))


@dataclass
class HeldOutSamples:
    videos: list[tuple[int, Path]]
    """(held-out position, sampled mp4)."""
    sheet: Path


def held_out_inputs(held: HeldOut, folder: Path) -> list[tuple[int, Path, Path, str]]:
    """(position, portrait PNG, audio, caption) of every held-out clip: its window's first frame and its speech."""
    from PIL import Image

    from fantasytalk_cli.data.dataset import read_frames
    from fantasytalk_cli.data.metadata import resolve_media_path

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for position, planned in enumerate(held.batches):
        entry = held.entries[planned[0]]
        window = held.dataset.window(planned[0], planned)
        image = folder / f"{position:03d}.png"
        if not image.is_file():
            frame = read_frames(resolve_media_path(held.dataset.media_root, entry.file_path), [window.frame_indices[0]])
            Image.fromarray(np.asarray(frame[0])).save(image)
        out.append((position, image, resolve_media_path(held.dataset.media_root, entry.audio_path), entry.text))
    return out


def _sample_held_out(
    model: ModelConfig,
    train: TrainConfig,
    held: HeldOut,
    target: Target,
    options: EvaluateOptions,
    run_dir: Path,
    every: bool,
) -> HeldOutSamples:
    """Sample held-out pairs with the target's weights (fixed seed, the `ftalk sample` path) and write the sheet."""
    from fantasytalk_cli.sample.denoise import Guidance
    from fantasytalk_cli.sample.inputs import SampleRequest
    from fantasytalk_cli.sample.run import SampleOptions, sample_videos

    inputs = held_out_inputs(held, run_dir / EVAL_DIR / "inputs")
    picked = inputs if every else inputs[: options.samples]
    folder = run_dir / EVAL_DIR / target.label
    requests = [SampleRequest(image=image, audio=audio, prompt=text, out=folder / f"{position:03d}.mp4")
                for position, image, audio, text in picked]  # fmt: skip
    sample_options = SampleOptions(
        guidance=Guidance(num_inference_steps=options.sample_steps),
        image_size=options.sample_size,
        max_num_frames=options.sample_frames,
        overwrite=True,
    )
    results = sample_videos(model, requests, sample_options, adapter_path=target.path,
                            mixed_precision=train.mixed_precision, say=lambda _: None)  # fmt: skip
    strips = [(f"{target.label} held-out {p}", _strip(r.frames)) for (p, *_), r in zip(picked, results, strict=True)]
    sheet = sample_sheet(strips[: max(1, options.samples)], folder / "sheet.png")
    return HeldOutSamples([(p, r.info.path) for (p, *_), r in zip(picked, results, strict=True)], sheet)


def _strip(frames: np.ndarray, count: int = 8) -> np.ndarray:
    picks = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    return np.concatenate(list(frames[picks]), axis=1)
