"""The bucket batch sampler: exactly-once coverage across ranks, equal batch counts, carry/drop of
leftovers, bucket-homogeneous batches, seeded order, exact resume."""

from __future__ import annotations

import dataclasses
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from fantasytalk_cli.config.schema import BucketConfig, TrainConfig
from fantasytalk_cli.data.buckets import frame_crop_choices
from fantasytalk_cli.data.plan import BucketPlan, ClipFacts, PlanError, build_plan
from fantasytalk_cli.data.sampler import BucketBatchSampler, PlannedBatch, SamplerResumeError

SIZES = [(512, 512), (720, 1280), (1280, 720), (480, 640), (640, 480), (300, 1200), (100, 100)]


def _facts(n: int, batch: int) -> ClipFacts:
    rng = np.random.default_rng(n * 7919 + batch)
    pick = rng.integers(len(SIZES), size=n)
    wh = np.array(SIZES)[pick] if n else np.zeros((0, 2), int)
    return ClipFacts.from_lists(
        wh[:, 0], wh[:, 1], rng.integers(20, 200, size=n), rng.choice([25.0, 30.0, 60.0], size=n)
    )


def make_plan(
    n: int, batch: int, *, seed: int = 0, policy: str = "carry", random_sizes: bool = False, crop: bool = False
) -> BucketPlan:
    facts = _facts(n, batch)
    cfg = BucketConfig(
        video_sample_size=512,
        video_sample_n_frames=49,
        enable_bucket=True,
        random_hw_adapt=random_sizes,
        training_with_video_token_length=random_sizes,
        leftover_policy=policy,  # type: ignore[arg-type]
        random_frame_crop=crop,
    )
    return build_plan(facts, cfg, TrainConfig(train_batch_size=batch), seed=seed)


def samplers(plan: BucketPlan, world: int, epoch: int = 0, **kw: object) -> list[BucketBatchSampler]:
    out = [BucketBatchSampler(plan, rank=r, world_size=world, **kw) for r in range(world)]  # type: ignore[arg-type]
    for s in out:
        s.set_epoch(epoch)
    return out


def epoch_yield(plan: BucketPlan, world: int, epoch: int, **kw: object) -> list[list[PlannedBatch]]:
    return [list(s) for s in samplers(plan, world, epoch, **kw)]


dims = st.tuples(st.integers(0, 160), st.integers(1, 4), st.integers(1, 8))


@settings(max_examples=40, deadline=None)
@given(dims, st.integers(0, 3))
def test_drop_policy_covers_every_sample_exactly_once(d: tuple[int, int, int], epoch: int) -> None:
    n, batch, world = d
    plan = make_plan(n, batch, policy="drop")
    per_rank = epoch_yield(plan, world, epoch)
    lengths = {len(batches) for batches in per_rank}
    assert len(lengths) == 1  # every rank steps through the same number of batches
    assert lengths == {len(samplers(plan, world, epoch)[0])}
    seen = [i for batches in per_rank for b in batches for i in b]
    reported = samplers(plan, world, epoch)[0].dropped().tolist()
    active = np.flatnonzero(plan.assignment(epoch) >= 0).tolist()
    assert sorted(seen + reported) == active  # exactly once, or reported as a dropped leftover
    assert set(np.flatnonzero(plan.drop_reason != 0).tolist()).isdisjoint(seen)
    for batches in per_rank:
        assert all(len(b) == batch for b in batches)
        assert all(len(set(b)) == len(b) for b in batches)


@settings(max_examples=30, deadline=None)
@given(dims, st.booleans())
def test_carry_policy_over_consecutive_epochs(d: tuple[int, int, int], random_sizes: bool) -> None:
    n, batch, world = d
    plan = make_plan(n, batch, policy="carry", random_sizes=random_sizes)
    ranks = samplers(plan, world)
    trained: Counter[int] = Counter()
    dropped: Counter[int] = Counter()
    carried_in = np.zeros(0, dtype=np.int64)
    epochs = 4
    for epoch in range(epochs):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in ranks]
        assert len({len(b) for b in per_rank}) == 1
        seen = Counter(i for batches in per_rank for b in batches for i in b)
        assert np.array_equal(ranks[0].carried_into(epoch), carried_in)
        left = ranks[0].leftovers()
        # this epoch = every active sample once + the carried-in copies, minus what is left over
        expected = Counter(np.flatnonzero(plan.assignment(epoch) >= 0).tolist()) + Counter(carried_in.tolist())
        expected.subtract(Counter(left.tolist()))
        assert all(v >= 0 for v in expected.values()) and seen == +expected
        assert max(seen.values(), default=0) <= 2  # at most once in its own right, once carried
        carried_out = ranks[0].carried_into(epoch + 1)
        gone = ranks[0].dropped()
        assert Counter(carried_out.tolist()) + Counter(gone.tolist()) == Counter(left.tolist())
        assert set(gone.tolist()) <= set(carried_in.tolist())  # only a carried copy is ever dropped
        assert len(set(carried_out.tolist())) == len(carried_out)  # a sample is carried once
        trained.update(seen)
        dropped.update(gone.tolist())
        carried_in = carried_out
    # over the epochs: once per epoch, counting what is still carried and what could never fill a batch
    pending = Counter(carried_in.tolist())
    for i in np.flatnonzero(plan.drop_reason == 0).tolist():
        assert trained[i] + pending[i] + dropped[i] == epochs


