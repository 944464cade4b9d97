"""Shot boundaries for `ftalk prepare`: frame indices where a new shot starts, so no clip spans a cut.

The same rule as PySceneDetect's `ContentDetector` (its defaults, its `min_scene_len` merge filter), without
OpenCV: frames are decoded small with PyAV, converted to HSV with OpenCV's exact 8-bit arithmetic (H 0..179,
S and V 0..255), and each frame scores the mean absolute change of H, S and V from the frame before. As in
PySceneDetect the hue difference is not circular: a colour drifting across red (179 -> 0) scores as a cut.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import av
import av.container
import numpy as np

from fantasytalk_cli.errors import FtalkError

DEFAULT_THRESHOLD = 27.0
DEFAULT_MIN_SCENE_LEN = 15  # frames
DEFAULT_WEIGHTS = (1.0, 1.0, 1.0)  # hue, saturation, value (PySceneDetect's edge term is left out)
LUMA_ONLY_WEIGHTS = (0.0, 0.0, 1.0)
ANALYSIS_WIDTH = 256  # wider frames are scaled down to this width first, as PySceneDetect does

# OpenCV's 8-bit RGB->HSV divides by table in 12-bit fixed point; the same tables, folded into lookups of
# saturation by (max - min, max) and of hue by (sector numerator + 255, max - min), reproduce it bit for bit
_SHIFT, _HALF = 12, 1 << 11
_BYTE = np.arange(256, dtype=np.int64)
with np.errstate(divide="ignore"):
    _SAT_DIV = np.where(_BYTE > 0, np.rint((255 << _SHIFT) / _BYTE), 0).astype(np.int64)
    _HUE_DIV = np.where(_BYTE > 0, np.rint((180 << _SHIFT) / (6.0 * _BYTE)), 0).astype(np.int64)
_SAT_LUT = ((_BYTE[:, None] * _SAT_DIV[None, :] + _HALF) >> _SHIFT).clip(0, 255).astype(np.uint8)
_HUE_RAW = (np.arange(-255, 5 * 255 + 1)[:, None] * _HUE_DIV[None, :] + _HALF) >> _SHIFT
_HUE_LUT = np.where(_HUE_RAW < 0, _HUE_RAW + 180, _HUE_RAW).astype(np.uint8)

VideoSource = str | os.PathLike[str] | av.container.InputContainer


class NoVideoStreamError(FtalkError):
    """A media file given to `ftalk prepare` has no video stream to find shots in."""


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB `(..., 3)` to uint8 HSV `(..., 3)` with OpenCV's `COLOR_RGB2HSV` values bit for bit."""
    return np.moveaxis(_hsv_planes(rgb), 0, -1)


def _hsv_planes(rgb: np.ndarray) -> np.ndarray:
    """HSV as `(3, ...)` planes, so each channel is contiguous for the frame differences."""
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb_to_hsv takes uint8 RGB images (..., 3), got {rgb.dtype} {rgb.shape}")
    channels = rgb.astype(np.int16)
    r, g, b = channels[..., 0], channels[..., 1], channels[..., 2]
    value = np.maximum(np.maximum(r, g), b)
    spread = value - np.minimum(np.minimum(r, g), b)
    # the hue sector: red's when red is the largest (ties too), else green's, else blue's
    sector = np.where(value == r, g - b, np.where(value == g, b - r + 2 * spread, r - g + 4 * spread))
    planes = np.empty((3, *rgb.shape[:-1]), np.uint8)
    planes[0] = _HUE_LUT[sector + 255, spread]
    planes[1] = _SAT_LUT[spread, value]
    planes[2] = value
    return planes


