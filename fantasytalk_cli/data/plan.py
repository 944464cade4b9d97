"""The bucket plan: which bucket every clip trains in, what is dropped and why, and the numbers
`ftalk plan-buckets` shows. Built from probe facts (never by opening media files), saved as the JSON
file `ftalk train` reads, and checked for staleness (config or metadata changed) when loaded.

Plan file (JSON, `format: "ftalk-bucket-plan"`, `version: 1`):

- `config_hash`: hash of the `buckets` section + the train fields planning reads (`train_batch_size`,
  `seed`); `configs` holds those values, so a stale plan can say which keys changed.
- `metadata_hash` (sha256 of the metadata file) and `metadata_path`.
- `seed`, `world_size`, `train_batch_size`, `leftover_policy`, `random_frame_crop`.
- `grid`: `ratios`, `sizes`, `size_weights`, `heights`/`widths` (`[ratio][size]`), `frames` (per size):
  bucket id = ratio_index * len(sizes) + size_index.
- `samples` (one value per metadata entry, in file order): `bucket` (epoch-0 bucket id, -1 dropped),
  `ratio_index`, `size_mask` (bit j: the clip may train at `sizes[j]`), `stride`, `drop_reason` (0 kept).
- `dropped`: `{reason: [entry index, ...]}` for "too short", "too small", "bad facts".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fantasytalk_cli.config.load import config_diff
from fantasytalk_cli.config.schema import BucketConfig, FtalkConfig, TrainConfig
from fantasytalk_cli.data.buckets import (
    DROP_REASONS,
    DROP_TOO_SHORT,
    DROP_TOO_SMALL,
    Eligibility,
    LevelGrid,
    assign_buckets,
    budget_tokens,
    crop_waste,
    eligibility,
    frame_crop_choices,
    latent_frames,
    level_grid,
    token_count,
)
from fantasytalk_cli.data.metadata import (
    MetadataEntry,
    MetadataError,
    metadata_hash,
    outside_report,
)
from fantasytalk_cli.data.metadata_facts import PLAN_FACT_FIELDS, read_plan_facts
from fantasytalk_cli.data.probe_facts import ProbeFacts
from fantasytalk_cli.data.probing import default_cache_path, probe_missing_facts
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import write_bytes_atomic
from fantasytalk_cli.train.memory import GB, MemoryEstimate

PLAN_FORMAT = "ftalk-bucket-plan"
PLAN_VERSION = 1
PLAN_TRAIN_FIELDS = ("train_batch_size", "seed")
"""Train fields a plan depends on (besides the whole `buckets` section)."""


class PlanError(FtalkError, ValueError):
    """The plan cannot be built or read; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ClipFacts:
    """Probe facts of every metadata entry as arrays (entry i = position i in the metadata file)."""

    width: np.ndarray
    height: np.ndarray
    num_frames: np.ndarray
    fps: np.ndarray

    def __len__(self) -> int:
        return int(self.width.shape[0])

    @classmethod
    def from_lists(
        cls, width: Sequence[int], height: Sequence[int], num_frames: Sequence[int], fps: Sequence[float]
    ) -> ClipFacts:
        return cls(
            width=np.asarray(width, dtype=np.int32),
            height=np.asarray(height, dtype=np.int32),
            num_frames=np.asarray(num_frames, dtype=np.int32),
            fps=np.asarray(fps, dtype=np.float64),
        )

    @classmethod
    def from_probes(cls, probes: Sequence[ProbeFacts]) -> ClipFacts:
        return cls.from_lists(
            [p.width for p in probes],
            [p.height for p in probes],
            [p.num_frames for p in probes],
            [p.fps for p in probes],
        )


_NO_FACTS_FIX = (
    "run `ftalk validate-metadata --write-clean CLEAN.json` once (it stores each clip's probe facts) "
    "and plan with `--train_data_meta CLEAN.json`"
)


