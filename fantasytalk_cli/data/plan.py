"""The bucket plan: which bucket every clip trains in, and what is dropped and why. Built from probe facts (never
by opening media files), saved as the JSON file `ftalk train` reads, and checked for staleness (config or metadata
changed) when loaded. The numbers and memory estimates `ftalk plan-buckets` shows are in `fantasytalk_cli.planning`.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fantasytalk_cli.config.load import config_diff
from fantasytalk_cli.config.schema import BucketConfig, DataConfig, TrainConfig
from fantasytalk_cli.data.buckets import (
    DROP_REASONS,
    Eligibility,
    LevelGrid,
    assign_buckets,
    eligibility,
    level_grid,
)
from fantasytalk_cli.data.metadata import MetadataEntry, metadata_hash, outside_report
from fantasytalk_cli.data.metadata_facts import PLAN_FACT_FIELDS, read_plan_facts
from fantasytalk_cli.data.metadata_file import MetadataError
from fantasytalk_cli.data.probe_facts import ProbeFacts
from fantasytalk_cli.data.probing import default_cache_path, probe_missing_facts
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import write_bytes_atomic

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
    stride, drop reason. `seed` defaults to `train.seed`."""
    if world_size < 1:
        raise PlanError(f"world size must be at least 1, not {world_size}")
    if not isinstance(facts, ClipFacts):
        facts = facts_from_entries(facts)
    seed = seed if seed is not None else train.seed
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


def _metadata_path(data: DataConfig, metadata_path: Path | None) -> Path:
    path = metadata_path if metadata_path is not None else data.train_data_meta
    if path is None:
        raise PlanError("no metadata file: give --train_data_meta (or data.train_data_meta in the config)")
    return Path(path)


def plan_from_metadata(
    *,
    data: DataConfig,
    buckets: BucketConfig,
    train: TrainConfig,
    metadata_path: Path | None = None,
    world_size: int = 1,
    probe_missing: bool = True,
    facts: ClipFacts | None = None,
) -> tuple[BucketPlan, ClipFacts, list[str]]:
    """Build the plan from `facts`, or from the metadata's probe facts (probing what lacks them):
    (plan, facts, notes)."""
    path = _metadata_path(data, metadata_path)
    notes: list[str] = []
    if facts is None:
        facts, notes = read_clip_facts(
            path, data.media_root(), probe_missing=probe_missing, allow_outside=data.allow_outside_data_dir
        )
    plan = build_plan(facts, buckets, train, world_size, metadata_hash=metadata_hash(path), metadata_path=str(path))
    return plan, facts, notes


def load_plan_checked(
    path: Path | None,
    *,
    data: DataConfig,
    buckets: BucketConfig,
    train: TrainConfig,
    metadata_path: Path | None = None,
    world_size: int | None = None,
    facts: ClipFacts | None = None,
) -> tuple[BucketPlan, list[str]]:
    """The plan `ftalk train` uses: the file at `path` when it matches the config and the metadata, else a
    fresh plan (from `facts` when given) with a warning saying why (missing/unreadable file, changed config
    keys, changed metadata). A different world size only warns: the per-sample assignment does not depend on it."""
    meta = _metadata_path(data, metadata_path)
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
        current = plan_config_hash(buckets, train)
        if plan.config_hash != current:
            changed = config_diff(plan.configs, plan_configs(buckets, train))
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
        plan, _, notes = plan_from_metadata(
            data=data, buckets=buckets, train=train, metadata_path=meta, world_size=world_size or 1, facts=facts
        )
        warnings.extend(notes)
    elif world_size is not None and world_size != plan.world_size:
        warnings.append(
            f"plan {path} was made for world size {plan.world_size}, this run has {world_size}: "
            "same buckets, different batches per rank"
        )
        plan = dataclasses.replace(plan, world_size=world_size, _assignments=dict(plan._assignments))
    return plan, warnings
