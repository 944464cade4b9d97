"""Pure, seeded bucket planning: the aspect-ratio table, the token-length rule, strides, crops and frame windows.

Every function here is a plain function of its arguments: randomness comes from
`numpy.random.default_rng(SeedSequence([seed, epoch, ...]))` built locally, never from global state, so the
plan `ftalk plan-buckets` shows is the plan `ftalk train` uses. The vectorised functions take numpy arrays
of clip facts (width, height, num_frames, fps), so planning a million clips takes seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fantasytalk_cli.config.schema import BucketConfig

ASPECT_RATIO_512: dict[float, tuple[int, int]] = {
    0.25: (256, 1024), 0.26: (256, 992), 0.27: (256, 960), 0.28: (256, 928), 0.32: (288, 896), 0.33: (288, 864),
    0.35: (288, 832), 0.4: (320, 800), 0.42: (320, 768), 0.48: (352, 736), 0.5: (352, 704), 0.52: (352, 672),
    0.57: (384, 672), 0.6: (384, 640), 0.68: (416, 608), 0.72: (416, 576), 0.78: (448, 576), 0.82: (448, 544),
    0.88: (480, 544), 0.94: (480, 512), 1.0: (512, 512), 1.07: (512, 480), 1.13: (544, 480), 1.21: (544, 448),
    1.29: (576, 448), 1.38: (576, 416), 1.46: (608, 416), 1.67: (640, 384), 1.75: (672, 384), 2.0: (704, 352),
    2.09: (736, 352), 2.4: (768, 320), 2.5: (800, 320), 2.89: (832, 288), 3.0: (864, 288), 3.11: (896, 288),
    3.62: (928, 256), 3.75: (960, 256), 3.88: (992, 256), 4.0: (1024, 256),
}  # fmt: skip
"""The reference trainer's 40 aspect-ratio buckets at base 512, `h/w ratio: (height, width)`
(`docs/training.md#aspect-ratio-table`)."""

BASE_SIZE = 512
"""Side the ratio table is written for; buckets are scaled by `size / BASE_SIZE`."""
SIZE_MULTIPLE = 16
"""Bucket sides are floored to multiples of this (VAE stride 8 x patch 2)."""
TEMPORAL_STRIDE = 4
"""VAE time compression: sample frame counts are 4k+1, latent frames (F-1)/4+1."""
HW_ADAPT_STEP = 128
"""Step between `random_hw_adapt` size candidates (the seed's 256, 384, 512, ...)."""

# Stream tags keep the random streams of different decisions independent for the same (seed, epoch).
TAG_SIZE, TAG_ORDER, TAG_FRAMES, TAG_START = 1, 2, 3, 4

DROP_NONE, DROP_TOO_SHORT, DROP_TOO_SMALL, DROP_BAD_FACTS = 0, 1, 2, 3
DROP_REASONS: dict[int, str] = {DROP_TOO_SHORT: "too short", DROP_TOO_SMALL: "too small", DROP_BAD_FACTS: "bad facts"}
"""Why a clip is left out of every epoch (code -> name); leftovers are decided per epoch by the sampler."""


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """A local generator for one decision: `default_rng(SeedSequence([seed, *keys]))`."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *map(int, keys)]))


# ---------------------------------------------------------------------------------------------- sizes


def scale_side(side_at_512: int, size: int) -> int:
    """A table side scaled from base 512 to `size`, floored to a multiple of 16 (exact integer arithmetic)."""
    return max(SIZE_MULTIPLE, side_at_512 * size // (BASE_SIZE * SIZE_MULTIPLE) * SIZE_MULTIPLE)


def bucket_table(size: int, enable_bucket: bool = True) -> dict[float, tuple[int, int]]:
    """`ratio: (height, width)` at sample size `size`; without `enable_bucket` one square bucket."""
    if not enable_bucket:
        side = max(SIZE_MULTIPLE, size // SIZE_MULTIPLE * SIZE_MULTIPLE)
        return {1.0: (side, side)}
    return {ratio: (scale_side(h, size), scale_side(w, size)) for ratio, (h, w) in ASPECT_RATIO_512.items()}


def closest_ratio_index(heights: np.ndarray, widths: np.ndarray, ratios: Sequence[float]) -> np.ndarray:
    """Index into sorted `ratios` of the key closest to h/w (|key - h/w|, ties to the smaller key), vectorised."""
    keys = np.asarray(ratios, dtype=np.float64)
    if keys.size == 1:
        return np.zeros(np.shape(heights), dtype=np.int16)
    r = np.asarray(heights, dtype=np.float64) / np.asarray(widths, dtype=np.float64)
    hi = np.clip(np.searchsorted(keys, r), 1, keys.size - 1)
    lo = hi - 1
    take_hi = np.abs(keys[hi] - r) < np.abs(keys[lo] - r)
    return np.where(take_hi, hi, lo).astype(np.int16)


def size_candidates(cfg: BucketConfig) -> list[int]:
    """Square sample sizes training uses, ascending: `video_sample_size` alone, or with `random_hw_adapt` the
    seed's candidates from 512 (256 with `training_with_video_token_length`) in steps of 128 up to it."""
    top = cfg.video_sample_size
    if not cfg.random_hw_adapt:
        return [top]
    low = 256 if cfg.training_with_video_token_length else 512
    if top <= low:
        return [top]
    sizes = list(range(low, top + 1, HW_ADAPT_STEP))
    if sizes[-1] != top:
        sizes.append(top)
    return sizes


def size_weights(cfg: BucketConfig, sizes: Sequence[int]) -> list[float]:
    """Relative draw weight of each candidate size: uniform with token-length training (the seed draws
    uniformly), else 0.9 for the full size and the rest shared (the seed's downsample-ratio rule)."""
    n = len(sizes)
    if n == 1 or cfg.training_with_video_token_length:
        return [1.0] * n
    return [0.1 / (n - 1)] * (n - 1) + [0.9]


def largest_4k1(x: int) -> int:
    """The largest 4k+1 not above the integer `x` (1 when x < 1)."""
    return max(1, (x - 1) // TEMPORAL_STRIDE * TEMPORAL_STRIDE + 1)


def frames_for_size(size: int, cfg: BucketConfig) -> int:
    """Frames of a sample at square size `size`: `video_sample_n_frames`, or with token-length training the
    largest 4k+1 not above min(n_frames * token_sample_size^2 / size^2, n_frames) (the seed's table: budget
    512*512*49 gives 49 at 512, 21 at 768, 9 at 1024; never above the budget, unlike the reference code)."""
    n = cfg.video_sample_n_frames
    if not cfg.training_with_video_token_length:
        return n
    budget = n * cfg.token_sample_size**2
    return largest_4k1(min(budget // (size * size), n))  # floor(x) keeps the 4k+1 bound exact


def latent_frames(frames: int) -> int:
    """T_lat = (F - 1) / 4 + 1."""
    return (frames - 1) // TEMPORAL_STRIDE + 1


def token_count(height: int, width: int, frames: int) -> int:
    """DiT tokens of one sample: T_lat * (H/16) * (W/16) (512x512x49 -> 13,312; 512x512x81 -> 21,504)."""
    return latent_frames(frames) * (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)


# ---------------------------------------------------------------------------------------------- frames


def effective_stride(fps: np.ndarray | float, base_stride: int, max_fps: float) -> np.ndarray:
    """Frame step per clip: `base_stride`, raised until fps / stride <= max_fps (the reference's rule)."""
    fps_arr = np.asarray(fps, dtype=np.float64)
    needed = np.ceil(fps_arr / max_fps)
    needed = np.where(np.isfinite(needed), needed, base_stride)
    return np.maximum(base_stride, needed).astype(np.int32)


def usable_frames(num_frames: np.ndarray | int, stride: np.ndarray | int) -> np.ndarray:
    """Sampled frames a clip yields at `stride`: (num_frames - 1) // stride + 1 (0 for an empty clip)."""
    n = np.asarray(num_frames, dtype=np.int64)
    return np.where(n > 0, (n - 1) // np.maximum(np.asarray(stride, dtype=np.int64), 1) + 1, 0)


def frame_crop_choices(frames: int) -> list[int]:
    """Frame counts `random_frame_crop` draws from for a bucket of `frames`: every 4k+1 from 5 up to it."""
    return list(range(5, frames + 1, TEMPORAL_STRIDE)) if frames >= 5 else [frames]


def batch_frames(frames: int, seed: int, epoch: int, batch_number: int, random_frame_crop: bool) -> int:
    """Frames of one batch: the bucket's, or with `random_frame_crop` a 4k+1 drawn per (seed, epoch, batch)
    so the batch stays one shape."""
    if not random_frame_crop:
        return frames
    choices = frame_crop_choices(frames)
    return int(choices[rng_for(seed, TAG_FRAMES, epoch, batch_number).integers(len(choices))])


@dataclass(frozen=True)
class ClipWindow:
    """Which frames of a clip one sample uses, and the audio time span that covers exactly them."""

    start_frame: int
    num_frames: int
    stride: int
    fps: float

    @property
    def frame_indices(self) -> list[int]:
        """Source frame indices: start, start + stride, ..."""
        return [self.start_frame + i * self.stride for i in range(self.num_frames)]

    @property
    def audio_start(self) -> float:
        """Seconds: start_frame / fps."""
        return self.start_frame / self.fps

    @property
    def audio_end(self) -> float:
        """Seconds: (start_frame + num_frames * stride) / fps (the whole last frame interval included)."""
        return (self.start_frame + self.num_frames * self.stride) / self.fps


def clip_window(
    num_frames: int,
    fps: float,
    frames: int,
    stride: int,
    *,
    seed: int,
    epoch: int,
    index: int,
    random_start: bool = True,
) -> ClipWindow:
    """The window of `frames` sampled frames (step `stride`) of a clip of `num_frames`: its start drawn per
    (seed, epoch, sample index), or the first frame. Raises ValueError when the clip is too short."""
    span = (frames - 1) * stride + 1
    if span > num_frames:
        raise ValueError(f"a clip of {num_frames} frames cannot give {frames} frames at stride {stride}")
    last_start = num_frames - span
    start = int(rng_for(seed, TAG_START, epoch, index).integers(last_start + 1)) if random_start and last_start else 0
    return ClipWindow(start_frame=start, num_frames=frames, stride=stride, fps=float(fps))


# ---------------------------------------------------------------------------------------------- crops


@dataclass(frozen=True)
class CropBox:
    """Resize a clip to (resize_height, resize_width), then crop (top, left, height, width) from it."""

    resize_height: int
    resize_width: int
    top: int
    left: int
    height: int
    width: int


def cover_crop(src_height: int, src_width: int, height: int, width: int) -> CropBox:
    """Resize-to-cover then centre crop into a (height, width) bucket, as the reference (torchvision Resize to
    the covering size, CenterCrop); integer arithmetic so the resized side never falls short of the bucket."""
    if height * src_width > width * src_height:  # height is the binding side
        rh, rw = height, max(width, src_width * height // src_height)
    else:
        rh, rw = max(height, src_height * width // src_width), width
    top = int(round((rh - height) / 2.0))
    left = int(round((rw - width) / 2.0))
    return CropBox(rh, rw, top, left, height, width)


def crop_waste(src_height: np.ndarray, src_width: np.ndarray, height: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Fraction of each resized clip's pixels the centre crop throws away (vectorised)."""
    sh, sw = np.asarray(src_height, np.float64), np.asarray(src_width, np.float64)
    scale = np.maximum(height / sh, width / sw)
    return 1.0 - (np.asarray(height, np.float64) * width) / (sh * sw * scale * scale)


# ---------------------------------------------------------------------------------------------- assignment


@dataclass(frozen=True)
class LevelGrid:
    """The buckets a config allows: ratio keys x size candidates, with each one's (H, W, frames)."""

    ratios: tuple[float, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    heights: np.ndarray  # [n_ratios, n_sizes]
    widths: np.ndarray  # [n_ratios, n_sizes]
    frames: tuple[int, ...]  # per size

    @property
    def num_buckets(self) -> int:
        return len(self.ratios) * len(self.sizes)

    def bucket_id(self, ratio_index: np.ndarray | int, size_index: np.ndarray | int) -> np.ndarray | int:
        return ratio_index * len(self.sizes) + size_index

    def shape(self, bucket_id: int) -> tuple[int, int, int]:
        """(height, width, frames) of a bucket id."""
        r, s = divmod(int(bucket_id), len(self.sizes))
        return int(self.heights[r, s]), int(self.widths[r, s]), self.frames[s]


def level_grid(cfg: BucketConfig) -> LevelGrid:
    """Every bucket the config can use (ratio table at each candidate size, frames per size)."""
    sizes = size_candidates(cfg)
    tables = [bucket_table(s, cfg.enable_bucket) for s in sizes]
    ratios = tuple(sorted(tables[0]))
    heights = np.array([[tables[j][r][0] for j in range(len(sizes))] for r in ratios], dtype=np.int32)
    widths = np.array([[tables[j][r][1] for j in range(len(sizes))] for r in ratios], dtype=np.int32)
    return LevelGrid(
        ratios=ratios,
        sizes=tuple(sizes),
        weights=tuple(size_weights(cfg, sizes)),
        heights=heights,
        widths=widths,
        frames=tuple(frames_for_size(s, cfg) for s in sizes),
    )


@dataclass(frozen=True)
class Eligibility:
    """Per clip: its ratio bucket, its frame stride, the sizes it may train at (bit mask), why it is dropped."""

    ratio_index: np.ndarray  # int16
    stride: np.ndarray  # int32
    size_mask: np.ndarray  # uint32, bit j = size j allowed
    drop_reason: np.ndarray  # int8, DROP_*


def eligibility(
    width: np.ndarray,
    height: np.ndarray,
    num_frames: np.ndarray,
    fps: np.ndarray,
    cfg: BucketConfig,
    grid: LevelGrid,
    max_upscale: float,
) -> Eligibility:
    """Which buckets each clip can fill. A size is allowed when the clip has enough sampled frames for that
    size's frame count ("too short" otherwise) and covers its bucket without upscaling by more than
    `max_upscale` ("too small" otherwise). Clips with non-positive facts are "bad facts"."""
    w = np.asarray(width, dtype=np.int64)
    h = np.asarray(height, dtype=np.int64)
    n = np.asarray(num_frames, dtype=np.int64)
    f = np.asarray(fps, dtype=np.float64)
    bad = (w <= 0) | (h <= 0) | (n <= 0) | ~(f > 0) | ~np.isfinite(f)
    ratio_index = closest_ratio_index(np.where(bad, 1, h), np.where(bad, 1, w), grid.ratios)
    stride = effective_stride(np.where(bad, 1.0, f), cfg.video_sample_stride, cfg.max_fps_after_stride)
    usable = usable_frames(n, stride)
    mask = np.zeros(w.shape, dtype=np.uint32)
    any_frames = np.zeros(w.shape, dtype=bool)
    any_size = np.zeros(w.shape, dtype=bool)
    for j, frames in enumerate(grid.frames):
        bh = grid.heights[ratio_index, j]
        bw = grid.widths[ratio_index, j]
        frames_ok = usable >= frames
        size_ok = (bh <= max_upscale * h) & (bw <= max_upscale * w)
        any_frames |= frames_ok
        any_size |= size_ok
        mask |= np.where(frames_ok & size_ok, np.uint32(1 << j), np.uint32(0))
    reason = np.full(w.shape, DROP_NONE, dtype=np.int8)
    reason[mask == 0] = DROP_TOO_SHORT  # also: big enough only at sizes it is too short for
    reason[(mask == 0) & any_frames & ~any_size] = DROP_TOO_SMALL
    reason[bad] = DROP_BAD_FACTS
    mask[bad] = 0
    return Eligibility(ratio_index=ratio_index, stride=stride, size_mask=mask, drop_reason=reason)


def assign_buckets(elig: Eligibility, grid: LevelGrid, seed: int, epoch: int) -> np.ndarray:
    """Bucket id of every clip for one epoch (-1 = dropped). With one candidate size this is the same every
    epoch; with `random_hw_adapt` each clip draws one of its allowed sizes per (seed, epoch), weighted by
    `grid.weights` (a pure function: train and plan-buckets compute the same ids)."""
    n_sizes = len(grid.sizes)
    mask = elig.size_mask
    if n_sizes == 1:
        size_index = np.zeros(mask.shape, dtype=np.int32)
    else:
        weights = np.asarray(grid.weights, dtype=np.float64)
        total = np.zeros(mask.shape, dtype=np.float64)
        for j in range(n_sizes):
            total += np.where(mask & np.uint32(1 << j), weights[j], 0.0)
        u = rng_for(seed, TAG_SIZE, epoch).random(mask.shape[0]) * total
        size_index = np.full(mask.shape, -1, dtype=np.int32)
        acc = np.zeros(mask.shape, dtype=np.float64)
        for j in range(n_sizes):
            allowed = (mask & np.uint32(1 << j)) != 0
            acc += np.where(allowed, weights[j], 0.0)
            size_index = np.where((size_index < 0) & allowed & (u < acc), j, size_index)
        # float round-off at the top end: take the largest allowed size
        for j in range(n_sizes):
            size_index = np.where((size_index < 0) & ((mask & np.uint32(1 << j)) != 0), j, size_index)
    ids = elig.ratio_index.astype(np.int32) * n_sizes + size_index
    return np.where(mask != 0, ids, -1).astype(np.int32)


def min_training_size(cfg: BucketConfig) -> int:
    """The smallest square sample size the config trains at (for checks such as "video too small")."""
    return size_candidates(cfg)[0]


def min_frames_needed(cfg: BucketConfig) -> int:
    """The fewest sampled frames any sample of the config needs (for checks such as "too few frames")."""
    return min(frames_for_size(s, cfg) for s in size_candidates(cfg))


def budget_tokens(cfg: BucketConfig) -> int:
    """Tokens of the reference sample the budget describes: n_frames at token_sample_size (or the full size)."""
    side = cfg.token_sample_size if cfg.training_with_video_token_length else cfg.video_sample_size
    side = side // SIZE_MULTIPLE * SIZE_MULTIPLE
    return token_count(side, side, cfg.video_sample_n_frames)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0
