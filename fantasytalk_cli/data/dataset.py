"""The training dataset: one `PlannedBatch` in, one model-ready batch out.

The sampler decides every batch's shape (bucket height, width, frames); the dataset reads exactly the
planned frames with decord and cuts the audio to exactly the sampled frames' time span; the step resizes the
frames to cover and centre-crops them into the bucket on the device (`to_model_pixels`). Used with
`DataLoader(dataset, sampler=batch_sampler, batch_size=None)`, so workers receive whole planned batches.

A clip that fails to load is never retried: with policy `skip` it leaves the batch and is reported
in `failures` (the loop logs, counts and bounds them); with `fail` the error names the file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from fantasytalk_cli.data.buckets import ClipWindow, clip_window, cover_crop
from fantasytalk_cli.data.metadata import MetadataEntry, resolve_media_path
from fantasytalk_cli.data.plan import BucketPlan
from fantasytalk_cli.data.sampler import PlannedBatch
from fantasytalk_cli.data.tracks import latent_weights, read_track
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.models.audio import read_audio_for_frames
from fantasytalk_cli.models.encoders import VIDEO_TENSORS


class SampleError(FtalkError, RuntimeError):
    """A clip of the metadata cannot be turned into a training sample."""


class FeaturesRequiredError(FtalkError):
    """A feature lookup lacks what the run requires (`--cache_required`): stops loading whatever the bad-sample
    policy."""


class FeatureLookup(Protocol):
    """Precomputed features a batch uses instead of encoding them (the feature cache's read side,
    `cache.lookup.CacheLookup`): None where an entry is missing, `FeaturesRequiredError` where it must not be."""

    misses: Counter[str]
    """Entries looked for and not found, by kind (the loader hands them to the loop and clears them)."""

    def text(self, caption: str) -> torch.Tensor | None: ...

    def empty_text(self) -> torch.Tensor | None: ...

    def audio(self, path: Path, window: ClipWindow) -> torch.Tensor | None: ...

    def video(self, path: Path, window: ClipWindow, height: int, width: int) -> dict[str, torch.Tensor] | None: ...


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


WORKER_RESIZE_AREA = 2.0
"""A source with more than this many times the pixels of its resize-to-cover size is resized in the DataLoader
worker (`loader_frames`): a sample then never travels through the prefetch queue, shared and pinned memory and
the host-to-device copy at more than twice its bucket's bytes (81 frames of 4K into a 512 bucket: 2 GB as decoded)."""


