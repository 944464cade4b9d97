"""The training dataset: one `PlannedBatch` in, one model-ready batch out.

The sampler decides every batch's shape (bucket height, width, frames); the dataset reads exactly the
planned frames with decord, resizes to cover and centre-crops into the bucket, and cuts the audio to
exactly the sampled frames' time span. Used with `DataLoader(dataset, sampler=batch_sampler,
batch_size=None)`, so workers receive whole planned batches.

A clip that fails to load is never retried: with policy `skip` it leaves the batch and is reported
in `failures` (the loop logs, counts and bounds them); with `fail` the error names the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fantasytalk_cli.data.buckets import clip_window, cover_crop
from fantasytalk_cli.data.metadata import MetadataEntry, resolve_media_path
from fantasytalk_cli.data.plan import BucketPlan
from fantasytalk_cli.data.sampler import PlannedBatch
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.models.audio import read_audio_for_frames


class SampleError(FtalkError, RuntimeError):
    """A clip of the metadata cannot be turned into a training sample."""


@dataclass(frozen=True)
class Failure:
    """One skipped sample: which entry, which file, why."""

    index: int
    path: str
    reason: str


def read_frames(path: Path, indices: Sequence[int]) -> np.ndarray:
    """Decode exactly `indices` (uint8 [F, H, W, 3]) with decord, the decoder validation probed with."""
    import decord

    reader = decord.VideoReader(str(path), num_threads=1)
    if max(indices) >= len(reader):
        raise SampleError(f"{path}: needs frame {max(indices)} but decodes only {len(reader)} frames")
    return reader.get_batch(list(indices)).asnumpy()


def to_bucket(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> uint8 [F, height, width, 3] (a view): resize to cover, centre crop.

    Stays uint8 and channels-last as decoded: torch resizes uint8 channels-last frames directly (its antialiased
    bilinear uint8 kernel, 10-20x faster than converting 81 frames to float first, and within one grey level
    of the float path: tests/test_dataset.py pins it). A clip that already fits is not copied at all; the
    batch's `torch.stack` makes the one contiguous copy. `to_model_pixels` makes the [3, F, H, W] floats in
    [-1, 1] on the device."""
    box = cover_crop(frames.shape[1], frames.shape[2], height, width)
    video = torch.from_numpy(frames)
    if (box.resize_height, box.resize_width) != tuple(video.shape[1:3]):
        size = (box.resize_height, box.resize_width)
        channels_last = video.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: the uint8 fast path's layout
        video = F.interpolate(channels_last, size=size, mode="bilinear", antialias=True).permute(0, 2, 3, 1)
    return video[:, box.top : box.top + height, box.left : box.left + width, :]


def to_model_pixels(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] from the loader -> float32 [B, 3, F, H, W] in [-1, 1] on `device`
    (the cheap uint8 copy first, the layout change and conversion where compute is)."""
    video = pixels.to(device, non_blocking=True).permute(0, 4, 1, 2, 3).contiguous()
    return video.float().div_(127.5).sub_(1.0)


class ClipBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset indexed by `PlannedBatch` (see module docstring)."""

    def __init__(
        self,
        entries: Sequence[MetadataEntry],
        plan: BucketPlan,
        media_root: Path | None,
        *,
        seed: int,
        policy: str = "skip",
    ) -> None:
        if len(entries) != plan.num_samples:
            raise SampleError(f"the plan covers {plan.num_samples} entries but the metadata has {len(entries)}")
        self.entries = entries
        self.stride = plan.stride
        self.media_root = media_root
        self.seed = seed
        self.policy = policy

    def __len__(self) -> int:
        return len(self.entries)

    def load_sample(self, index: int, batch: PlannedBatch) -> dict[str, Any]:
        """Frames, audio and caption of entry `index` cropped to the batch's planned shape."""
        entry = self.entries[index]
        probe = entry.probe
        if probe is None:  # the plan drops such entries; a plan file from another probe run may not have
            raise SampleError(f"{entry.file_path}: no probe facts (its video or audio could not be read)")
        window = clip_window(
            probe.num_frames,
            probe.fps,
            batch.frames,
            int(self.stride[index]),
            seed=self.seed,
            epoch=batch.epoch,
            index=index,
        )
        video_path = resolve_media_path(self.media_root, entry.file_path)
        audio_path = resolve_media_path(self.media_root, entry.audio_path)
        pixels = to_bucket(read_frames(video_path, window.frame_indices), batch.height, batch.width)
        try:
            audio = read_audio_for_frames(audio_path, window.start_frame, window.num_frames, window.stride, window.fps)
        except ValueError as exc:
            raise SampleError(f"{audio_path}: {exc}") from exc
        return {"pixels": pixels, "audio": torch.from_numpy(audio), "text": entry.text, "index": index}

    def __getitem__(self, batch: PlannedBatch) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        failures: list[Failure] = []
        for index in batch:
            try:
                samples.append(self.load_sample(index, batch))
            except Exception as exc:  # noqa: BLE001 (any decoder/IO error of one clip)
                entry = self.entries[index]
                if self.policy == "fail":
                    raise SampleError(
                        f"entry {index} ({entry.file_path}): {exc}; fix or drop it (`ftalk validate-metadata`), "
                        "or train with --bad_sample_policy skip"
                    ) from exc
                failures.append(Failure(index, entry.file_path, f"{type(exc).__name__}: {exc}"))
        return collate(samples, batch, failures)


def collate(samples: list[dict[str, Any]], batch: PlannedBatch, failures: list[Failure]) -> dict[str, Any]:
    """Stack one planned batch. Audio lengths differ when fps differ: each clip keeps its own samples
    (the step encodes them one by one), so nothing is padded or cut."""
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]) if samples else None,
        "audio": [s["audio"] for s in samples],
        "text": [s["text"] for s in samples],
        "indices": [s["index"] for s in samples],
        "shape": (batch.height, batch.width, batch.frames),
        "epoch": batch.epoch,
        "number": batch.number,
        "failures": failures,
    }
