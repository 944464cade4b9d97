"""Sampled videos on disk: `write_mp4` turns RGB frames (and a speech file) into an H.264 + AAC mp4, written
atomically; `read_mp4` decodes one back with the stream facts tests and users check; `frame_strip` saves a PNG of
evenly spaced frames (the README's still-frame strip). PyAV only: no ffmpeg binary is needed.

The audio track is cut (or padded with silence) so it lasts exactly as long as the video, F / fps: a sample
that plays past the last frame would otherwise show a frozen face talking on.
"""

from __future__ import annotations

import io
import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile as sf
import soxr
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc
from PIL import Image

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import atomic_file

AAC_RATES: frozenset[int] = frozenset(
    {96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350}
)
"""Sample rates AAC can carry; an audio file at any other rate is resampled to 44100 (its multiples' family) or
48000."""

_MAX_FPS_DENOMINATOR = 1001
"""`fps` is read as the nearest fraction with at most this denominator: 23 -> 23/1, 29.97002997 -> 30000/1001."""

_AUDIO_BIT_RATE = {1: 128_000, 2: 192_000}
"""AAC bit rate per channel count: transparent for speech, small beside the video."""


class VideoWriteError(FtalkError):
    """An mp4 or a frame strip cannot be written from these inputs (the message names the file and the fix)."""


class VideoReadError(FtalkError):
    """An mp4 cannot be decoded (the message names the file)."""


@dataclass(frozen=True)
class Mp4Info:
    """What an mp4 holds: frame count, rate and size of its video, and the durations of both streams.

    `video_seconds` is frames / fps. `audio_seconds` is None without an audio stream. `audio_padded_seconds` is the
    silence `write_mp4` appended because the audio file was shorter than the video (0.0 from `read_mp4`, which
    cannot tell silence that was written from silence that was added).
    """

    path: Path
    frames: int
    fps: float
    width: int
    height: int
    video_seconds: float
    audio_seconds: float | None
    audio_padded_seconds: float = 0.0


@dataclass(frozen=True)
class _Track:
    """Audio ready to encode: float32 [channels, samples] at an AAC rate, exactly the video's length."""

    samples: np.ndarray
    rate: int
    padded: int

    @property
    def layout(self) -> str:
        return "mono" if self.samples.shape[0] == 1 else "stereo"


def write_mp4(
    frames: np.ndarray,
    fps: float | Fraction,
    out_path: Path,
    *,
    audio_path: Path | None = None,
    crf: int = 18,
    preset: str | None = None,
) -> Mp4Info:
    """Write uint8 RGB `frames` [F, H, W, 3] as an H.264 (libx264, yuv420p; x264's `preset`, default medium) mp4 at
    `fps`, with `audio_path`
    re-encoded as AAC and cut or silence-padded to F / fps when given. `out_path` is replaced only when the whole
    file is written."""
    out_path = Path(out_path)
    _check_target(out_path)
    num_frames, height, width = _check_frames(frames, out_path)
    rate = _frame_rate(fps, out_path)
    if not 0 <= crf <= 51:
        raise VideoWriteError(f"{out_path}: crf {crf} is outside libx264's 0..51; 18 is visually lossless")
    track = None if audio_path is None else _load_track(Path(audio_path), out_path, Fraction(num_frames) / rate)
    try:
        with atomic_file(out_path, binary=True) as handle, av.open(handle, mode="w", format="mp4") as container:
            _encode(container, frames, rate, crf, track, preset)
    except av.FFmpegError as exc:
        raise VideoWriteError(f"{out_path}: encoding failed ({exc}); the previous file, if any, is unchanged") from exc
    except OSError as exc:
        raise VideoWriteError(
            f"{out_path}: cannot write it ({exc.strerror or exc}); check that its folder is writable and has space "
            "(the previous file, if any, is unchanged)"
        ) from exc
    return Mp4Info(
        path=out_path,
        frames=num_frames,
        fps=float(rate),
        width=width,
        height=height,
        video_seconds=float(num_frames / rate),
        audio_seconds=None if track is None else track.samples.shape[1] / track.rate,
        audio_padded_seconds=0.0 if track is None else track.padded / track.rate,
    )


