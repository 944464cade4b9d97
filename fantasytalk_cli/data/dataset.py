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

from fantasytalk_cli.cache.lookup import VIDEO_TENSORS, CacheLookup
from fantasytalk_cli.cache.store import CacheError
from fantasytalk_cli.data.buckets import ClipWindow, clip_window, cover_crop
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
        cache: CacheLookup | None = None,
        fixed_window: bool = False,
    ) -> None:
        if len(entries) != plan.num_samples:
            raise SampleError(f"the plan covers {plan.num_samples} entries but the metadata has {len(entries)}")
        self.entries = entries
        self.plan = plan
        self.stride = plan.stride
        self.media_root = media_root
        self.seed = seed
        self.policy = policy
        self.cache = cache
        self.fixed_window = fixed_window

    def __len__(self) -> int:
        return len(self.entries)

    def window(self, index: int, batch: PlannedBatch) -> ClipWindow:
        """The frames entry ``index`` trains on in ``batch`` (epoch 0's window every epoch with `fixed_window`)."""
        entry = self.entries[index]
        probe = entry.probe
        if probe is None:  # the plan drops such entries; a plan file from another probe run may not have
            raise SampleError(f"{entry.file_path}: no probe facts (its video or audio could not be read)")
        return clip_window(
            probe.num_frames,
            probe.fps,
            batch.frames,
            int(self.stride[index]),
            seed=self.seed,
            epoch=0 if self.fixed_window else batch.epoch,
            index=index,
        )

    def cached_video(self, batch: PlannedBatch) -> dict[int, dict[str, torch.Tensor]] | None:
        """Every sample's cached video entry, or None when one of them is missing (the batch is then decoded)."""
        if self.cache is None:
            return None
        found = {}
        for index in batch:
            try:
                path = resolve_media_path(self.media_root, self.entries[index].file_path)
                hit = self.cache.video(path, self.window(index, batch), batch.height, batch.width)
            except (OSError, SampleError):
                hit = None  # the online path meets the same problem and reports it
            if hit is None:
                return None
            found[index] = hit
        return found

    def load_sample(
        self, index: int, batch: PlannedBatch, video: dict[str, torch.Tensor] | None = None
    ) -> dict[str, Any]:
        """Frames (or their cached encodings), audio (or its cached features) and caption of entry `index`,
        cropped to the batch's planned shape."""
        entry = self.entries[index]
        window = self.window(index, batch)
        audio_path = resolve_media_path(self.media_root, entry.audio_path)
        sample: dict[str, Any] = {"text": entry.text, "index": index, "video": video, "pixels": None}
        if video is None:
            video_path = resolve_media_path(self.media_root, entry.file_path)
            sample["pixels"] = to_bucket(read_frames(video_path, window.frame_indices), batch.height, batch.width)
        sample["audio_cache"] = self.cache.audio(audio_path, window) if self.cache is not None else None
        sample["text_cache"] = self.cache.text(entry.text) if self.cache is not None else None
        if sample["audio_cache"] is not None:
            sample["audio"] = torch.zeros(0)  # not read: the cached features stand for it
            return sample
        try:
            audio = read_audio_for_frames(audio_path, window.start_frame, window.num_frames, window.stride, window.fps)
        except ValueError as exc:
            raise SampleError(f"{audio_path}: {exc}") from exc
        sample["audio"] = torch.from_numpy(audio)
        return sample

    def __getitem__(self, batch: PlannedBatch) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        failures: list[Failure] = []
        videos = self.cached_video(batch) or {}
        for index in batch:
            try:
                samples.append(self.load_sample(index, batch, videos.get(index)))
            except Exception as exc:  # noqa: BLE001 (any decoder/IO error of one clip)
                if isinstance(exc, CacheError):
                    raise  # --cache_required: stop, whatever the bad-sample policy
                entry = self.entries[index]
                if self.policy == "fail":
                    raise SampleError(
                        f"entry {index} ({entry.file_path}): {exc}; fix or drop it (`ftalk validate-metadata`), "
                        "or train with --bad_sample_policy skip"
                    ) from exc
                failures.append(Failure(index, entry.file_path, f"{type(exc).__name__}: {exc}"))
        batch_out = collate(samples, batch, failures)
        if self.cache is not None:
            empty = self.cache.empty_text()
            if empty is not None and samples and all(s["text_cache"] is not None for s in samples):
                batch_out["text_cache"] = {"captions": [s["text_cache"] for s in samples], "empty": empty}
            batch_out["cache_misses"] = dict(self.cache.misses)
            self.cache.misses.clear()
        return batch_out


def collate(samples: list[dict[str, Any]], batch: PlannedBatch, failures: list[Failure]) -> dict[str, Any]:
    """Stack one planned batch. Audio lengths differ when fps differ: each clip keeps its own samples
    (the step encodes them one by one), so nothing is padded or cut. Cached video encodings replace the pixels
    only when every sample has them."""
    cached = bool(samples) and all(s["video"] is not None for s in samples)
    return {
        "pixels": None if cached or not samples else torch.stack([s["pixels"] for s in samples]),
        "video": {k: torch.cat([s["video"][k] for s in samples]) for k in VIDEO_TENSORS} if cached else None,
        "audio": [s["audio"] for s in samples],
        "audio_cache": [s["audio_cache"] for s in samples],
        "text": [s["text"] for s in samples],
        "indices": [s["index"] for s in samples],
        "shape": (batch.height, batch.width, batch.frames),
        "epoch": batch.epoch,
        "number": batch.number,
        "failures": failures,
    }
