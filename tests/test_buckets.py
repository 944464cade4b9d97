"""Pure bucket planning: the reference's table, the seed's token-length numbers, strides, crops, windows."""

from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fantasytalk_cli.config.schema import BucketConfig
from fantasytalk_cli.data.buckets import (
    ASPECT_RATIO_512,
    DROP_BAD_FACTS,
    DROP_NONE,
    DROP_TOO_SHORT,
    DROP_TOO_SMALL,
    assign_buckets,
    batch_frames,
    bucket_table,
    clip_window,
    closest_ratio_index,
    cover_crop,
    effective_stride,
    eligibility,
    frame_crop_choices,
    frames_for_size,
    latent_frames,
    level_grid,
    size_candidates,
    token_count,
    usable_frames,
)

# docs/training.md#aspect-ratio-table, verbatim: the reference trainer's table at base 512 as `ratio: HxW`.
REFERENCE_TABLE = (
    "0.25: 256x1024, 0.26: 256x992, 0.27: 256x960, 0.28: 256x928, 0.32: 288x896, 0.33: 288x864, 0.35: 288x832, "
    "0.4: 320x800, 0.42: 320x768, 0.48: 352x736, 0.5: 352x704, 0.52: 352x672, 0.57: 384x672, 0.6: 384x640, "
    "0.68: 416x608, 0.72: 416x576, 0.78: 448x576, 0.82: 448x544, 0.88: 480x544, 0.94: 480x512, 1.0: 512x512, "
    "1.07: 512x480, 1.13: 544x480, 1.21: 544x448, 1.29: 576x448, 1.38: 576x416, 1.46: 608x416, 1.67: 640x384, "
    "1.75: 672x384, 2.0: 704x352, 2.09: 736x352, 2.4: 768x320, 2.5: 800x320, 2.89: 832x288, 3.0: 864x288, "
    "3.11: 896x288, 3.62: 928x256, 3.75: 960x256, 3.88: 992x256, 4.0: 1024x256"
)


def _parse_table(text: str) -> dict[float, tuple[int, int]]:
    return {float(r): (int(h), int(w)) for r, h, w in re.findall(r"(\d+(?:\.\d+)?): (\d+)x(\d+)", text)}


def token_cfg(**kw: object) -> BucketConfig:
    base = dict(token_sample_size=512, video_sample_n_frames=49, training_with_video_token_length=True)
    base.update(kw)
    return BucketConfig(**base)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- table


def test_table_equals_reference() -> None:
    expected = _parse_table(REFERENCE_TABLE)
    assert len(expected) == 40
    assert expected == ASPECT_RATIO_512
    assert bucket_table(512) == expected


@pytest.mark.parametrize("size", [256, 384, 512, 640, 720, 768, 1024, 1280])
def test_scaled_tables_are_floored_multiples_of_16(size: int) -> None:
    table = bucket_table(size)
    assert list(table) == list(ASPECT_RATIO_512)
    for ratio, (h, w) in table.items():
        h512, w512 = ASPECT_RATIO_512[ratio]
        assert h % 16 == 0 and w % 16 == 0
        assert h == int(h512 / 512 * size / 16) * 16 and w == int(w512 / 512 * size / 16) * 16


def test_no_bucket_means_one_square() -> None:
    assert bucket_table(512, enable_bucket=False) == {1.0: (512, 512)}
    assert bucket_table(520, enable_bucket=False) == {1.0: (512, 512)}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4000), st.integers(1, 4000))
def test_closest_ratio_matches_brute_force(h: int, w: int) -> None:
    keys = sorted(ASPECT_RATIO_512)
    brute = min(keys, key=lambda k: abs(k - h / w))  # first (smallest) key on ties, as the reference's min()
    got = closest_ratio_index(np.array([h]), np.array([w]), keys)
    assert keys[int(got[0])] == brute


# ---------------------------------------------------------------------------------------------- tokens


def test_seed_token_numbers() -> None:
    assert token_count(512, 512, 49) == 13_312
    assert token_count(512, 512, 81) == 21_504
    assert latent_frames(81) == 21 and latent_frames(49) == 13 and latent_frames(1) == 1


def test_seed_token_length_table() -> None:
    cfg = token_cfg()
    assert frames_for_size(512, cfg) == 49
    assert frames_for_size(768, cfg) == 21
    assert frames_for_size(1024, cfg) == 9  # the reference code's x // 4 * 4 + 1 would give 13


def test_without_token_length_every_size_gets_n_frames() -> None:
    cfg = BucketConfig(video_sample_n_frames=81)
    assert frames_for_size(256, cfg) == frames_for_size(1024, cfg) == 81


