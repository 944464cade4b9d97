"""The training dataset: planned shapes, exact audio spans, broken clips skipped or failing loudly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fantasytalk_cli.data.buckets import cover_crop
from fantasytalk_cli.data.dataset import (
    WORKER_RESIZE_AREA,
    ClipBatchDataset,
    SampleError,
    loader_frames,
    resize_float,
    resize_to_bucket,
    to_model_pixels,
)
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.plan import plan_from_metadata
from fantasytalk_cli.data.sampler import BucketBatchSampler
from fantasytalk_cli.models.audio import SAMPLE_RATE
from tests.tiny_world import world_config


def _setup(world: dict, tmp_path: Path, batch_size: int = 2):  # noqa: ANN202
    cfg = world_config(world, tmp_path / "run", train_batch_size=batch_size)
    plan, _, _ = plan_from_metadata(
        data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=cfg.data.train_data_meta
    )
    entries = load_entries(cfg.data.train_data_meta)
    sampler = BucketBatchSampler(plan, batch_size=batch_size, seed=3)
    return cfg, plan, entries, sampler


def test_batches_have_the_planned_shape_and_exact_audio(tiny_world: dict, tmp_path: Path) -> None:
    cfg, plan, entries, sampler = _setup(tiny_world, tmp_path)
    dataset = ClipBatchDataset(entries, plan, cfg.data.train_data_dir, seed=3)
    batch = next(iter(sampler))
    out = dataset[batch]
    assert len(out["pixels"]) == len(batch)  # uint8: resized (where the worker left that) and converted by the step
    for index, clip in zip(out["indices"], out["pixels"], strict=True):
        probe = entries[index].probe
        box = cover_crop(probe.height, probe.width, batch.height, batch.width)
        large = probe.height * probe.width > WORKER_RESIZE_AREA * box.resize_height * box.resize_width
        size = (batch.height, batch.width) if large else (probe.height, probe.width)
        assert clip.shape == (batch.frames, *size, 3) and clip.dtype == torch.uint8
    pixels = to_model_pixels(out["pixels"], batch.height, batch.width, torch.device("cpu"))
    assert pixels.shape == (len(batch), 3, batch.frames, batch.height, batch.width)
    assert pixels.min() >= -1 and pixels.max() <= 1 and pixels.dtype == torch.float32
    want = torch.stack([_float_reference(clip.numpy(), batch.height, batch.width) for clip in out["pixels"]])
    assert torch.allclose(pixels, want.permute(0, 4, 1, 2, 3).float() / 127.5 - 1, atol=1.01 / 127.5)
    for index, audio in zip(out["indices"], out["audio"], strict=True):
        probe = entries[index].probe
        span = batch.frames * int(plan.stride[index]) / probe.fps  # frames x stride / fps seconds
        assert abs(audio.numel() - span * SAMPLE_RATE) <= 1
    assert out["failures"] == []


def test_broken_clip_is_skipped_and_reported(tiny_world: dict, tmp_path: Path) -> None:
    cfg, plan, entries, sampler = _setup(tiny_world, tmp_path)
    batch = next(iter(sampler))
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    entries = list(entries)
    entries[batch[0]] = dataclasses.replace(entries[batch[0]], file_path=str(broken))
    out = ClipBatchDataset(entries, plan, cfg.data.train_data_dir, seed=3, policy="skip")[batch]
    assert len(out["pixels"]) == len(batch) - 1
    assert [f.index for f in out["failures"]] == [batch[0]]
    assert str(broken) in out["failures"][0].path
    with pytest.raises(SampleError, match=r"broken\.mp4.*bad_sample_policy skip"):
        ClipBatchDataset(entries, plan, cfg.data.train_data_dir, seed=3, policy="fail")[batch]


def test_planned_entry_without_probe_facts_is_a_failed_sample(tiny_world: dict, tmp_path: Path) -> None:
    """`train` fills every entry's facts before planning; an entry still without them (its files could not
    be read, yet a plan file keeps it) leaves its batch like any broken clip, with the reason."""
    cfg, plan, entries, sampler = _setup(tiny_world, tmp_path)
    batch = next(iter(sampler))
    entries = list(entries)
    entries[batch[0]] = dataclasses.replace(entries[batch[0]], probe=None)
    out = ClipBatchDataset(entries, plan, cfg.data.train_data_dir, seed=3)[batch]
    assert [f.index for f in out["failures"]] == [batch[0]] and "no probe facts" in out["failures"][0].reason


def _float_reference(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The original float path: frames to float, antialiased bilinear resize to cover, round, crop; uint8 NHWC."""
    box = cover_crop(frames.shape[1], frames.shape[2], height, width)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    size = (box.resize_height, box.resize_width)
    resized = F.interpolate(video, size=size, mode="bilinear", antialias=True).round().clamp(0, 255).to(torch.uint8)
    return resized.permute(0, 2, 3, 1)[:, box.top : box.top + height, box.left : box.left + width, :]