def loader_frames(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """What a worker hands the step for a clip decoded as uint8 [F, H, W, 3]: the frames as decoded (resized on the
    device by the step, `to_model_pixels`), or, for a source more than `WORKER_RESIZE_AREA` times larger than it
    needs, resized to cover and centre-cropped here (uint8 [F, height, width, 3], the CPU route of
    `resize_to_bucket`), which the step then only converts."""
    video = torch.from_numpy(frames)
    box = cover_crop(video.shape[1], video.shape[2], height, width)
    if video.shape[1] * video.shape[2] <= WORKER_RESIZE_AREA * box.resize_height * box.resize_width:
        return video
    resized = resize_uint8(video.permute(0, 3, 1, 2), (box.resize_height, box.resize_width)).permute(0, 2, 3, 1)
    return resized[:, box.top : box.top + height, box.left : box.left + width, :]


def to_model_pixels(frames: Sequence[torch.Tensor], height: int, width: int, device: torch.device) -> torch.Tensor:
    """Each clip's decoded uint8 frames [F, H, W, 3] (any source size) -> float32 [B, 3, F, height, width] in
    [-1, 1] on `device`: the uint8 frames travel as decoded, and are resized to cover, centre-cropped and converted
    where compute is (see `resize_to_bucket`)."""
    return torch.stack([resize_to_bucket(clip.to(device, non_blocking=True), height, width) for clip in frames])


RESIZE_CHUNK = 8
"""Frames resized at once in float off the CPU: bounds the float copy of a large source (1080p: 200 MB per 8)."""


def resize_to_bucket(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float32 [3, F, height, width] in [-1, 1] on the same device: resize to cover (bilinear,
    antialiased), centre crop, whole grey levels.

    The resize runs in the training process on the device, not in the DataLoader workers (but for sources far
    larger than their bucket: `loader_frames`): on CPU-poor nodes the workers are decode-bound, and an exact
    antialiased resize of 81 frames costs them about as much again as the decode (`bench/dataloader.py`). On the
    CPU, torch's uint8 channels-last antialiased kernel (10-20x faster than converting to float first); on an
    accelerator, which has no uint8 antialiased kernel, float in chunks of `RESIZE_CHUNK` frames, rounded to whole
    grey levels. Both are the float path to one grey level (tests/test_dataset.py pins it); a clip that already
    fits is only cropped."""
    box = cover_crop(video.shape[1], video.shape[2], height, width)
    size = (box.resize_height, box.resize_width)
    channels_first = video.permute(0, 3, 1, 2)  # NCHW view of NHWC memory: the uint8 fast path's layout
    if size == tuple(video.shape[1:3]):
        resized = channels_first
    elif video.device.type == "cpu":
        resized = resize_uint8(channels_first, size)
    else:
        resized = resize_float(channels_first, size)
    cropped = resized[:, :, box.top : box.top + height, box.left : box.left + width]
    planar = cropped.permute(1, 0, 2, 3).contiguous()  # on the CPU route still uint8: a quarter of float's bytes
    return planar.float().div_(127.5).sub_(1.0)


def resize_uint8(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [F, 3, H, W] (channels-last memory) -> uint8 [F, 3, *size]: torch's antialiased bilinear uint8 kernel."""
    return F.interpolate(frames, size=size, mode="bilinear", antialias=True)


def resize_float(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [F, 3, H, W] -> float32 [F, 3, *size] in whole grey levels: antialiased bilinear in float,
    `RESIZE_CHUNK` frames at a time."""
    out = torch.empty((frames.shape[0], 3, *size), dtype=torch.float32, device=frames.device)
    for start in range(0, frames.shape[0], RESIZE_CHUNK):
        chunk = frames[start : start + RESIZE_CHUNK].float()
        resized = F.interpolate(chunk, size=size, mode="bilinear", antialias=True)
        out[start : start + RESIZE_CHUNK] = resized.round_().clamp_(0, 255)
    return out


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
        cache: FeatureLookup | None = None,
        fixed_window: bool = False,
        regions: tuple[float, float] | None = None,
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
        self.regions = regions
        """(face, lip) loss weights: each sample's latent cell weights from its entry's track (`data.tracks`)."""

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
        sample["loss_cells"] = self.loss_cells(entry, window, batch) if self.regions is not None else None
        if video is None:
            video_path = resolve_media_path(self.media_root, entry.file_path)
            sample["pixels"] = loader_frames(read_frames(video_path, window.frame_indices), batch.height, batch.width)
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

    def loss_cells(self, entry: MetadataEntry, window: ClipWindow, batch: PlannedBatch) -> torch.Tensor | None:
        """The sample's latent cell weights [T_lat, h, w] from its track, or None when the entry has none."""
        assert self.regions is not None
        track = entry.extra.get("track")
        if not track:
            return None
        weights = latent_weights(
            read_track(resolve_media_path(self.media_root, str(track))),
            window.frame_indices,
            batch.height,
            batch.width,
            face_weight=self.regions[0],
            lip_weight=self.regions[1],
        )
        return torch.from_numpy(weights)

    def __getitem__(self, batch: PlannedBatch) -> dict[str, Any]:
        samples: list[dict[str, Any]] = []
        failures: list[Failure] = []
        videos = self.cached_video(batch) or {}
        for index in batch:
            try:
                samples.append(self.load_sample(index, batch, videos.get(index)))
            except Exception as exc:  # noqa: BLE001 (any decoder/IO error of one clip)
                if isinstance(exc, FeaturesRequiredError):
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


def _loss_cells(samples: list[dict[str, Any]], batch: PlannedBatch) -> torch.Tensor | None:
    """[B, T_lat, h, w] cell weights when a sample has them (ones for a sample without a track), else None (the
    plain loss: weight 1 everywhere, exactly)."""
    if all(s.get("loss_cells") is None for s in samples):
        return None
    shape = ((batch.frames - 1) // 4 + 1, batch.height // 8, batch.width // 8)
    return torch.stack([s["loss_cells"] if s["loss_cells"] is not None else torch.ones(shape) for s in samples])


def collate(samples: list[dict[str, Any]], batch: PlannedBatch, failures: list[Failure]) -> dict[str, Any]:
    """Stack one planned batch. Each clip's frames stay uint8, as `loader_frames` left them (most at their source
    size), until the step resizes them on the device (`to_model_pixels`). Audio lengths differ when fps differ:
    each clip keeps its own samples (the step encodes them one by one), so nothing is padded or cut. Cached video
    encodings replace the pixels only when every sample has them."""
    cached = bool(samples) and all(s["video"] is not None for s in samples)
    return {
        "pixels": None if cached or not samples else [s["pixels"] for s in samples],
        "video": {k: torch.cat([s["video"][k] for s in samples]) for k in VIDEO_TENSORS} if cached else None,
        "audio": [s["audio"] for s in samples],
        "audio_cache": [s["audio_cache"] for s in samples],
        "text": [s["text"] for s in samples],
        "indices": [s["index"] for s in samples],
        "shape": (batch.height, batch.width, batch.frames),
        "loss_cells": _loss_cells(samples, batch),
        "epoch": batch.epoch,
        "number": batch.number,
        "failures": failures,
    }
