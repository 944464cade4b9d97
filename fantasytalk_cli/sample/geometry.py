"""Upstream inference's geometry (`docs/inference.md#inputs-and-image-size`, `#frame-count-and-audio-cut`): the
video's size from the image's, the frame count from the audio's duration, the audio samples cut for those frames,
and the conditioning image resized exactly as upstream resizes it.

Public API:
- `longest_edge_size`, `round_up`, `video_size`: the image's resized size and the video's (multiples of 16).
- `max_frames_4k1`, `num_frames_for_audio`, `audio_samples_for_frames`: the frame count and the audio cut.
- `load_image(path, size, *, image_size)`: the conditioning image as RGB uint8, resized as upstream does.

This module deliberately imports neither torch nor the models.
"""

from __future__ import annotations

import math

__all__ = [
    "AUDIO_RATE",
    "FRAMES_PER_LATENT",
    "MIN_NUM_FRAMES",
    "audio_samples_for_frames",
    "longest_edge_size",
    "max_frames_4k1",
    "num_frames_for_audio",
    "round_up",
    "video_size",
]

AUDIO_RATE = 16000
"""The rate the audio is resampled to for wav2vec2 (the same value as `models.audio.SAMPLE_RATE`, repeated here
so that checking inputs does not import torch)."""

SIZE_MULTIPLE = 16
"""Upstream's pipeline rounds the video's width and height up to a multiple of 16 (`check_resize_height_width`)."""

FRAMES_PER_LATENT = 4
"""The VAE's temporal stride: a video has 4k+1 frames, (num_frames - 1) // 4 + 1 latent frames."""

MIN_NUM_FRAMES = 5
"""The shortest video upstream's formula makes: int(fps * d // 4) * 4 + 5 with d near 0."""


def longest_edge_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """Upstream's `resize_image_by_longest_edge` size: scale = image_size / max(w, h), then
    (int(w * scale), int(h * scale)), in floating point exactly as upstream computes it."""
    if width <= 0 or height <= 0 or image_size <= 0:
        raise ValueError(f"sizes must be positive, got {width}x{height} at image_size {image_size}")
    scale = image_size / max(width, height)
    return int(width * scale), int(height * scale)


def round_up(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """`value` rounded up to a multiple of `multiple` (the pipeline's `check_resize_height_width`)."""
    return (value + multiple - 1) // multiple * multiple


def video_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) of the video upstream makes from a `width` x `height` image: the longest-edge size
    (`longest_edge_size`), each side then rounded UP to a multiple of 16, as the pipeline does. A 1024x1536 image at
    image_size 512 gives (341, 512), then (352, 512)."""
    resized_w, resized_h = longest_edge_size(width, height, image_size)
    return round_up(resized_w), round_up(resized_h)


def max_frames_4k1(max_num_frames: int) -> int:
    """`max_num_frames` rounded DOWN to the nearest 4k+1 (81 stays 81, 80 becomes 77)."""
    if max_num_frames < MIN_NUM_FRAMES:
        raise ValueError(f"max_num_frames must be at least {MIN_NUM_FRAMES}, got {max_num_frames}")
    return (max_num_frames - 1) // FRAMES_PER_LATENT * FRAMES_PER_LATENT + 1


def num_frames_for_audio(duration_s: float, fps: float, max_num_frames: int) -> int:
    """Frames of the video for `duration_s` seconds of audio: upstream's
    `min(int(fps * d // 4) * 4 + 5, max_num_frames)`. 3.0 s at 23 fps gives 73, 2.9 s gives 69, 10 s gives 81.

    The result is always 4k+1. Upstream's formula is 4k+1 except when `max_num_frames` is not; its pipeline then
    rounds that count UP to the next 4k+1 (while the audio is cut for the smaller count). Here a `max_num_frames`
    that is not 4k+1 is rounded DOWN to 4k+1 instead (80 -> 77), so the video never has frames without audio
    features. `ValueError` for a negative or non-finite duration, fps <= 0, or max_num_frames < 5 (`check_requests`
    reports those as `SampleInputError` first)."""
    if not math.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"the audio duration must be a finite number of seconds >= 0, got {duration_s}")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return min(int(fps * duration_s // 4) * 4 + 5, max_frames_4k1(max_num_frames))


def audio_samples_for_frames(num_frames: int, fps: float, rate: int = AUDIO_RATE) -> int:
    """How many samples (at `rate`) upstream cuts from the start of the audio for `num_frames` frames:
    `int(num_frames / fps * rate)`; 81 frames at 23 fps give 56347 samples at 16 kHz."""
    return int(num_frames / fps * rate)
