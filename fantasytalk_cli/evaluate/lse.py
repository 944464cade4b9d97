"""LSE-D and LSE-C lip-sync scores as the standard SyncNet evaluation (joonson/syncnet_python) computes them.

`sync_score` is the reference's `SyncNetInstance.evaluate` on 224x224 BGR face crops at 25 fps and 16 kHz mono
audio: for each 5-frame window, the lip embedding of the frames and the audio embedding of the 20 MFCC frames
(0.2 s) starting at the same time; distances between each video window and the audio windows `-vshift..vshift`
frames around it, averaged over the clip; `distance` (LSE-D) is the smallest mean distance, `confidence` (LSE-C)
the median minus that smallest, `offset` the shift where it lies.

Offset sign (the reference's `vshift - argmin`): video window `i` matches audio window `i - offset` best. A positive
offset means the audio leads the video (the sound comes `offset` frames before the mouth moves); a negative one that
the audio lags. Delaying a synced clip's audio by `k` frames gives offset `-k`.

`lse_of_clip` goes from a decoded clip to the score: `to_25fps`, `face_crops`, `to_16k_mono`, `sync_score`. Where
it differs from the reference pipeline (S3FD face tracks, ffmpeg, XVID then JPEG round trips), the function says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Protocol

import numpy as np
import soxr
import torch
import torch.nn.functional as F

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.prepare.faces import FaceDetector

VIDEO_FPS = 25
AUDIO_RATE = 16000
SAMPLES_PER_FRAME = AUDIO_RATE // VIDEO_FPS
"""640 audio samples per video frame, the reference's `len(audio) / 640`."""
WINDOW = 5
"""Video frames per SyncNet window (0.2 s)."""
MFCC_PER_FRAME = 4
"""MFCC frames (10 ms steps) per video frame (40 ms); a window is `WINDOW * MFCC_PER_FRAME` = 20 of them."""
CROP_SIZE = 224
CROP_SCALE = 0.4
"""The reference pipeline's `crop_scale`: how far the crop reaches beyond the face box."""
PAD_VALUE = 110
"""Grey the reference pads frames with before cropping (the same in RGB and BGR)."""
BOX_MEDIAN = 13
"""Frames in the median that smooths the face box's size and centre (the reference's `medfilt(..., 13)`)."""
_INT16_SCALE = 32768.0


class LseError(FtalkError):
    """A clip cannot be scored: too short, no face, or audio/video of a shape the score cannot use."""


class NoFaceError(LseError):
    """No frame of the clip has a face: callers count such clips rather than score them."""


