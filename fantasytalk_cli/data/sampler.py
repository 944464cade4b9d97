"""The bucket batch sampler `ftalk train` uses: bucket-homogeneous batches for one rank, from a `BucketPlan`.

Per epoch (a pure function of plan, seed, epoch, batch size, world size and the carried leftovers):
every bucket's samples are shuffled, samples carried from the previous epoch first, and cut into global
batches of `batch_size * world_size`; the global batches of all buckets are shuffled together and rank r
takes slice r of each, so every rank steps through the same number of batches (no hang at epoch end) and
every sample is used exactly once per epoch across ranks. A bucket's last, incomplete global batch is
`carry`-ed into the next epoch (deterministically; trained there in addition, carried at most once) or
`drop`-ped and reported (`dropped(epoch)`).

`state_dict()` also records what the order depends on (the plan's config hash, metadata hash and number of
entries; seed, batch size, world size, leftover policy): `load_state_dict` refuses the state of another plan or
layout with a `SamplerResumeError` saying what changed, rather than resuming at batch k of another order.

Each batch is a `PlannedBatch`: a list of dataset indices that also says its (height, width, frames).
Use it as a `batch_sampler`, or as a `sampler` with `batch_size=None` so the dataset receives the whole
`PlannedBatch` (and its shape) in one `__getitem__` call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from fantasytalk_cli.config.load import config_diff
from fantasytalk_cli.data.buckets import TAG_ORDER, batch_frames, rng_for
from fantasytalk_cli.data.plan import BucketPlan, PlanError


class PlannedBatch(list):  # type: ignore[type-arg]
    """Dataset indices of one batch (a list), with the shape every sample of it is cropped to."""

    def __init__(
        self, indices: list[int], *, bucket: int, height: int, width: int, frames: int, epoch: int, number: int
    ) -> None:
        super().__init__(indices)
        self.bucket = bucket
        self.height = height
        self.width = width
        self.frames = frames
        self.epoch = epoch
        self.number = number
        """Position of the batch in this epoch's order (the same on every rank)."""

    def __reduce__(self) -> tuple[Any, ...]:
        info = {k: getattr(self, k) for k in ("bucket", "height", "width", "frames", "epoch", "number")}
        return (_rebuild_batch, (list(self), info))


def _rebuild_batch(indices: list[int], info: dict[str, int]) -> PlannedBatch:
    return PlannedBatch(indices, **info)


@dataclass(frozen=True)
class EpochBatches:
    """One epoch: global batches ([n, batch*world] indices, in order), their buckets, and the samples left
    over (not in a full batch), each marked whether it was a copy carried in from the epoch before."""

    batches: np.ndarray
    buckets: np.ndarray
    leftovers: np.ndarray
    leftover_was_carried: np.ndarray