def read_clip_facts(
    metadata_path: Path,
    media_root: Path | None = None,
    *,
    probe_missing: bool = True,
    workers: int = 0,
    allow_outside: bool = False,
) -> tuple[ClipFacts, list[str]]:
    """Stream the metadata file and collect each entry's stored probe facts into arrays (fast: no
    `MetadataEntry` objects, see `read_plan_facts`). Entries without facts (the raw `metadata_control.json`)
    are read from the probe cache beside the metadata, or probed in parallel and cached, when `probe_missing`;
    else a `PlanError` says how to store them. Relative media paths are joined to `media_root` (default: the
    metadata file's folder). Entries whose files cannot be read are dropped as "bad facts". Returns the facts
    and notes for the user."""
    metadata_path = Path(metadata_path)
    try:
        stored = read_plan_facts(metadata_path)
    except MetadataError as exc:
        raise PlanError(str(exc)) from exc
    facts = ClipFacts(**stored.arrays())
    root = media_root if media_root is not None else metadata_path.parent
    if not allow_outside:  # by how the paths are written; validate and train also follow symlinks
        outside = outside_report(root, stored.may_leave, follow_links=False)
        if outside:
            raise PlanError(outside)
    missing = stored.missing
    if not missing:
        return facts, []
    if not probe_missing:
        raise PlanError(
            f"{len(missing)} metadata entries (first: entry {missing[0][0]}) carry no probe facts; {_NO_FACTS_FIX}"
        )
    wanted = [
        (index, str(raw["file_path"]), str(raw["audio_path"]))
        for index, raw in missing
        if isinstance(raw, dict) and isinstance(raw.get("file_path"), str) and isinstance(raw.get("audio_path"), str)
    ]
    filled = probe_missing_facts(wanted, root, default_cache_path(metadata_path), workers=workers)
    for index, probed in filled.facts.items():
        if probed is not None:
            for name in PLAN_FACT_FIELDS:
                getattr(facts, name)[index] = getattr(probed, name)
    notes = [filled.note()]
    if len(wanted) < len(missing):
        notes.append(f"{len(missing) - len(wanted)} entries lack file_path/audio_path: dropped as bad facts")
    return facts, notes


def facts_from_entries(entries: Sequence[MetadataEntry]) -> ClipFacts:
    """Facts of loaded entries; an entry without probe facts gets zeros, which the plan drops as "bad facts"."""
    none = ProbeFacts(0, 0, 0, 0.0, 0.0, 0, 0)
    return ClipFacts.from_probes([e.probe or none for e in entries])


# ---------------------------------------------------------------------------------------------- the plan


def plan_configs(buckets: BucketConfig, train: TrainConfig) -> dict[str, Any]:
    """The config values a plan depends on, as JSON data."""
    return {
        "buckets": buckets.model_dump(mode="json"),
        "train": {name: getattr(train, name) for name in PLAN_TRAIN_FIELDS},
    }