class SyncEmbedder(Protocol):
    """What `sync_score` needs of a network: SyncNet's two branches."""

    def forward_lip(self, frames: torch.Tensor) -> torch.Tensor: ...

    def forward_aud(self, mfcc: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SyncScore:
    """One clip's SyncNet scores: `distance` is LSE-D (lower is better), `confidence` LSE-C (higher is better),
    `offset` the audio-video shift in 25 fps frames at the best distance (see the module docstring for its sign)."""

    offset: int
    distance: float
    confidence: float


# ---------------------------------------------------------------- MFCC


def _round_half_up(value: float) -> int:
    """Round as python_speech_features rounds frame lengths (decimal half-up, not banker's rounding)."""
    return int(Decimal(value).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def _mel_filters(num_filters: int, nfft: int, sample_rate: int) -> np.ndarray:
    """(num_filters, nfft // 2 + 1) triangular filters from 0 Hz to Nyquist, their edges snapped to FFT bins."""
    mels = np.linspace(_hz_to_mel(np.float64(0.0)), _hz_to_mel(np.float64(sample_rate / 2)), num_filters + 2)
    edges = np.floor((nfft + 1) * _mel_to_hz(mels) / sample_rate)
    bins = np.arange(nfft // 2 + 1, dtype=np.float64)
    filters = np.zeros((num_filters, nfft // 2 + 1))
    for j in range(num_filters):
        low, mid, high = edges[j], edges[j + 1], edges[j + 2]
        rising = (bins >= low) & (bins < mid)
        falling = (bins >= mid) & (bins < high)
        filters[j, rising] = (bins[rising] - low) / (mid - low)
        filters[j, falling] = (high - bins[falling]) / (high - mid)
    return filters


def _dct_matrix(size: int, count: int) -> np.ndarray:
    """(size, count) orthonormal DCT-II: `x @ m` gives the first `count` coefficients of each row of `x`."""
    n = np.arange(size)[:, None]
    k = np.arange(count)[None, :]
    m = np.cos(np.pi * k * (2 * n + 1) / (2 * size)) * np.sqrt(2.0 / size)
    m[:, 0] = np.sqrt(1.0 / size)
    return m


def mfcc(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(frames, 13) MFCCs of a mono signal, equal to `python_speech_features.mfcc(audio, sample_rate)` with its
    defaults: pre-emphasis 0.97, 25 ms rectangular frames every 10 ms (the last zero-padded), 512-point power
    spectrum, 26 mel filters, log, orthonormal DCT-II, lifter 22, coefficient 0 replaced by the log frame energy.
    Values are taken as given (the reference feeds int16 sample values, not [-1, 1] floats)."""
    signal = np.asarray(audio, dtype=np.float64)
    if signal.ndim != 1 or len(signal) == 0:
        raise LseError(f"mfcc() takes a non-empty mono signal of shape (samples,), not {signal.shape}")
    nfft, num_filters, num_ceps, lifter = 512, 26, 13, 22
    emphasised = np.concatenate([signal[:1], signal[1:] - 0.97 * signal[:-1]])
    frame_len, step = _round_half_up(0.025 * sample_rate), _round_half_up(0.01 * sample_rate)
    count = 1 if len(signal) <= frame_len else 1 + math.ceil((len(signal) - frame_len) / step)
    padded = np.zeros((count - 1) * step + frame_len)
    padded[: len(emphasised)] = emphasised
    frames = np.lib.stride_tricks.sliding_window_view(padded, frame_len)[::step]
    power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
    tiny = np.finfo(np.float64).eps
    energy = power.sum(axis=1)
    energy[energy == 0] = tiny
    bands = power @ _mel_filters(num_filters, nfft, sample_rate).T
    bands[bands == 0] = tiny
    ceps = np.log(bands) @ _dct_matrix(num_filters, num_ceps)
    ceps *= 1.0 + (lifter / 2.0) * np.sin(np.pi * np.arange(num_ceps) / lifter)
    ceps[:, 0] = np.log(energy)
    return ceps


# ---------------------------------------------------------------- scores


def _int16_scale(audio: np.ndarray) -> np.ndarray:
    """The audio as the reference reads it from its 16-bit wav: int16 values as they are, float audio in [-1, 1]
    quantised as ffmpeg writes pcm_s16le (x * 32768, rounded, clipped)."""
    if audio.ndim != 1:
        raise LseError(f"the audio to score must be mono of shape (samples,), not {audio.shape}: use to_16k_mono()")
    if audio.dtype == np.int16:
        return audio.astype(np.float64)
    if not np.issubdtype(audio.dtype, np.floating):
        raise LseError(f"the audio to score must be int16 or float in [-1, 1], not {audio.dtype}")
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak > 1.0 + 1e-6:
        raise LseError(f"float audio must lie in [-1, 1] (peak {peak:.3g}); pass int16 samples as int16")
    return np.clip(np.round(audio.astype(np.float64) * _INT16_SCALE), -_INT16_SCALE, _INT16_SCALE - 1)


def _embed(
    net: SyncEmbedder, crops: np.ndarray, ceps: torch.Tensor, windows: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lip and audio embeddings of the first `windows` windows, `batch_size` windows per forward pass: lips
    (N, 3, 5, 224, 224) from frames v..v+4, audio (N, 1, 13, 20) from MFCC frames 4v..4v+19 of `ceps`
    (1, 13, frames)."""
    lip_parts, aud_parts = [], []
    for start in range(0, windows, batch_size):
        stop = min(windows, start + batch_size)
        # (frames, H, W, C) uint8 -> (C, frames, H, W) float, then one (C, 5, H, W) slice per window
        clip = torch.from_numpy(np.ascontiguousarray(crops[start : stop + WINDOW - 1])).permute(3, 0, 1, 2).float()
        lips = torch.stack([clip[:, v : v + WINDOW] for v in range(stop - start)])
        auds = torch.stack([ceps[:, :, v * MFCC_PER_FRAME : (v + WINDOW) * MFCC_PER_FRAME] for v in range(start, stop)])
        lip_parts.append(net.forward_lip(lips))
        aud_parts.append(net.forward_aud(auds))
    return torch.cat(lip_parts), torch.cat(aud_parts)


def _mean_distances(lip: torch.Tensor, aud: torch.Tensor, vshift: int) -> torch.Tensor:
    """(2 * vshift + 1,) mean over windows `i` of |lip[i] - aud[i + j - vshift]| (zero vectors beyond the ends, as
    the reference pads), with torch's pairwise-distance epsilon."""
    padded = F.pad(aud, (0, 0, vshift, vshift))
    shifts = torch.arange(2 * vshift + 1)
    total = torch.zeros(2 * vshift + 1)
    for start in range(0, len(lip), 256):  # chunks bound the (rows, shifts, 1024) intermediate
        rows = torch.arange(start, min(len(lip), start + 256))
        candidates = padded[rows[:, None] + shifts[None, :]]
        total += F.pairwise_distance(lip[rows][:, None, :].expand_as(candidates), candidates).sum(dim=0)
    return total / len(lip)


def sync_score(
    net: SyncEmbedder,
    crops_bgr: np.ndarray,
    audio_16k: np.ndarray,
    *,
    vshift: int = 15,
    batch_size: int = 20,
) -> SyncScore:
    """LSE-D / LSE-C of (T, 224, 224, 3) uint8 BGR face crops at 25 fps and mono 16 kHz audio (int16, or float in
    [-1, 1]), computed as the reference's `evaluate`: `min(T, len(audio) // 640)` frames are used, windows start
    at frames `0 .. that - 6`, on the CPU in float32 without gradients."""
    if crops_bgr.ndim != 4 or crops_bgr.shape[3] != 3 or crops_bgr.dtype != np.uint8:
        raise LseError(f"crops must be (frames, 224, 224, 3) uint8 BGR, not {crops_bgr.dtype} {crops_bgr.shape}")
    samples = _int16_scale(np.asarray(audio_16k))
    frames = min(len(crops_bgr), len(samples) // SAMPLES_PER_FRAME)
    windows = frames - WINDOW
    if windows < 1:
        raise LseError(
            f"the clip is too short to score: {len(crops_bgr)} frames and {len(samples)} audio samples give "
            f"{frames} usable frames at 25 fps / 16 kHz; SyncNet needs at least {WINDOW + 1} (0.24 s) of both"
        )
    ceps = torch.from_numpy(mfcc(samples, AUDIO_RATE).T.copy()).float()[None]  # (1, 13, MFCC frames)
    with torch.no_grad():
        lip, aud = _embed(net, crops_bgr, ceps, windows, batch_size)
        mean = _mean_distances(lip.float(), aud.float(), vshift)
        best, where = torch.min(mean, 0)
        confidence = torch.median(mean) - best
    return SyncScore(offset=vshift - int(where), distance=float(best), confidence=float(confidence))


# ---------------------------------------------------------------- clip preparation


def to_25fps(frames: np.ndarray, fps: float) -> np.ndarray:
    """The frames resampled to 25 fps by taking, for each output time n / 25 s, the nearest input frame (frames
    are repeated or dropped, as the reference's `ffmpeg -r 25` does; ffmpeg's exact tie-breaking may differ by a
    frame at some boundaries). `round(len(frames) * 25 / fps)` frames come back."""
    if fps <= 0:
        raise LseError(f"fps must be positive to resample to 25 fps, got {fps}")
    if abs(fps - VIDEO_FPS) < 1e-6:
        return frames
    count = max(1, round(len(frames) * VIDEO_FPS / fps))
    picks = np.minimum(np.floor(np.arange(count) * fps / VIDEO_FPS + 0.5).astype(np.int64), len(frames) - 1)
    return frames[picks]


def to_16k_mono(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """float32 mono 16 kHz audio in [-1, 1] from (samples,) or (samples, channels) audio, int16 or float:
    channels averaged (ffmpeg's `-ac 1`), resampled with soxr (the reference uses ffmpeg's resampler; both are
    band-limited, the samples differ slightly)."""
    signal = np.asarray(audio)
    if signal.dtype == np.int16:
        signal = signal.astype(np.float32) / np.float32(_INT16_SCALE)
    signal = signal.astype(np.float32)
    if signal.ndim == 2:
        signal = signal.mean(axis=1)
    if signal.ndim != 1:
        raise LseError(f"audio must be (samples,) or (samples, channels), not {signal.shape}")
    if sample_rate != AUDIO_RATE:
        signal = soxr.resample(signal, sample_rate, AUDIO_RATE, quality="HQ").astype(np.float32)
    return np.clip(signal, -1.0, 1.0)


def _median_smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Running median over `width` frames; the window shrinks at the ends (the reference's scipy `medfilt` pads
    with zeros instead, which pulls the first and last 6 values toward the smallest nearby)."""
    half = width // 2
    return np.array([np.median(values[max(0, i - half) : i + half + 1]) for i in range(len(values))])


def _nearest_boxes(boxes: list[tuple[float, float, float, float] | None]) -> np.ndarray:
    """(T, 4) boxes where each frame without one takes the nearest frame's (the earlier one on a tie)."""
    found = np.array([i for i, box in enumerate(boxes) if box is not None])
    nearest = found[np.abs(np.arange(len(boxes))[:, None] - found[None, :]).argmin(axis=1)]
    return np.array([boxes[i] for i in nearest], dtype=np.float64)


def _window(frame: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """frame[y0:y1, x0:x1] where the frame is surrounded by `PAD_VALUE` grey (coordinates may fall outside)."""
    out = np.full((y1 - y0, x1 - x0, frame.shape[2]), PAD_VALUE, dtype=frame.dtype)
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y1, frame.shape[0]), min(x1, frame.shape[1])
    if bottom > top and right > left:
        out[top - y0 : bottom - y0, left - x0 : right - x0] = frame[top:bottom, left:right]
    return out


def _axis_weights(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR's sampling along one axis: pixel centres aligned (`(d + 0.5) * src / dst - 0.5`), clamped
    at the edges; the two source indices and the weight of the second."""
    pos = (np.arange(dst) + 0.5) * (src / dst) - 0.5
    low = np.floor(pos)
    frac = pos - low
    frac[low < 0] = 0.0
    low = np.clip(low, 0, src - 1).astype(np.int64)
    frac[low >= src - 1] = 0.0
    return low, np.minimum(low + 1, src - 1), frac


def resize_bilinear(image: np.ndarray, size: int) -> np.ndarray:
    """(size, size, C) uint8 bilinear resize as `cv2.resize(image, (size, size))` computes it: centre-aligned
    sampling without anti-aliasing, 11-bit fixed-point weights, and cv2's vectorised rounding of the vertical pass.
    Equal to cv2 when shrinking (the crops' usual case); a few pixels may differ by 1 when enlarging."""
    scale = 1 << 11
    y0, y1, fy = _axis_weights(image.shape[0], size)
    x0, x1, fx = _axis_weights(image.shape[1], size)
    wy = np.round(fy * scale).astype(np.int64)[:, None, None]
    wx = np.round(fx * scale).astype(np.int64)[None, :, None]
    src = image.astype(np.int64)
    rows = src[:, x0] * (scale - wx) + src[:, x1] * wx
    out = ((((scale - wy) * (rows[y0] >> 4)) >> 16) + ((wy * (rows[y1] >> 4)) >> 16) + 2) >> 2
    return np.clip(out, 0, 255).astype(np.uint8)


def face_crops(frames_rgb: np.ndarray, detector: FaceDetector) -> tuple[np.ndarray, int]:
    """(T, 224, 224, 3) uint8 BGR face crops of (T, H, W, 3) RGB frames, as the reference pipeline crops, and the
    number of frames in which the detector found no face.

    Per frame the detector's best face is taken (a frame without one borrows the nearest frame's box, as the
    reference interpolates its tracks); the box's half-size (half its longer side) and centre are median-smoothed
    over 13 frames; the crop runs from one half-size above the centre to 1.8 below and 1.4 either side (`crop_scale`
    0.4), on a frame padded with grey 110, and is resized to 224x224 bilinearly and flipped to BGR.

    Differences from the reference: it finds faces with S3FD and links them into tracks (one per face, scene cuts
    split them), here it is the `ftalk prepare` detector (BlazeFace full-range, whose boxes reach the hairline
    where S3FD's stop near the brow, so the crop sits a little higher on the face) on every frame, one face; it
    writes the crops through XVID and JPEG, here they stay exact. Raises `NoFaceError` if no frame has a face."""
    if frames_rgb.ndim != 4 or frames_rgb.shape[3] != 3 or frames_rgb.dtype != np.uint8:
        raise LseError(f"frames must be (T, H, W, 3) uint8 RGB, not {frames_rgb.dtype} {frames_rgb.shape}")
    found: list[tuple[float, float, float, float] | None] = []
    for frame in frames_rgb:
        faces = detector.detect(frame)
        found.append(faces[0].box if faces else None)
    missing = sum(box is None for box in found)
    if missing == len(found):
        raise NoFaceError(f"no face found in any of the clip's {len(found)} frames: it cannot be scored for lip sync")
    boxes = _nearest_boxes(found)
    half = _median_smooth(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 2, BOX_MEDIAN)
    cx = _median_smooth((boxes[:, 0] + boxes[:, 2]) / 2, BOX_MEDIAN)
    cy = _median_smooth((boxes[:, 1] + boxes[:, 3]) / 2, BOX_MEDIAN)
    crops = np.empty((len(frames_rgb), CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8)
    for i, frame in enumerate(frames_rgb):
        bs = half[i]
        pad = int(bs * (1 + 2 * CROP_SCALE))  # the reference pads by this much, then crops in padded coordinates
        my, mx = cy[i] + pad, cx[i] + pad
        top, bottom = int(my - bs), int(my + bs * (1 + 2 * CROP_SCALE))
        left, right = int(mx - bs * (1 + CROP_SCALE)), int(mx + bs * (1 + CROP_SCALE))
        window = _window(frame, top - pad, bottom - pad, left - pad, right - pad)
        crops[i] = resize_bilinear(window, CROP_SIZE)[:, :, ::-1]
    return crops, missing


def lse_of_clip(
    net: SyncEmbedder,
    frames_rgb: np.ndarray,
    fps: float,
    audio: np.ndarray,
    sample_rate: int,
    detector: FaceDetector,
    vshift: int = 15,
) -> SyncScore:
    """LSE-D / LSE-C of a decoded clip: (T, H, W, 3) uint8 RGB frames at `fps` and its audio ((samples,) or
    (samples, channels), int16 or float) at `sample_rate`; resampled to 25 fps and 16 kHz mono, faces cropped with
    `detector`, then `sync_score`."""
    crops, _ = face_crops(to_25fps(frames_rgb, fps), detector)
    return sync_score(net, crops, to_16k_mono(audio, sample_rate), vshift=vshift)