@settings(max_examples=80, deadline=None)
@given(st.integers(16, 2048), st.integers(1, 60), st.integers(16, 1024))
def test_token_length_never_exceeds_budget(size: int, k: int, token_size: int) -> None:
    n = 4 * k + 1
    cfg = token_cfg(video_sample_n_frames=n, token_sample_size=token_size)
    frames = frames_for_size(size, cfg)
    budget = n * token_size**2
    x = min(budget / size**2, n)
    assert (frames - 1) % 4 == 0 and frames <= n
    if x >= 1:
        assert frames <= x and frames + 4 > x  # the largest 4k+1 not above x
        assert frames * size * size <= budget


def test_size_candidates() -> None:
    assert size_candidates(BucketConfig(video_sample_size=512)) == [512]
    hw = dict(random_hw_adapt=True, video_sample_size=1024)
    assert size_candidates(BucketConfig(**hw)) == [512, 640, 768, 896, 1024]
    assert size_candidates(BucketConfig(**hw, training_with_video_token_length=True)) == [
        256, 384, 512, 640, 768, 896, 1024,
    ]  # fmt: skip
    assert size_candidates(BucketConfig(random_hw_adapt=True, video_sample_size=720)) == [512, 640, 720]
    assert size_candidates(BucketConfig(random_hw_adapt=True, video_sample_size=256)) == [256]


# ---------------------------------------------------------------------------------------------- frames


def test_stride_raised_until_fps_fits() -> None:
    fps = np.array([25.0, 30.0, 30.01, 60.0, 90.0, 120.0])
    assert effective_stride(fps, 1, 30.0).tolist() == [1, 1, 2, 2, 3, 4]
    assert effective_stride(fps, 2, 30.0).tolist() == [2, 2, 2, 2, 3, 4]
    assert effective_stride(np.array([50.0]), 1, 25.0).tolist() == [2]


def test_usable_frames() -> None:
    assert usable_frames(np.array([81, 80, 161, 1, 0]), np.array([1, 1, 2, 3, 1])).tolist() == [81, 80, 81, 1, 0]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 400),
    st.sampled_from([23.0, 24.0, 25.0, 29.97, 30.0, 60.0]),
    st.integers(0, 20),
    st.integers(1, 3),
    st.integers(0, 10**6),
    st.integers(0, 50),
)
def test_clip_window_covers_frames_and_aligned_audio(
    n: int, fps: float, k: int, stride: int, seed: int, epoch: int
) -> None:
    frames = 4 * k + 1
    if (frames - 1) * stride + 1 > n:
        with pytest.raises(ValueError):
            clip_window(n, fps, frames, stride, seed=seed, epoch=epoch, index=3)
        return
    win = clip_window(n, fps, frames, stride, seed=seed, epoch=epoch, index=3)
    idx = win.frame_indices
    assert len(idx) == frames and idx[0] >= 0 and idx[-1] <= n - 1
    assert all(b - a == stride for a, b in zip(idx, idx[1:], strict=False))
    assert win.audio_start == pytest.approx(win.start_frame / fps)
    assert win.audio_end == pytest.approx((win.start_frame + frames * stride) / fps)
    assert win == clip_window(n, fps, frames, stride, seed=seed, epoch=epoch, index=3)  # deterministic


def test_clip_window_start_varies_with_epoch_and_index() -> None:
    starts = {clip_window(400, 25.0, 49, 1, seed=1, epoch=e, index=0).start_frame for e in range(20)}
    assert len(starts) > 5
    starts = {clip_window(400, 25.0, 49, 1, seed=1, epoch=0, index=i).start_frame for i in range(20)}
    assert len(starts) > 5
    assert clip_window(400, 25.0, 49, 1, seed=1, epoch=0, index=0, random_start=False).start_frame == 0


def test_frame_crop_choices_and_batch_frames() -> None:
    assert frame_crop_choices(21) == [5, 9, 13, 17, 21]
    assert frame_crop_choices(1) == [1]
    assert batch_frames(81, 0, 0, 0, random_frame_crop=False) == 81
    drawn = [batch_frames(81, 7, 2, b, random_frame_crop=True) for b in range(200)]
    assert set(drawn) <= set(frame_crop_choices(81)) and len(set(drawn)) > 5
    assert drawn == [batch_frames(81, 7, 2, b, random_frame_crop=True) for b in range(200)]


# ---------------------------------------------------------------------------------------------- crops