def plan_config_hash(buckets: BucketConfig, train: TrainConfig) -> str:
    """Short stable hash of what a plan depends on (the `config_hash` recipe applied to `plan_configs`)."""
    text = json.dumps(plan_configs(buckets, train), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(eq=False)
class BucketPlan:
    """Every entry's bucket (per epoch, by a pure function of the seed) and the facts the sampler needs."""

    grid: LevelGrid
    ratio_index: np.ndarray
    size_mask: np.ndarray
    stride: np.ndarray
    drop_reason: np.ndarray
    seed: int
    world_size: int
    train_batch_size: int
    leftover_policy: str
    random_frame_crop: bool
    config_hash: str
    configs: dict[str, Any]
    metadata_hash: str = ""
    metadata_path: str = ""
    _assignments: dict[int, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return int(self.ratio_index.shape[0])

    def eligibility(self) -> Eligibility:
        return Eligibility(self.ratio_index, self.stride, self.size_mask, self.drop_reason)

    def assignment(self, epoch: int = 0) -> np.ndarray:
        """Bucket id of every entry in `epoch` (-1 = dropped); the same every epoch unless `random_hw_adapt`."""
        key = epoch if len(self.grid.sizes) > 1 else 0
        if key not in self._assignments:
            if len(self._assignments) > 4:
                self._assignments.clear()
            self._assignments[key] = assign_buckets(self.eligibility(), self.grid, self.seed, key)
        return self._assignments[key]

    def bucket_shape(self, bucket_id: int) -> tuple[int, int, int]:
        """(height, width, frames) of a bucket."""
        return self.grid.shape(bucket_id)

    def dropped(self) -> dict[str, np.ndarray]:
        """Entry indices left out of every epoch, by reason."""
        return {name: np.flatnonzero(self.drop_reason == code) for code, name in DROP_REASONS.items()}

    # ------------------------------------------------------------------------------------------ file

    def to_json(self) -> dict[str, Any]:
        grid = self.grid
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "config_hash": self.config_hash,
            "configs": self.configs,
            "metadata_hash": self.metadata_hash,
            "metadata_path": self.metadata_path,
            "seed": self.seed,
            "world_size": self.world_size,
            "train_batch_size": self.train_batch_size,
            "leftover_policy": self.leftover_policy,
            "random_frame_crop": self.random_frame_crop,
            "num_samples": self.num_samples,
            "grid": {
                "ratios": list(grid.ratios),
                "sizes": list(grid.sizes),
                "size_weights": list(grid.weights),
                "heights": grid.heights.tolist(),
                "widths": grid.widths.tolist(),
                "frames": list(grid.frames),
            },
            "samples": {
                "bucket": self.assignment(0).tolist(),
                "ratio_index": self.ratio_index.tolist(),
                "size_mask": self.size_mask.tolist(),
                "stride": self.stride.tolist(),
                "drop_reason": self.drop_reason.tolist(),
            },
            "dropped": {name: idx.tolist() for name, idx in self.dropped().items()},
        }

    def save(self, path: Path) -> None:
        """Write the plan file atomically (fsync'd temp file + rename)."""
        write_bytes_atomic(Path(path), msgspec.json.encode(self.to_json()))  # compact; json.dump takes ~20x longer

    @classmethod
    def load(cls, path: Path) -> BucketPlan:
        """Read a plan file; `PlanError` when it is unreadable or not a plan of this version."""
        try:
            data = msgspec.json.decode(Path(path).read_bytes())
        except OSError as exc:
            raise PlanError(f"cannot read the plan file {path} ({exc.strerror or exc})") from exc
        except msgspec.DecodeError as exc:
            raise PlanError(f"{path}: not a plan file ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise PlanError(f"{path}: not an ftalk bucket plan (no format {PLAN_FORMAT!r})")
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"{path}: plan version {data.get('version')!r}, this ftalk reads version {PLAN_VERSION}")
        try:
            g, s = data["grid"], data["samples"]
            grid = LevelGrid(
                ratios=tuple(float(r) for r in g["ratios"]),
                sizes=tuple(int(x) for x in g["sizes"]),
                weights=tuple(float(x) for x in g["size_weights"]),
                heights=np.asarray(g["heights"], dtype=np.int32),
                widths=np.asarray(g["widths"], dtype=np.int32),
                frames=tuple(int(x) for x in g["frames"]),
            )
            plan = cls(
                grid=grid,
                ratio_index=np.asarray(s["ratio_index"], dtype=np.int16),
                size_mask=np.asarray(s["size_mask"], dtype=np.uint32),
                stride=np.asarray(s["stride"], dtype=np.int32),
                drop_reason=np.asarray(s["drop_reason"], dtype=np.int8),
                seed=int(data["seed"]),
                world_size=int(data["world_size"]),
                train_batch_size=int(data["train_batch_size"]),
                leftover_policy=str(data["leftover_policy"]),
                random_frame_crop=bool(data["random_frame_crop"]),
                config_hash=str(data["config_hash"]),
                configs=dict(data["configs"]),
                metadata_hash=str(data.get("metadata_hash", "")),
                metadata_path=str(data.get("metadata_path", "")),
            )
            n = plan.num_samples
            if not all(len(a) == n for a in (plan.size_mask, plan.stride, plan.drop_reason, s["bucket"])):
                raise ValueError("per-sample arrays differ in length")
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{path}: damaged plan file ({exc})") from exc
        plan._assignments[0] = np.asarray(s["bucket"], dtype=np.int32)
        return plan


def build_plan(
    facts: ClipFacts | Sequence[MetadataEntry],
    buckets: BucketConfig,
    train: TrainConfig,
    world_size: int = 1,
    seed: int | None = None,
    *,
    metadata_hash: str = "",
    metadata_path: str | Path = "",
) -> BucketPlan:
    """Plan every clip (arrays of facts, or loaded entries with probe facts): ratio bucket, allowed sizes,
    stride, drop reason. `seed` defaults to `train.seed` (0 when that is None)."""
    if world_size < 1:
        raise PlanError(f"world size must be at least 1, not {world_size}")
    if not isinstance(facts, ClipFacts):
        facts = facts_from_entries(facts)
    seed = seed if seed is not None else (train.seed if train.seed is not None else 0)
    grid = level_grid(buckets)
    elig = eligibility(facts.width, facts.height, facts.num_frames, facts.fps, buckets, grid, buckets.max_upscale)
    return BucketPlan(
        grid=grid,
        ratio_index=elig.ratio_index,
        size_mask=elig.size_mask,
        stride=elig.stride,
        drop_reason=elig.drop_reason,
        seed=int(seed),
        world_size=int(world_size),
        train_batch_size=train.train_batch_size,
        leftover_policy=buckets.leftover_policy,
        random_frame_crop=buckets.random_frame_crop,
        config_hash=plan_config_hash(buckets, train),
        configs=plan_configs(buckets, train),
        metadata_hash=metadata_hash,
        metadata_path=str(metadata_path),
    )


def _metadata_path(cfg: FtalkConfig, metadata_path: Path | None) -> Path:
    path = metadata_path if metadata_path is not None else cfg.data.train_data_meta
    if path is None:
        raise PlanError("no metadata file: give --train_data_meta (or data.train_data_meta in the config)")
    return Path(path)


def plan_from_metadata(
    cfg: FtalkConfig,
    metadata_path: Path | None = None,
    world_size: int = 1,
    *,
    probe_missing: bool = True,
    facts: ClipFacts | None = None,
) -> tuple[BucketPlan, ClipFacts, list[str]]:
    """Build the plan from `facts`, or from the metadata's probe facts (probing what lacks them):
    (plan, facts, notes)."""
    path = _metadata_path(cfg, metadata_path)
    notes: list[str] = []
    if facts is None:
        facts, notes = read_clip_facts(
            path, cfg.data.media_root(), probe_missing=probe_missing, allow_outside=cfg.data.allow_outside_data_dir
        )
    plan = build_plan(
        facts, cfg.buckets, cfg.train, world_size, metadata_hash=metadata_hash(path), metadata_path=str(path)
    )
    return plan, facts, notes


def load_plan_checked(
    path: Path | None,
    cfg: FtalkConfig,
    metadata_path: Path | None = None,
    world_size: int | None = None,
    *,
    facts: ClipFacts | None = None,
) -> tuple[BucketPlan, list[str]]:
    """The plan `ftalk train` uses: the file at `path` when it matches the config and the metadata, else a
    fresh plan (from `facts` when given) with a warning saying why (missing/unreadable file, changed config
    keys, changed metadata). A different world size only warns: the per-sample assignment does not depend on it."""
    meta = _metadata_path(cfg, metadata_path)
    warnings: list[str] = []
    plan: BucketPlan | None = None
    if path is None:
        warnings.append("no plan file given (data.bucket_plan): planned from the metadata now")
    else:
        try:
            plan = BucketPlan.load(Path(path))
        except PlanError as exc:
            warnings.append(f"{exc}; planned from the metadata now (write one with `ftalk plan-buckets --write`)")
    if plan is not None:
        current = plan_config_hash(cfg.buckets, cfg.train)
        if plan.config_hash != current:
            changed = config_diff(plan.configs, plan_configs(cfg.buckets, cfg.train))
            shown = "; ".join(changed[:6]) + (f"; ... {len(changed) - 6} more" if len(changed) > 6 else "")
            warnings.append(f"plan {path} is stale, the config changed ({shown or 'hash differs'}): rebuilt")
            plan = None
    if plan is not None:
        try:
            current_meta = metadata_hash(meta)
        except OSError as exc:
            raise PlanError(f"cannot read the metadata file {meta} ({exc.strerror or exc})") from exc
        if plan.metadata_hash != current_meta:
            warnings.append(f"plan {path} is stale, the metadata file {meta} changed since it was planned: rebuilt")
            plan = None
    if plan is None:
        plan, _, notes = plan_from_metadata(cfg, meta, world_size or 1, facts=facts)
        warnings.extend(notes)
    elif world_size is not None and world_size != plan.world_size:
        warnings.append(
            f"plan {path} was made for world size {plan.world_size}, this run has {world_size}: "
            "same buckets, different batches per rank"
        )
        plan = dataclasses.replace(plan, world_size=world_size, _assignments=dict(plan._assignments))
    return plan, warnings


# ---------------------------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class BucketRow:
    """One bucket of the table (epoch 0)."""

    bucket: int
    ratio: float
    size: int
    height: int
    width: int
    frames: int
    latent_frames: int
    tokens: int
    samples: int
    batches_per_rank: int
    leftover: int
    too_short: int
    too_small: int
    crop_waste: float


@dataclass(frozen=True)
class PlanStats:
    """What one epoch (epoch 0) of the plan trains, and what it leaves out."""

    rows: list[BucketRow]
    num_entries: int
    world_size: int
    train_batch_size: int
    gradient_accumulation_steps: int
    leftover_policy: str
    dropped: dict[str, int]
    leftover: int
    trained_samples: int
    batches_per_rank: int
    steps_per_epoch: int
    tokens_per_step_mean: float
    tokens_per_step_max: int
    budget_tokens: int
    budget_use: float
    crop_waste: float
    random_frame_crop: bool
    random_sizes: bool

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "rows": [dataclasses.asdict(r) for r in self.rows]}


