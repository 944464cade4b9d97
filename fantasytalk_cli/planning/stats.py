"""The numbers `ftalk plan-buckets` shows for a bucket plan: per-bucket rows (shape, tokens, samples, batches,
drops, crop waste) and the totals (steps, token budget use)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fantasytalk_cli.config.schema import BucketConfig
from fantasytalk_cli.data.buckets import (
    DROP_REASONS,
    DROP_TOO_SHORT,
    DROP_TOO_SMALL,
    budget_tokens,
    crop_waste,
    frame_crop_choices,
    latent_frames,
    token_count,
)
from fantasytalk_cli.data.plan import BucketPlan, ClipFacts
from fantasytalk_cli.runtime.world import World, WorldError


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
    try:
        return World.from_env(environ).dp_size
    except WorldError:  # a preview: the training run itself refuses it with the reason
        return 1


def frame_crop_note(frames: int) -> str:
    """How `random_frame_crop` varies a bucket's frame count (for the table's footnote)."""
    choices = frame_crop_choices(frames)
    return f"{choices[0]}..{choices[-1]}" if len(choices) > 1 else str(choices[0])