def test_cover_crop_examples() -> None:
    # a 720p landscape clip into the 1.0 bucket: height binds, width cropped in the middle
    box = cover_crop(720, 1280, 512, 512)
    assert (box.resize_height, box.resize_width) == (512, 910)
    assert (box.top, box.left, box.height, box.width) == (0, 199, 512, 512)
    # exact aspect: no crop, no float round-down below the bucket
    box = cover_crop(1080, 1080, 512, 512)
    assert (box.resize_height, box.resize_width, box.top, box.left) == (512, 512, 0, 0)


@settings(max_examples=100, deadline=None)
@given(st.integers(16, 4000), st.integers(16, 4000), st.integers(1, 80), st.integers(1, 80))
def test_cover_crop_covers_and_centres(sh: int, sw: int, bh16: int, bw16: int) -> None:
    bh, bw = bh16 * 16, bw16 * 16
    box = cover_crop(sh, sw, bh, bw)
    assert box.resize_height >= bh and box.resize_width >= bw
    assert box.resize_height == bh or box.resize_width == bw
    assert 0 <= box.top <= box.resize_height - bh and 0 <= box.left <= box.resize_width - bw
    assert abs(box.top - (box.resize_height - bh) / 2) <= 0.5 and abs(box.left - (box.resize_width - bw) / 2) <= 0.5
    # aspect preserved to within one pixel of rounding
    assert abs(box.resize_height * sw - box.resize_width * sh) <= max(sh, sw)


# ---------------------------------------------------------------------------------------------- assignment


def _facts(rows: list[tuple[int, int, int, float]]) -> tuple[np.ndarray, ...]:
    arr = np.array(rows, dtype=np.float64)
    return arr[:, 0].astype(int), arr[:, 1].astype(int), arr[:, 2].astype(int), arr[:, 3]


def test_drop_reasons() -> None:
    cfg = BucketConfig(video_sample_size=512, video_sample_n_frames=49, enable_bucket=True)
    grid = level_grid(cfg)
    w, h, n, fps = _facts(
        [
            (512, 512, 100, 25.0),  # fine
            (512, 512, 48, 25.0),  # too short
            (512, 512, 120, 60.0),  # stride 2 -> 60 usable: fine
            (512, 512, 90, 60.0),  # stride 2 -> 45 usable: too short
            (200, 200, 100, 25.0),  # too small (needs 2.56x)
            (420, 420, 100, 25.0),  # 1.22x upscale: allowed
            (0, 512, 100, 25.0),  # bad facts
            (512, 512, 100, 0.0),  # bad facts
        ]
    )
    elig = eligibility(w, h, n, fps, cfg, grid, cfg.max_upscale)
    assert elig.drop_reason.tolist() == [
        DROP_NONE, DROP_TOO_SHORT, DROP_NONE, DROP_TOO_SHORT, DROP_TOO_SMALL, DROP_NONE, DROP_BAD_FACTS, DROP_BAD_FACTS,
    ]  # fmt: skip
    assert elig.stride.tolist()[:4] == [1, 1, 2, 2]


def test_random_sizes_respect_eligibility_and_are_seeded() -> None:
    cfg = BucketConfig(
        video_sample_size=1024,
        video_sample_n_frames=49,
        enable_bucket=True,
        random_hw_adapt=True,
        training_with_video_token_length=True,
    )
    grid = level_grid(cfg)
    rng = np.random.default_rng(0)
    m = 2000
    w = rng.integers(200, 2000, m)
    h = rng.integers(200, 2000, m)
    n = rng.integers(5, 200, m)
    fps = rng.choice([25.0, 30.0, 60.0], m)
    elig = eligibility(w, h, n, fps, cfg, grid, cfg.max_upscale)
    a0 = assign_buckets(elig, grid, seed=5, epoch=0)
    assert np.array_equal(a0, assign_buckets(elig, grid, seed=5, epoch=0))
    assert not np.array_equal(a0, assign_buckets(elig, grid, seed=5, epoch=1))
    assert not np.array_equal(a0, assign_buckets(elig, grid, seed=6, epoch=0))
    kept = a0 >= 0
    assert np.array_equal(kept, elig.size_mask != 0)
    ratio, size = np.divmod(a0[kept], len(grid.sizes))
    assert np.array_equal(ratio, elig.ratio_index[kept])
    assert np.all((elig.size_mask[kept] >> size.astype(np.uint32)) & 1)
    usable = usable_frames(n[kept], elig.stride[kept])
    assert np.all(usable >= np.array(grid.frames)[size])
    assert len(np.unique(size)) == len(grid.sizes)  # every size is drawn somewhere