def plan_stats(
    plan: BucketPlan,
    buckets: BucketConfig,
    gradient_accumulation_steps: int = 1,
    facts: ClipFacts | None = None,
    epoch: int = 0,
) -> PlanStats:
    """Per-bucket and overall numbers of one epoch (epoch 0 shown by plan-buckets; later epochs differ only
    by carried leftovers and, with `random_hw_adapt`, by which size each clip draws)."""
    grid = plan.grid
    assign = plan.assignment(epoch)
    active = assign >= 0
    ids = assign[active]
    counts = np.bincount(ids, minlength=grid.num_buckets)
    waste_sum = np.zeros(grid.num_buckets)
    if facts is not None and ids.size:
        r, s = np.divmod(ids, len(grid.sizes))
        waste = crop_waste(facts.height[active], facts.width[active], grid.heights[r, s], grid.widths[r, s])
        waste_sum = np.bincount(ids, weights=waste, minlength=grid.num_buckets)
    # a dropped clip is shown in the bucket of its aspect ratio at the full size (the one it was meant for)
    top = len(grid.sizes) - 1
    intended = plan.ratio_index.astype(np.int64) * len(grid.sizes) + top
    short = np.bincount(intended[plan.drop_reason == DROP_TOO_SHORT], minlength=grid.num_buckets)
    small = np.bincount(intended[plan.drop_reason == DROP_TOO_SMALL], minlength=grid.num_buckets)
    global_batch = plan.train_batch_size * plan.world_size
    rows: list[BucketRow] = []
    for b in np.flatnonzero(counts + short + small):
        r_i, s_i = divmod(int(b), len(grid.sizes))
        h, w, f = grid.shape(int(b))
        n = int(counts[b])
        rows.append(
            BucketRow(
                bucket=int(b),
                ratio=grid.ratios[r_i],
                size=grid.sizes[s_i],
                height=h,
                width=w,
                frames=f,
                latent_frames=latent_frames(f),
                tokens=token_count(h, w, f),
                samples=n,
                batches_per_rank=n // global_batch,
                leftover=n % global_batch,
                too_short=int(short[b]),
                too_small=int(small[b]),
                crop_waste=float(waste_sum[b] / n) if facts is not None and n else float("nan"),
            )
        )
    rows.sort(key=lambda row: (row.tokens, row.height), reverse=True)
    batches = sum(r.batches_per_rank for r in rows)
    trained = batches * global_batch
    steps = math.ceil(batches / gradient_accumulation_steps)
    per_step = global_batch * gradient_accumulation_steps
    total_tokens = sum(r.batches_per_rank * global_batch * r.tokens for r in rows)
    mean_tokens = total_tokens / trained if trained else 0.0
    budget = budget_tokens(buckets)
    crop = (
        sum(r.crop_waste * r.batches_per_rank * global_batch for r in rows if r.samples) / trained if trained else 0.0
    )
    dropped = {name: int(np.count_nonzero(plan.drop_reason == code)) for code, name in DROP_REASONS.items()}
    return PlanStats(
        rows=rows,
        num_entries=plan.num_samples,
        world_size=plan.world_size,
        train_batch_size=plan.train_batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps,
        leftover_policy=plan.leftover_policy,
        dropped=dropped,
        leftover=sum(r.leftover for r in rows),
        trained_samples=trained,
        batches_per_rank=batches,
        steps_per_epoch=steps,
        tokens_per_step_mean=mean_tokens * per_step,
        tokens_per_step_max=max((r.tokens for r in rows if r.batches_per_rank), default=0) * per_step,
        budget_tokens=budget,
        budget_use=mean_tokens / budget if budget else 0.0,
        crop_waste=crop if facts is not None else float("nan"),
        random_frame_crop=plan.random_frame_crop,
        random_sizes=len(plan.grid.sizes) > 1,
    )