@settings(max_examples=30, deadline=None)
@given(dims, st.integers(0, 2), st.booleans())
def test_batches_are_bucket_homogeneous(d: tuple[int, int, int], epoch: int, crop: bool) -> None:
    n, batch, world = d
    plan = make_plan(n, batch, random_sizes=True, crop=crop)
    assign = plan.assignment(epoch)
    per_rank = epoch_yield(plan, world, epoch)
    for batches in per_rank:
        for number, b in enumerate(batches):
            assert b.number == number and b.epoch == epoch
            assert {int(assign[i]) for i in b} == {b.bucket}
            h, w, f = plan.bucket_shape(b.bucket)
            assert (b.height, b.width) == (h, w)
            assert b.frames == f if not crop else b.frames in frame_crop_choices(f)
            other = per_rank[0][number]
            assert (other.bucket, other.frames) == (b.bucket, b.frames)  # all ranks agree on the shape


@settings(max_examples=30, deadline=None)
@given(dims, st.integers(0, 3), st.data())
def test_resume_from_any_position_equals_uninterrupted(
    d: tuple[int, int, int], epoch: int, data: st.DataObject
) -> None:
    n, batch, world = d
    plan = make_plan(n, batch, policy=data.draw(st.sampled_from(["carry", "drop"])))
    rank = data.draw(st.integers(0, world - 1))
    full = BucketBatchSampler(plan, rank=rank, world_size=world)
    full.set_epoch(epoch)
    expected = list(full)
    k = data.draw(st.integers(0, len(expected)))
    first = BucketBatchSampler(plan, rank=rank, world_size=world)
    first.set_epoch(epoch)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = BucketBatchSampler(plan, rank=rank, world_size=world)
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # the loop calls set_epoch again after loading: the position must survive
    rest = list(resumed)
    assert rest == expected[k:]
    assert [(b.bucket, b.frames, b.number) for b in rest] == [(b.bucket, b.frames, b.number) for b in expected[k:]]
    resumed.set_epoch(epoch + 1)
    full.set_epoch(epoch + 1)
    assert list(resumed) == list(full)  # the next epoch (with its carried leftovers) matches too


def test_state_dict_with_consumed_batches() -> None:
    plan = make_plan(120, 2)
    s = BucketBatchSampler(plan, world_size=2)
    batches = list(s)
    state = s.state_dict(consumed=3)  # the loop trained on 3, the loader had prefetched all
    again = BucketBatchSampler(plan, world_size=2)
    again.load_state_dict(state)
    assert list(again) == batches[3:]


def _state_at(plan: BucketPlan, world: int, k: int) -> dict:
    sampler = BucketBatchSampler(plan, world_size=world)
    it = iter(sampler)
    for _ in range(k):
        next(it)
    return pickle.loads(pickle.dumps(sampler.state_dict()))


def test_resume_rejects_a_changed_world_size() -> None:
    plan = make_plan(50, 2)
    state = _state_at(plan, 2, 1)
    with pytest.raises(SamplerResumeError) as err:
        BucketBatchSampler(plan, world_size=4).load_state_dict(state)
    message = str(err.value)
    assert "number of processes (world size) was 2, now 4" in message
    assert "start a new run" in message and "--resume_from_checkpoint" in message
    assert isinstance(err.value, PlanError)  # `ftalk train` reports it as a message, not a traceback


def test_resume_rejects_changed_metadata() -> None:
    plan = dataclasses.replace(make_plan(120, 2), metadata_hash="a" * 64)
    state = _state_at(plan, 2, 3)
    assert (
        state["metadata_hash"] == "a" * 64
        and state["num_samples"] == 120
        and state["epoch_batches"] == len(BucketBatchSampler(plan, world_size=2))
    )
    edited = dataclasses.replace(plan, metadata_hash="b" * 64)
    with pytest.raises(SamplerResumeError, match=r"metadata file \(sha256\) was aaaaaaaaaaaa, now bbbbbbbbbbbb"):
        BucketBatchSampler(edited, world_size=2).load_state_dict(state)
    grown = dataclasses.replace(make_plan(121, 2), metadata_hash="b" * 64)
    with pytest.raises(SamplerResumeError, match="number of metadata entries was 120, now 121"):
        BucketBatchSampler(grown, world_size=2).load_state_dict(state)
    same = BucketBatchSampler(dataclasses.replace(plan), world_size=2)
    same.load_state_dict(state)  # the same plan (rebuilt) resumes
    assert list(same) == list(BucketBatchSampler(plan, world_size=2))[3:]