def content_scores(
    frames: Iterable[np.ndarray], *, weights: tuple[float, float, float] = DEFAULT_WEIGHTS
) -> np.ndarray:
    """Per frame, the weighted mean absolute HSV change from the previous frame (0 for the first frame).

    `frames` are uint8 RGB `(H, W, 3)` arrays of one size; pass them already small (see `video_frames`).
    """
    weight = np.asarray(weights, dtype=np.float64)
    if weight.shape != (3,) or not np.abs(weight).sum() > 0:
        raise ValueError(f"content_scores: weights are (hue, sat, value) with one non-zero, got {weights}")
    scores: list[float] = []
    previous: np.ndarray | None = None
    for index, frame in enumerate(frames):
        hsv = _hsv_planes(np.asarray(frame)).astype(np.int16)
        if previous is None:
            scores.append(0.0)
        elif previous.shape != hsv.shape:
            raise ValueError(f"frame {index} is {frame.shape[:2]}, the frames before it {previous.shape[1:]}")
        else:
            per_channel = np.abs(hsv - previous).reshape(3, -1).mean(axis=1, dtype=np.float64)
            scores.append(float((per_channel * weight).sum() / np.abs(weight).sum()))
        previous = hsv
    return np.asarray(scores, dtype=np.float64)


def cuts_from_scores(
    scores: Iterable[float], *, threshold: float = DEFAULT_THRESHOLD, min_scene_len: int = DEFAULT_MIN_SCENE_LEN
) -> list[int]:
    """Frames whose score reaches `threshold`, filtered so shots last `min_scene_len` frames (frame 0 starts
    the first shot).

    PySceneDetect's merge rule: a cut within `min_scene_len` of the video's start, or before any cut was
    kept, is dropped; a later cut too close to the previous one starts a merge that ends, once the scores
    have stayed below the threshold for `min_scene_len` frames, with one cut at its last loud frame (only
    if the merged run itself spans `min_scene_len` frames).
    """
    cuts: list[int] = []
    last_above = 0  # last frame at or above the threshold (the first frame counts)
    kept_one = False  # merging starts only after the first kept cut
    merge_start: int | None = None
    for index, score in enumerate(scores):
        above = score >= threshold
        if min_scene_len <= 0:
            if above:
                cuts.append(index)
            continue
        long_enough = index - last_above >= min_scene_len
        if above:
            last_above = index
        if merge_start is not None:
            if long_enough and not above and last_above - merge_start >= min_scene_len:
                cuts.append(last_above)
                merge_start = None
        elif above and long_enough:
            kept_one = True
            cuts.append(index)
        elif above and kept_one:
            merge_start = index
    return cuts


def video_frames(source: VideoSource, *, max_width: int = ANALYSIS_WIDTH) -> Iterator[np.ndarray]:
    """Decode the first video stream to uint8 RGB frames, scaled down (bilinear) to `max_width` if wider."""
    if isinstance(source, av.container.InputContainer):
        yield from _decode_small(source, max_width=max_width)
        return
    with av.open(os.fspath(source)) as container:
        yield from _decode_small(container, max_width=max_width)


def _decode_small(container: av.container.InputContainer, *, max_width: int) -> Iterator[np.ndarray]:
    if not container.streams.video:
        raise NoVideoStreamError(
            f"{container.name}: no video stream; ftalk prepare takes talking videos, drop the file."
        )
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    size: tuple[int, int] | None = None
    for frame in container.decode(stream):
        if size is None:
            size = analysis_size(frame.width, frame.height, max_width=max_width)
        width, height = size
        yield frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BILINEAR")


def analysis_size(width: int, height: int, *, max_width: int = ANALYSIS_WIDTH) -> tuple[int, int]:
    """The size frames are scored at: scaled down to ``max_width`` when wider (PySceneDetect's rule)."""
    if width < max_width:
        return width, height
    factor = width / max_width
    return max(1, round(width / factor)), max(1, round(height / factor))


def scene_cuts(
    source: VideoSource | Iterable[np.ndarray],
    *,
    threshold: float = DEFAULT_THRESHOLD,
    min_scene_len: int = DEFAULT_MIN_SCENE_LEN,
    luma_only: bool = False,
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS,
) -> list[int]:
    """Frame indices (0-based, in decode order) where a new shot starts; frame 0 is never listed.

    `source` is a video path or open PyAV container (decoded small, see `video_frames`) or an iterable of
    uint8 RGB frames. `luma_only` scores brightness alone (overrides `weights`), as PySceneDetect's option.
    """
    frames = video_frames(source) if isinstance(source, (str, os.PathLike, av.container.InputContainer)) else source
    scores = content_scores(frames, weights=LUMA_ONLY_WEIGHTS if luma_only else weights)
    return cuts_from_scores(scores, threshold=threshold, min_scene_len=min_scene_len)