@pytest.mark.parametrize(
    ("source", "bucket"),
    [((120, 208), (128, 128)), ((208, 120), (128, 128)), ((256, 256), (128, 160)), ((96, 96), (160, 128))],
)
@pytest.mark.parametrize("route", ["cpu (uint8 kernel)", "accelerator (float chunks)"])
def test_resize_matches_the_float_path_within_one_grey_level(
    source: tuple[int, int], bucket: tuple[int, int], route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up- and downscales of both orientations, on both routes `resize_to_bucket` takes: the float path to 1 grey
    level. The accelerator's route runs here on the CPU, with chunks smaller than the clip."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(3, *source, 3), dtype=np.uint8)  # worst case for rounding: no smooth areas
    ramp = np.broadcast_to(np.linspace(0, 255, source[1], dtype=np.float32)[None, None, :, None], (2, *source, 3))
    frames = np.concatenate([noise, ramp.round().astype(np.uint8)])
    if route.startswith("accelerator"):
        monkeypatch.setattr("fantasytalk_cli.data.dataset.RESIZE_CHUNK", 2)
        monkeypatch.setattr("fantasytalk_cli.data.dataset.resize_uint8", resize_float)
    got = resize_to_bucket(torch.from_numpy(frames), *bucket)
    want = _float_reference(frames, *bucket).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert got.shape == want.shape == (3, 5, *bucket) and got.dtype == torch.float32
    assert (got - want).abs().max().item() <= 1.01 / 127.5


def test_clip_that_fits_is_only_cropped() -> None:
    frames = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(2, 64, 80, 3), dtype=np.uint8))
    out = resize_to_bucket(frames, 64, 64)
    assert torch.equal(out, frames[:, :, 8:72].permute(3, 0, 1, 2).float() / 127.5 - 1)


def test_worker_resizes_only_sources_far_larger_than_their_bucket() -> None:
    """A source up to `WORKER_RESIZE_AREA` times its cover size travels as decoded (no copy); a larger one is
    resized to its bucket in the worker, the float path to one grey level, and the step then only converts it."""
    rng = np.random.default_rng(2)
    near = rng.integers(0, 256, size=(2, 60, 104, 3), dtype=np.uint8)  # cover 48x83 for 48x48: 1.57x the pixels
    assert loader_frames(near, 48, 48).data_ptr() == near.__array_interface__["data"][0]
    far = rng.integers(0, 256, size=(2, 120, 208, 3), dtype=np.uint8)  # 6.3x the pixels of its cover size
    got = loader_frames(far, 48, 48)
    assert got.shape == (2, 48, 48, 3) and got.dtype == torch.uint8
    assert (got.int() - _float_reference(far, 48, 48).int()).abs().max().item() <= 1
    step = to_model_pixels([got], 48, 48, torch.device("cpu"))[0]
    assert torch.equal(step, got.permute(3, 0, 1, 2).float() / 127.5 - 1)