def test_resume_rejects_changed_bucket_settings() -> None:
    plan = make_plan(120, 2)
    state = _state_at(plan, 1, 2)
    cfg = BucketConfig(video_sample_size=512, video_sample_n_frames=81, enable_bucket=True)
    other = build_plan(_facts(120, 2), cfg, TrainConfig(train_batch_size=2), seed=0)
    with pytest.raises(SamplerResumeError, match="bucket settings changed .*video_sample_n_frames: 49 -> 81"):
        BucketBatchSampler(other, world_size=1).load_state_dict(state)
    with pytest.raises(SamplerResumeError, match="the seed was 0, now 5"):
        BucketBatchSampler(plan, world_size=1, seed=5).load_state_dict(state)


def test_resume_checks_the_epoch_length() -> None:
    plan = make_plan(120, 2)
    state = {**_state_at(plan, 1, 2), "epoch_batches": 999}
    with pytest.raises(SamplerResumeError, match="had 999 batches per rank"):
        BucketBatchSampler(plan).load_state_dict(state)


def test_resume_accepts_a_state_saved_before_the_identity_keys() -> None:
    plan = make_plan(120, 2)
    state = _state_at(plan, 1, 2)
    for key in ("plan_configs", "plan_config_hash", "metadata_hash", "num_samples", "epoch_batches"):
        del state[key]
    resumed = BucketBatchSampler(plan)
    resumed.load_state_dict(state)
    assert list(resumed) == list(BucketBatchSampler(plan))[2:]


@settings(max_examples=40, deadline=None)
@given(
    st.tuples(st.integers(40, 240), st.integers(1, 3), st.integers(1, 4)),
    st.integers(0, 4),
    st.integers(1, 3),
    st.integers(0, 2**31 - 1),
    st.booleans(),
)
def test_order_is_a_pure_function_of_seed_and_epoch(
    d: tuple[int, int, int], epoch: int, later: int, seed: int, random_sizes: bool
) -> None:
    n, batch, world = d
    plan = make_plan(n, batch, seed=seed, random_sizes=random_sizes)
    order = epoch_yield(plan, world, epoch)
    assert order == epoch_yield(plan, world, epoch)  # same seed, same epoch: same order
    visited = samplers(plan, world, epoch + later)
    for s in visited:
        list(s)
        s.set_epoch(epoch)
    assert [list(s) for s in visited] == order  # no hidden state: going back to an epoch gives its order again
    # A different order is only certain when there is something to shuffle: with >= 8 samples trained in one
    # bucket two seeds or epochs agree with probability below 1/8!.
    assign = plan.assignment(epoch)
    counts = np.bincount(assign[assign >= 0]) if (assign >= 0).any() else np.zeros(1, int)
    assume(int((counts // (batch * world) * batch * world).max()) >= 8)
    assert epoch_yield(plan, world, epoch + later) != order  # another epoch: another order
    assert epoch_yield(plan, world, epoch, seed=seed + 1) != order  # another seed: another order


def test_batches_are_shuffled_across_buckets() -> None:
    plan = make_plan(400, 2)
    e0 = epoch_yield(plan, 2, 0)
    assert sorted(i for b in e0[0] for i in b) != [i for b in e0[0] for i in b]  # shuffled, not sorted
    buckets = [b.bucket for b in e0[0]]
    assert len(set(buckets)) > 1 and buckets != sorted(buckets)  # buckets interleave


def test_epoch_length_and_len() -> None:
    plan = make_plan(200, 3, policy="drop")
    s = BucketBatchSampler(plan, world_size=2)
    counts = np.bincount(plan.assignment(0)[plan.assignment(0) >= 0])
    assert len(s) == int(sum(c // 6 for c in counts)) == len(list(s))


def test_planned_batch_pickles_with_its_shape() -> None:
    b = PlannedBatch([3, 1], bucket=7, height=512, width=288, frames=49, epoch=2, number=5)
    c = pickle.loads(pickle.dumps(b))
    assert c == [3, 1] and isinstance(c, PlannedBatch)
    assert (c.bucket, c.height, c.width, c.frames, c.epoch, c.number) == (7, 512, 288, 49, 2, 5)


class _Echo(Dataset):
    def __len__(self) -> int:
        return 10**6

    def __getitem__(self, key: object) -> object:
        if isinstance(key, PlannedBatch):  # whole batch at once (sampler=..., batch_size=None)
            return {"idx": torch.tensor(list(key)), "shape": (key.height, key.width, key.frames)}
        return torch.tensor(key)


def test_works_with_dataloader_both_ways() -> None:
    plan = make_plan(60, 2)
    sampler = BucketBatchSampler(plan, world_size=1)
    expected = list(sampler)
    as_batch_sampler = [b.tolist() for b in DataLoader(_Echo(), batch_sampler=sampler)]
    assert as_batch_sampler == [list(b) for b in expected]
    whole = list(DataLoader(_Echo(), sampler=sampler, batch_size=None, num_workers=0))
    assert [w["idx"].tolist() for w in whole] == [list(b) for b in expected]
    assert [list(w["shape"]) for w in whole] == [[b.height, b.width, b.frames] for b in expected]


def test_empty_plan_yields_nothing_on_every_rank() -> None:
    plan = make_plan(0, 1)
    assert [list(s) for s in samplers(plan, 3)] == [[], [], []]