def read_mp4(path: Path) -> tuple[np.ndarray, Mp4Info]:
    """Decode every frame of `path` as uint8 RGB [F, H, W, 3], with its facts. `audio_seconds` counts the decoded
    samples of the first audio stream up to the end its packets state: an AAC decoder returns whole 1024-sample
    frames, and the padding of the last one (up to 64 ms at 16 kHz) is not part of the track."""
    path = Path(path)
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise VideoReadError(f"{path}: cannot open it as a video ({exc})") from exc
    with container:
        if not container.streams.video:
            raise VideoReadError(f"{path}: it holds no video stream")
        video = container.streams.video[0]
        audio = container.streams.audio[0] if container.streams.audio else None
        decoded: list[np.ndarray] = []
        audio_frames: list[tuple[Fraction | None, int]] = []  # (start in seconds, samples) of each decoded frame
        audio_end: Fraction | None = None  # where the audio packets say the track ends
        try:
            for packet in container.demux(*(s for s in (video, audio) if s is not None)):
                if packet.stream is audio and packet.pts is not None and packet.duration and packet.time_base:
                    end = (packet.pts + packet.duration) * packet.time_base
                    audio_end = end if audio_end is None else max(audio_end, end)
                for frame in packet.decode():
                    if isinstance(frame, av.VideoFrame):
                        decoded.append(frame.to_ndarray(format="rgb24"))
                    elif isinstance(frame, av.AudioFrame):
                        start = None if frame.pts is None or not frame.time_base else frame.pts * frame.time_base
                        audio_frames.append((start, frame.samples))
        except av.FFmpegError as exc:
            raise VideoReadError(f"{path}: decoding failed after {len(decoded)} frames ({exc})") from exc
        if not decoded:
            raise VideoReadError(f"{path}: its video stream decodes to no frames")
        rate = video.average_rate or video.guessed_rate or video.base_rate
        if not rate:
            raise VideoReadError(f"{path}: its video stream states no frame rate")
        sample_rate = audio.codec_context.sample_rate if audio is not None else 0
    array = np.stack(decoded)
    audio_seconds = None
    if audio is not None and sample_rate:
        audio_seconds = _samples_before(audio_frames, audio_end, sample_rate) / sample_rate
    return array, Mp4Info(
        path=path,
        frames=len(decoded),
        fps=float(rate),
        width=int(array.shape[2]),
        height=int(array.shape[1]),
        video_seconds=float(len(decoded) / Fraction(rate)),
        audio_seconds=audio_seconds,
    )


def _samples_before(frames: list[tuple[Fraction | None, int]], end: Fraction | None, sample_rate: int) -> int:
    """How many decoded samples lie before `end` (all of them when the packets state no end or times are missing)."""
    total = 0
    for start, samples in frames:
        if end is None or start is None:
            total += samples
        else:
            total += max(0, min(samples, round((end - start) * sample_rate)))
    return total


def frame_strip(frames: np.ndarray, out_path: Path, *, count: int = 8, height: int = 128) -> Path:
    """Save `count` evenly spaced frames (first and last included; fewer if the video is shorter) side by side
    as a PNG, each scaled to `height` pixels keeping its aspect ratio. Returns `out_path`."""
    out_path = Path(out_path)
    _check_target(out_path)
    num_frames, frame_height, frame_width = _check_frames(frames, out_path, even=False)
    if count < 1 or height < 1:
        raise VideoWriteError(f"{out_path}: count ({count}) and height ({height}) must be at least 1")
    width = max(1, round(frame_width * height / frame_height))
    picks = np.unique(np.linspace(0, num_frames - 1, min(count, num_frames)).round().astype(int))
    strip = Image.new("RGB", (width * len(picks), height))
    for slot, index in enumerate(picks):
        tile = Image.fromarray(np.ascontiguousarray(frames[index])).resize((width, height), Image.Resampling.LANCZOS)
        strip.paste(tile, (slot * width, 0))
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    try:
        with atomic_file(out_path, binary=True) as handle:
            handle.write(buffer.getvalue())
    except OSError as exc:
        raise VideoWriteError(
            f"{out_path}: cannot write it ({exc.strerror or exc}); check that its folder is writable"
        ) from exc
    return out_path


def _check_target(out_path: Path) -> None:
    """Refuse a folder as the output before any work is done (the final rename would fail after encoding)."""
    if out_path.is_dir():
        raise VideoWriteError(f"{out_path}: it is a folder; give the path of the file to write inside it")