def default_world_size(environ: Mapping[str, str] | None = None) -> int:
    """World size from the launcher's environment (`WORLD_SIZE`, set by accelerate launch / torchrun), else 1."""
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def frame_crop_note(frames: int) -> str:
    """How `random_frame_crop` varies a bucket's frame count (for the table's footnote)."""
    choices = frame_crop_choices(frames)
    return f"{choices[0]}..{choices[-1]}" if len(choices) > 1 else str(choices[0])


# ---------------------------------------------------------------------------------------------- report


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
    from fantasytalk_cli.train.memory import ModelDims, configured_model_dims, estimate_memory

    world = world_size if world_size is not None else default_world_size()
    plan, facts, notes = plan_from_metadata(cfg, metadata_path, world)
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
    bucket_memory: dict[int, MemoryEstimate] = {}
    for row in stats.rows:
        if row.samples:
            bucket_memory[row.bucket] = estimate_memory(
                dims.config,
                (row.height, row.width, row.frames),
                batch_size=cfg.train.train_batch_size,
                strategy=strategy,  # type: ignore[arg-type]
                devices=devices,
                mixed_precision=cfg.train.mixed_precision,
                gradient_checkpointing=cfg.model.gradient_checkpointing,
                low_vram=cfg.model.low_vram,
                vae_mini_batch=cfg.model.vae_mini_batch,
                capacity_gb=gpu_memory_gb,
                model=dims.source,
            )
    largest = max(bucket_memory.values(), key=lambda est: est.total_bytes, default=None)
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
    )
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report.to_json(), indent=1), encoding="utf-8")
        report.written.append(f"report written to {json_path}")
    return report


