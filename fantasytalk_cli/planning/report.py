"""What `ftalk plan-buckets` computes and shows: the plan, its numbers, the memory estimate per bucket, notes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fantasytalk_cli.cache.keys import cache_settings
from fantasytalk_cli.cache.lookup import CacheLookup, coverage
from fantasytalk_cli.cache.store import CACHE_MARKER
from fantasytalk_cli.config.schema import BucketConfig, DataConfig, FtalkConfig, ModelConfig, TrainConfig
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.plan import BucketPlan, ClipFacts, plan_from_metadata
from fantasytalk_cli.data.tracks import track_coverage
from fantasytalk_cli.fileio import write_text_atomic
from fantasytalk_cli.models.trainable import LORA_AUDIO_DROPOUT, trainable_count
from fantasytalk_cli.planning.fit import (
    MemoryOptions,
    cheapest_fitting,
    chosen_options,
    estimates_by_option,
    run_estimate,
    search_space,
)
from fantasytalk_cli.planning.memory import GB, MemoryEstimate
from fantasytalk_cli.planning.model_dims import ModelDims, configured_model_dims
from fantasytalk_cli.planning.stats import BucketRow, PlanStats, default_world_size, plan_stats


@dataclass(eq=False)
class PlanReport:
    """Everything `ftalk plan-buckets` shows: the plan, its numbers, the memory estimates, notes."""

    plan: BucketPlan
    stats: PlanStats
    buckets: BucketConfig
    memory: MemoryEstimate | None
    bucket_memory: dict[int, MemoryEstimate]
    notes: list[str]
    written: list[str]
    fits_with: dict[int, MemoryOptions | None] = field(default_factory=dict)
    """With a GPU size: per bucket, the cheapest memory options that fit (None: none does)."""

    @property
    def at_risk(self) -> list[int]:
        """Bucket ids whose estimate exceeds the safe share of the GPU memory given."""
        return [b for b, est in self.bucket_memory.items() if est.at_risk]

    @property
    def ok(self) -> bool:
        """Something trains and (when a GPU size was given) no bucket is at risk of running out of memory."""
        return self.stats.batches_per_rank > 0 and not self.at_risk

    def to_json(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            if isinstance(value, list):
                return [clean(v) for v in value]
            return value

        return clean(
            {
                "format": "ftalk-plan-report",
                "config_hash": self.plan.config_hash,
                "metadata_hash": self.plan.metadata_hash,
                "metadata_path": self.plan.metadata_path,
                "seed": self.plan.seed,
                "sizes": list(self.plan.grid.sizes),
                "stats": self.stats.to_json(),
                "memory": None if self.memory is None else self.memory.to_json(),
                "bucket_memory": {str(b): est.total_bytes for b, est in self.bucket_memory.items()},
                "at_risk": self.at_risk,
                "fits_with": {str(b): None if o is None else o.flags() for b, o in self.fits_with.items()},
                "notes": self.notes,
                "ok": self.ok,
            }
        )


def make_plan_report(
    cfg: FtalkConfig,
    *,
    metadata_path: Path | None = None,
    world_size: int | None = None,
    gpus: int | None = None,
    gpu_memory_gb: float | None = None,
    write_path: Path | None = None,
    json_path: Path | None = None,
    transformer_config: Mapping[str, Any] | None = None,
) -> PlanReport:
    """The `plan-buckets` command's one library call: plan the metadata, compute the numbers and the memory
    estimate per bucket, write the plan file (`write_path`) and the machine-readable report (`json_path`).
    The memory estimate uses `transformer_config` when given, else the dims of the configured model folder
    (`cfg.model.pretrained_model_name_or_path`), else the built-in 14B config (with a note)."""
    world = world_size if world_size is not None else default_world_size()
    plan, facts, notes = plan_from_metadata(
        data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=metadata_path, world_size=world
    )
    stats = plan_stats(plan, cfg.buckets, cfg.train.gradient_accumulation_steps, facts)
    devices = gpus if gpus is not None else world
    strategy = cfg.dist.strategy
    if strategy == "auto":
        strategy = "ddp"
        notes.append("memory estimated for ddp (dist.strategy is auto); pass --strategy zero2|zero3|fsdp to compare")
    if transformer_config is not None:
        dims = ModelDims(dict(transformer_config), "the given transformer config")
    else:
        dims = configured_model_dims(cfg.model)
    notes.extend(dims.notes)
    cached = _cached_kinds(cfg.data, cfg.model, cfg.train, metadata_path, plan, facts, stats, notes)
    if cfg.model.lora_rank:
        notes.append(_lora_note(cfg.model, cfg.train, dims))
    notes.extend(_tracks_note(cfg.data, cfg.train, metadata_path, plan))
    bucket_memory: dict[int, MemoryEstimate] = {}
    fits_with: dict[int, MemoryOptions | None] = {}
    per_option: dict[int, dict[MemoryOptions, int]] = {}
    for row in stats.rows:
        if not row.samples:
            continue

        def estimate(options: MemoryOptions, row: BucketRow = row) -> MemoryEstimate:
            shape = (row.height, row.width, row.frames)
            return run_estimate(cfg.train, cfg.model, dims.config, shape, options, strategy=strategy, devices=devices,
                                cached=cached, capacity_gb=gpu_memory_gb, model=dims.source)  # fmt: skip

        bucket_memory[row.bucket] = estimate(chosen_options(cfg.model))
        if gpu_memory_gb is not None:
            options = estimates_by_option(estimate, **search_space(strategy, dims.config))
            totals = {opt: est.total_bytes for opt, est in options.items()}
            fits_with[row.bucket] = cheapest_fitting(totals, int(gpu_memory_gb * GB))
            per_option[row.bucket] = totals
    largest = max(bucket_memory.values(), key=lambda est: est.total_bytes, default=None)
    if per_option and gpu_memory_gb is not None:
        notes.append(_options_note(bucket_memory, per_option, fits_with, gpu_memory_gb))
    written: list[str] = []
    if write_path is not None:
        plan.save(Path(write_path))
        written.append(f"plan written to {write_path} (set data.bucket_plan / --bucket_plan to it)")
    report = PlanReport(
        plan=plan,
        stats=stats,
        buckets=cfg.buckets,
        memory=largest,
        bucket_memory=bucket_memory,
        notes=notes,
        written=written,
        fits_with=fits_with,
    )
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(json_path), json.dumps(report.to_json(), indent=1))
        report.written.append(f"report written to {json_path}")
    return report


def _cached_kinds(
    data: DataConfig,
    model: ModelConfig,
    train: TrainConfig,
    metadata_path: Path | None,
    plan: BucketPlan,
    facts: ClipFacts,
    stats: PlanStats,
    notes: list[str],
) -> frozenset[str]:
    """With --cache_dir: how much of the planned run the feature cache holds (a note), and the kinds it holds
    whole (their encoders are left out of the memory estimate, as training leaves them unloaded)."""
    cache_dir, base = data.cache_dir, model.pretrained_model_name_or_path
    if cache_dir is None:
        return frozenset()
    if not (cache_dir / CACHE_MARKER).is_file():
        notes.append(f"no feature cache in {cache_dir} yet (`ftalk cache` with these flags writes it)")
        return frozenset()
    if base is None:
        notes.append("feature cache coverage needs --pretrained_model_name_or_path (its keys fingerprint the models)")
        return frozenset()
    meta = metadata_path if metadata_path is not None else data.train_data_meta
    assert meta is not None
    epochs = train.epochs_covered(max(1, stats.steps_per_epoch))
    lookup = CacheLookup(cache_dir, cache_settings(model, train))
    found = coverage(lookup, load_entries(meta), facts, plan, seed=train.seed, data=data, epochs=epochs)
    notes.extend(found.notes())
    kinds = found.whole_kinds()
    if kinds:
        notes.append(f"memory estimated without the encoders the cache stands for ({', '.join(sorted(kinds))})")
    return kinds


def _tracks_note(data: DataConfig, train: TrainConfig, metadata_path: Path | None, plan: BucketPlan) -> list[str]:
    """How many planned clips carry a face/mouth track (what --lip_loss_weight/--face_loss_weight weigh), shown when
    a clip has one or a weight is set."""
    meta = metadata_path if metadata_path is not None else data.train_data_meta
    assert meta is not None
    entries = load_entries(meta)
    planned = [entries[i] for i in np.flatnonzero(plan.assignment(0) >= 0)]
    found = track_coverage(planned, data.media_root())
    weighted = train.region_weights() is not None
    if not weighted and found.tracked == 0 and not found.lost:
        return []
    line = f"face/mouth tracks: {found.tracked} of {found.total} planned clips have one"
    if found.lost:
        line += f"; {len(found.lost)} name a missing file (e.g. {found.lost[0].extra['track']}: train refuses them)"
    if not weighted:
        return [line + " (used by --lip_loss_weight / --face_loss_weight, the lip-focused stage 2)"]
    if found.untracked:
        rest = "refused by --require_tracks" if train.require_tracks else "train with loss weight 1"
        line += f"; the other {len(found.untracked)} {rest}"
    return [line]


def _lora_note(model: ModelConfig, train: TrainConfig, dims: ModelDims) -> str:
    """What the LoRA adds, counted on the configured model with the LoRA training injects, and the audio dropout."""
    lora_setting = (model.lora_rank, tuple(model.lora_target_modules))
    adapter, lora = trainable_count(dims.config, model.trainable_modules, lora_setting)
    alpha = model.lora_alpha if model.lora_alpha is not None else model.lora_rank
    dropout = train.audio_drop_probability()
    why = (
        " (the default with a LoRA: audio guidance's audio-off pass is the LoRA'd model, which must learn it)"
        if dropout == LORA_AUDIO_DROPOUT
        else " (set: audio guidance's audio-off pass is the LoRA'd model, which learns it only from dropped audio)"
    )
    return (
        f"LoRA rank {model.lora_rank}, alpha {alpha:g} on {len(model.lora_target_modules)} linears per block: "
        f"{lora:,} parameters trained with {adapter:,} of --trainable_modules ({dims.source}); "
        f"audio_dropout {dropout:g}{why}"
    )


def _options_note(
    bucket_memory: dict[int, MemoryEstimate],
    per_option: dict[int, dict[MemoryOptions, int]],
    fits_with: dict[int, MemoryOptions | None],
    gpu_memory_gb: float,
) -> str:
    """One line: the largest bucket's estimate with each combination of memory options, and what to pass."""
    bucket = max(bucket_memory, key=lambda b: bucket_memory[b].total_bytes)
    shape = "x".join(str(v) for v in bucket_memory[bucket].shape)
    shown = "; ".join(
        f"{opt.label()} {total / GB:.1f} GB" for opt, total in per_option[bucket].items() if not opt.blocks_to_offload
    )
    choice = fits_with[bucket]
    if choice is None:
        verdict = (
            "none fits: more GPUs with --strategy zero3 or fsdp, gradient checkpointing, a feature cache "
            "(--cache_dir), or smaller buckets"
        )
    else:
        verdict = f"pass {choice.flags()}" if choice != MemoryOptions() else "it fits as it is: no memory option needed"
    return f"memory options for the largest bucket ({shape}) on {gpu_memory_gb:g} GB: {shown}; {verdict}"