def _check_frames(frames: np.ndarray, out_path: Path, *, even: bool = True) -> tuple[int, int, int]:
    """(F, H, W) of a uint8 RGB array, or a VideoWriteError that says what is wrong with it."""
    if not isinstance(frames, np.ndarray):
        raise VideoWriteError(f"{out_path}: frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise VideoWriteError(
            f"{out_path}: frames must be uint8 (0..255), got {frames.dtype}; convert with "
            "(x.clip(0, 1) * 255).round().astype(np.uint8)"
        )
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise VideoWriteError(f"{out_path}: frames must be [frames, height, width, 3] RGB, got shape {frames.shape}")
    num_frames, height, width = (int(n) for n in frames.shape[:3])
    if num_frames == 0 or height == 0 or width == 0:
        raise VideoWriteError(f"{out_path}: frames of shape {frames.shape} hold no picture")
    if even and (height % 2 or width % 2):
        raise VideoWriteError(
            f"{out_path}: frames are {width}x{height}, but yuv420p needs an even width and height; "
            "crop or resize them (model outputs are multiples of 16)"
        )
    return num_frames, height, width


def _frame_rate(fps: float | Fraction, out_path: Path) -> Fraction:
    """`fps` as an exact fraction (23 -> 23/1), checked to be a usable rate."""
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise VideoWriteError(f"{out_path}: fps must be a positive number, got {fps!r}")
    exact = fps if isinstance(fps, numbers.Rational) else float(fps)  # np.float32 is Real, not float
    rate = Fraction(exact).limit_denominator(_MAX_FPS_DENOMINATOR)
    if rate <= 0:
        raise VideoWriteError(f"{out_path}: fps {fps!r} is too small to store")
    return rate


def _load_track(audio_path: Path, out_path: Path, seconds: Fraction) -> _Track:
    """Read `audio_path` and make it an AAC-ready track of exactly `seconds` (cut, or padded with silence)."""
    try:
        data, rate = sf.read(str(audio_path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        raise VideoWriteError(
            f"{out_path}: cannot read the audio file {audio_path} ({exc}); give a wav/flac/ogg file soundfile can "
            "open (convert others with: ffmpeg -i in.m4a out.wav)"
        ) from exc
    if not np.isfinite(data).all():
        raise VideoWriteError(f"{out_path}: the audio file {audio_path} holds NaN or infinite samples")
    data = _to_stereo_at_most(data)
    if rate not in AAC_RATES:
        target = 44100 if rate % 11025 == 0 else 48000
        data = soxr.resample(data, rate, target) if len(data) else data
        rate = target
    wanted = round(seconds * rate)
    padded = max(0, wanted - len(data))
    if padded:
        data = np.concatenate([data, np.zeros((padded, data.shape[1]), dtype=np.float32)])
    samples = np.ascontiguousarray(data[:wanted].T, dtype=np.float32)
    return _Track(samples=samples, rate=int(rate), padded=padded)


def _to_stereo_at_most(data: np.ndarray) -> np.ndarray:
    """Mono and stereo as they are; more channels become stereo: each front channel (the first two, as WAV and
    FLAC order them) mixed half and half with the mean of the others, so nothing is lost and nothing clips."""
    if data.shape[1] <= 2:
        return data
    rest = data[:, 2:].mean(axis=1, keepdims=True)
    return (0.5 * (data[:, :2] + rest)).astype(np.float32)


def _encode(
    container: av.container.OutputContainer,
    frames: np.ndarray,
    rate: Fraction,
    crf: int,
    track: _Track | None,
    preset: str | None = None,
) -> None:
    """Encode the frames, and the track's samples up to each frame's end time, interleaved; then flush both."""
    video = container.add_stream("libx264", rate=rate)
    video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
    video.codec_context.time_base = 1 / rate
    # RGB is converted with the BT.709 matrix and the stream says so, so players (which guess BT.601 for small
    # untagged videos and BT.709 for large ones) show the colours the frames had; read_mp4 follows the tags.
    context = video.codec_context
    context.colorspace, context.color_range = Colorspace.ITU709, ColorRange.MPEG
    context.color_primaries, context.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
    video.options = {"crf": str(crf), **({"preset": preset} if preset else {})}
    audio = None
    if track is not None:
        audio = container.add_stream("aac", rate=track.rate, layout=track.layout)
        audio.bit_rate = _AUDIO_BIT_RATE[track.samples.shape[0]]
    sent = 0
    for index, rgb in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
        frame.pts = index
        frame.time_base = video.codec_context.time_base
        container.mux(video.encode(frame))
        if audio is not None and track is not None:
            until = min(track.samples.shape[1], round((index + 1) / rate * track.rate))
            if until > sent:
                chunk = av.AudioFrame.from_ndarray(
                    track.samples[:, sent:until].copy(), format="fltp", layout=track.layout
                )
                chunk.sample_rate, chunk.pts, chunk.time_base = track.rate, sent, Fraction(1, track.rate)
                container.mux(audio.encode(chunk))
                sent = until
    container.mux(video.encode(None))
    if audio is not None:
        container.mux(audio.encode(None))