def epoch_batches(
    assignment: np.ndarray, carried: np.ndarray, global_batch: int, seed: int, epoch: int
) -> EpochBatches:
    """Cut one epoch into global batches (pure). `assignment`: bucket id per sample (-1 dropped);
    `carried`: samples carried in from the previous epoch. Within a bucket the carried copies come first,
    then the shuffled samples, then the own copies of the carried samples (so no batch holds a sample twice
    when its bucket has room); the buckets' global batches are then shuffled together."""
    rng = rng_for(seed, TAG_ORDER, epoch)
    fresh = np.flatnonzero(assignment >= 0)
    fresh = fresh[rng.permutation(fresh.size)]
    carried = np.asarray(carried, dtype=np.int64)
    carried = carried[assignment[carried] >= 0] if carried.size else carried
    pool = np.concatenate([carried, fresh]).astype(np.int64)
    group = np.concatenate([np.zeros(carried.size, np.int8), 1 + np.isin(fresh, carried).astype(np.int8)])
    bucket = assignment[pool]
    order = np.lexsort((group, bucket))  # by bucket, then group; stable, so shuffled within a group
    pool, bucket, group = pool[order], bucket[order], group[order]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]]) if pool.size else np.zeros(0, np.int64)
    ends = np.append(starts[1:], pool.size) if pool.size else np.zeros(0, np.int64)
    full_rows: list[np.ndarray] = []
    row_buckets: list[np.ndarray] = []
    left: list[np.ndarray] = []
    for start, end in zip(starts, ends, strict=True):
        count = (end - start) // global_batch * global_batch
        if count:
            full_rows.append(pool[start : start + count].reshape(-1, global_batch))
            row_buckets.append(np.full(count // global_batch, bucket[start], dtype=np.int64))
        if start + count < end:
            left.append(np.arange(start + count, end))
    if full_rows:
        batches = np.concatenate(full_rows)
        buckets = np.concatenate(row_buckets)
        shuffle = rng.permutation(batches.shape[0])
        batches, buckets = batches[shuffle], buckets[shuffle]
    else:
        batches = np.zeros((0, global_batch), dtype=np.int64)
        buckets = np.zeros(0, dtype=np.int64)
    at = np.concatenate(left) if left else np.zeros(0, dtype=np.int64)
    at = at[np.argsort(pool[at], kind="stable")]
    return EpochBatches(batches=batches, buckets=buckets, leftovers=pool[at], leftover_was_carried=group[at] == 0)


class BucketBatchSampler(Sampler[PlannedBatch]):
    """Yields this rank's bucket-homogeneous batches of one epoch; resumable at the exact next batch."""

    def __init__(
        self,
        plan: BucketPlan,
        *,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        leftover_policy: str | None = None,
        random_frame_crop: bool | None = None,
        epoch: int = 0,
    ) -> None:
        self.plan = plan
        self.batch_size = int(batch_size if batch_size is not None else plan.train_batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed if seed is not None else plan.seed)
        self.leftover_policy = leftover_policy or plan.leftover_policy
        self.random_frame_crop = plan.random_frame_crop if random_frame_crop is None else bool(random_frame_crop)
        if self.batch_size < 1 or self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"need batch_size >= 1 and 0 <= rank < world_size (got {batch_size}, {rank}, {world_size})"
            )
        if self.leftover_policy not in ("carry", "drop"):
            raise ValueError(f"leftover_policy must be carry or drop, not {self.leftover_policy!r}")
        self.epoch = int(epoch)
        self._carried: dict[int, np.ndarray] = {0: np.zeros(0, dtype=np.int64)}
        self._cache: tuple[int, EpochBatches] | None = None
        self._resume_at = 0
        self._yielded = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    # ------------------------------------------------------------------------------------------ epochs

    def carried_into(self, epoch: int) -> np.ndarray:
        """Samples carried into `epoch` from the one before (empty with policy `drop`)."""
        if self.leftover_policy == "drop" or epoch <= 0:
            return np.zeros(0, dtype=np.int64)
        known = max(e for e in self._carried if e <= epoch)
        for e in range(known, epoch):  # replay the epochs in between (deterministic)
            eb = self._batches(e)
            self._carried[e + 1] = eb.leftovers[~eb.leftover_was_carried]  # a sample is carried once
        return self._carried[epoch]

    def _batches(self, epoch: int) -> EpochBatches:
        if self._cache is None or self._cache[0] != epoch:
            carried = self.carried_into(epoch)
            self._cache = (
                epoch,
                epoch_batches(self.plan.assignment(epoch), carried, self.global_batch, self.seed, epoch),
            )
        return self._cache[1]

    def leftovers(self, epoch: int | None = None) -> np.ndarray:
        """Samples of `epoch` (default: the current one) not in a full batch (carried on, or dropped)."""
        return self._batches(self.epoch if epoch is None else epoch).leftovers

    def dropped(self, epoch: int | None = None) -> np.ndarray:
        """Leftovers of `epoch` not trained later: all of them with policy `drop`; with `carry`, the copies
        that were already carried in and are left over again (their bucket cannot fill a global batch)."""
        eb = self._batches(self.epoch if epoch is None else epoch)
        return eb.leftovers if self.leftover_policy == "drop" else eb.leftovers[eb.leftover_was_carried]

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` (a resumed epoch keeps its resume position)."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._resume_at = 0
            self._yielded = 0

    def __len__(self) -> int:
        """Batches per rank in the current epoch (the same on every rank)."""
        return int(self._batches(self.epoch).batches.shape[0])

    def __iter__(self) -> Iterator[PlannedBatch]:
        epoch = self.epoch
        eb = self._batches(epoch)
        start, self._resume_at = self._resume_at, 0
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for number in range(start, eb.batches.shape[0]):
            bucket = int(eb.buckets[number])
            height, width, frames = self.plan.bucket_shape(bucket)
            frames = batch_frames(frames, self.seed, epoch, number, self.random_frame_crop)
            self._yielded = number + 1
            yield PlannedBatch(
                [int(i) for i in eb.batches[number, lo:hi]],
                bucket=bucket,
                height=height,
                width=width,
                frames=frames,
                epoch=epoch,
                number=number,
            )

    # ------------------------------------------------------------------------------------------ resume

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where this rank is: epoch, batches done in it, samples carried into it, and what the order depends on
        (plan identity, layout) so that a resume with a different plan fails instead of training other batches.
        Pass `consumed` (batches the loop trained on this epoch) when a prefetching DataLoader has drawn more
        than were used."""
        return {
            "epoch": self.epoch,
            "batches_yielded": int(self._yielded if consumed is None else consumed),
            "carried": [int(i) for i in self.carried_into(self.epoch)],
            "epoch_batches": len(self),
            "plan_configs": self.plan.configs,
            **self._identity(),
        }

    def _identity(self) -> dict[str, Any]:
        """What the batch order is a function of, besides the epoch and the carried samples."""
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "leftover_policy": self.leftover_policy,
            "plan_config_hash": self.plan.config_hash,
            "metadata_hash": self.plan.metadata_hash,
            "num_samples": self.plan.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next `__iter__` yields the batch after the last one done. `SamplerResumeError` when the
        state was saved with another plan (bucket settings, metadata file, number of entries) or layout (seed,
        batch size, world size, leftover policy): batch k of another order is not where that run stopped."""
        changes = _identity_changes(state, self._identity(), self.plan.configs)
        if changes:
            raise SamplerResumeError(changes)
        self.epoch = int(state["epoch"])
        self._carried = {0: np.zeros(0, dtype=np.int64), self.epoch: np.asarray(state["carried"], dtype=np.int64)}
        self._cache = None
        self._resume_at = int(state["batches_yielded"])
        self._yielded = self._resume_at
        batches = len(self)
        if int(state.get("epoch_batches", batches)) != batches or self._resume_at > batches:
            raise SamplerResumeError(
                [
                    f"epoch {self.epoch} had {state.get('epoch_batches', '?')} batches per rank "
                    f"({self._resume_at} done), this plan gives it {batches} (were the buckets planned by another "
                    "ftalk version?)"
                ]
            )


_IDENTITY_NAMES = {
    "seed": "the seed",
    "batch_size": "train_batch_size",
    "world_size": "the number of processes (world size)",
    "leftover_policy": "buckets.leftover_policy",
    "plan_config_hash": "the bucket settings (config hash)",
    "metadata_hash": "the metadata file (sha256)",
    "num_samples": "the number of metadata entries",
}


def _identity_changes(saved: dict[str, Any], now: dict[str, Any], configs: dict[str, Any]) -> list[str]:
    """What differs between a saved sampler identity and the current one, in words (keys a state saved by an
    older ftalk lacks are not checked)."""
    changes: list[str] = []
    for key, value in now.items():
        if key not in saved or saved[key] == value:
            continue
        if key == "plan_config_hash" and saved.get("plan_configs"):
            diff = config_diff(saved["plan_configs"], configs)  # name the keys rather than the hash
            changes.append("the bucket settings changed (" + "; ".join(diff[:6] or ["config hash differs"]) + ")")
            continue
        old, new = (
            (str(saved[key])[:12] or "none", str(value)[:12] or "none")
            if key.endswith("_hash")
            else (saved[key], value)
        )
        changes.append(f"{_IDENTITY_NAMES[key]} was {old}, now {new}")
    return changes


class SamplerResumeError(PlanError):
    """A checkpoint's sampler state does not belong to this run's plan or layout; the message says what changed
    and what to do."""

    def __init__(self, changes: list[str]) -> None:
        self.changes = changes
        super().__init__(
            "cannot resume the checkpoint's batch order: "
            + "; ".join(changes)
            + ". It stopped at a batch of another order, so resuming here would skip or repeat samples. Resume "
            "with the metadata file, bucket settings, seed, batch size and number of processes it was trained with, "
            "or start a new run (without --resume_from_checkpoint, or with a new --output_dir)."
        )