def render_plan_report(report: PlanReport) -> Any:
    """The report as rich renderables (a table per bucket, the summary, the memory estimate)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    st = report.stats
    left_word = "carried" if st.leftover_policy == "carry" else "dropped"
    table = Table(
        title="Buckets (epoch 0)",
        title_justify="left",
        caption=(
            "F frames, T latent frames, tokens per sample, batches per rank; short/small: clips dropped as too "
            f"short / too small (shown at their ratio's full size); left: leftover, {left_word}; "
            "crop: pixels cropped away; GB: estimated peak per GPU (! = at risk)"
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    for name in ("HxW", "F", "T", "tokens", "samples", "batches", "short", "small", "left", "crop", "GB"):
        table.add_column(name, justify="right", no_wrap=True)
    for row in st.rows:
        est = report.bucket_memory.get(row.bucket)
        mem = "" if est is None else f"{est.total_gb:.1f}" + ("[bold red]![/]" if est.at_risk else "")
        table.add_row(
            f"{row.height}x{row.width}",
            f"<={row.frames}" if st.random_frame_crop else str(row.frames),
            str(row.latent_frames),
            f"{row.tokens:,}",
            f"{row.samples:,}",
            f"{row.batches_per_rank:,}",
            f"{row.too_short:,}" if row.too_short else "",
            f"{row.too_small:,}" if row.too_small else "",
            f"{row.leftover:,}" if row.leftover else "",
            "" if not row.samples or not math.isfinite(row.crop_waste) else f"{row.crop_waste:.0%}",
            mem,
        )
    gb = st.train_batch_size * st.world_size
    leftover_what = "carried to the next epoch" if st.leftover_policy == "carry" else "dropped this epoch"
    dropped = ", ".join(f"{n:,} {name}" for name, n in st.dropped.items() if n) or "none"
    lines = [
        f"entries {st.num_entries:,}; trained this epoch {st.trained_samples:,}; dropped {dropped}; "
        f"leftover {st.leftover:,} ({leftover_what}).",
        f"world size {st.world_size}, batch {st.train_batch_size} per rank (global {gb}), gradient accumulation "
        f"{st.gradient_accumulation_steps}: {st.batches_per_rank:,} batches per rank, {st.steps_per_epoch:,} "
        "optimizer steps per epoch.",
        f"tokens per optimizer step: mean {st.tokens_per_step_mean:,.0f}, max {st.tokens_per_step_max:,}; "
        f"token budget per sample {st.budget_tokens:,} (used {st.budget_use:.0%} on average).",
        f"padding 0% (batches are bucket-homogeneous); crop waste {st.crop_waste:.1%} of resized pixels; "
        f"not trained this epoch {(st.num_entries - st.trained_samples) / max(st.num_entries, 1):.1%} of entries.",
    ]
    if st.random_sizes:
        lines.append(
            f"random_hw_adapt: each clip draws one of its allowed sizes {list(report.plan.grid.sizes)} per "
            "(seed, epoch); the table shows epoch 0, train draws the same."
        )
    if st.random_frame_crop:
        lines.append(
            "random_frame_crop: each batch draws a 4k+1 frame count (shown as a range) per (seed, epoch, batch)."
        )
    parts: list[Any] = [table, Text("\n".join(lines))]
    if report.memory is not None:
        parts.append(_memory_table(report.memory))
        if report.memory.capacity_bytes is None:
            parts.append(Text("pass --gpu-memory GB to flag buckets at risk of running out of memory"))
        elif report.at_risk:
            parts.append(
                Text(
                    f"{len(report.at_risk)} bucket(s) exceed 90% of the GPU memory: use gradient_checkpointing, "
                    "low_vram, zero3/fsdp, more GPUs or a smaller video_sample_size / token_sample_size",
                    style="bold red",
                )
            )
    parts.extend(Text(n, style="yellow") for n in report.notes)
    parts.extend(Text(w, style="green") for w in report.written)
    return Group(*parts)


def _memory_table(est: MemoryEstimate) -> Any:
    """The memory estimate of one bucket as a table of its terms (name, GB, formula)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    h, w, f = est.shape
    unit = "GPU" if est.device == "cuda" else "process"
    table = Table(
        title=(
            f"Peak memory per {unit}, largest bucket {h}x{w}x{f} x batch {est.batch_size} "
            f"({est.tokens:,} tokens/sample), {est.strategy} on {est.devices} {unit}{'s' if est.devices != 1 else ''}"
            + (f"\nmodel dims from {est.model}" if est.model else "")
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    table.add_column("term", no_wrap=True)
    table.add_column("GB", justify="right", no_wrap=True)
    table.add_column("formula (GB = 1e9 bytes)", overflow="fold")
    for term in est.terms:
        table.add_row(term.name, f"{term.gb:.2f}", term.formula)
    total = f"{est.total_gb:.2f}"
    share = ""
    if est.capacity_bytes is not None:
        share = f"of {est.capacity_bytes / GB:.0f} GB ({est.total_bytes / est.capacity_bytes:.0%})"
        share += " [bold red]AT RISK[/]" if est.at_risk else ""
    table.add_row("[bold]total[/]", f"[bold]{total}[/]", share)
    return Group(table, *(Text(f"note: {note}") for note in est.notes))
