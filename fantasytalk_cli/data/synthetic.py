"""The synthetic talking-clip dataset behind `ftalk make-demo-data`: small mp4 + wav pairs in the seed's layout
whose drawn mouth opens with the loudness of a speech-like audio track, so a model has a real audio-to-mouth
signal to learn, and every test and the demo run without downloading data.

`write_talking_clip` is public: use it to build odd or broken corpora in tests (wrong rates, short audio, ...).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cache
from pathlib import Path

import av
import numpy as np
import soundfile as sf

from fantasytalk_cli.data.probe_facts import ProbeFacts
from fantasytalk_cli.data.tracks import Box, track_document
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.fileio import swap_folder

METADATA_NAME = "metadata_control.json"
"""File name of the seed's metadata list inside a dataset folder."""

DEMO_SIZES: tuple[tuple[int, int], ...] = ((96, 160), (128, 128), (176, 96))
"""(width, height) of demo clips: portrait, square, landscape; sides are multiples of 16 and small so CPU decode
is fast."""

DEMO_FPS: tuple[int, ...] = (23, 25, 30)
"""Frame rates the demo clips cycle through."""

DEMO_AUDIO: tuple[tuple[int, int], ...] = ((16000, 1), (44100, 2), (16000, 2), (44100, 1))
"""(sample_rate, channels) combinations the demo clips cycle through, so any dataset of 4+ clips holds each."""

DEMO_SECONDS = (1.0, 6.0)
"""Range of demo clip durations in seconds."""

_MIN_SIDE = 32
_PEAK = 0.8
_MOUTH_MIN, _MOUTH_MAX = 0.04, 0.30
"""Mouth half-height as a fraction of the head's vertical radius, closed and fully open."""

_BACKGROUNDS = {"pale blue": (190, 210, 235), "cream": (238, 230, 205), "light grey": (215, 215, 215),
                "mint": (200, 232, 210), "peach": (245, 215, 195)}  # fmt: skip
_SKINS = ((241, 200, 170), (224, 172, 135), (198, 146, 110), (165, 115, 85))
_HAIRS = {"brown": (120, 80, 50), "auburn": (150, 70, 40), "grey": (140, 140, 140), "blond": (200, 170, 100)}
_SHIRTS = ((70, 110, 170), (160, 80, 80), (90, 140, 100), (150, 150, 160))
_SUBJECTS = ("A person", "A man", "A woman", "A presenter", "A young adult", "An older person")
_VERBS = ("talks to the camera", "speaks calmly", "explains something", "says a few sentences", "is talking")


class DemoDataError(FtalkUsageError):
    """The demo dataset cannot be written where asked (the message says what to do instead)."""


@dataclass(frozen=True)
class ClipInfo:
    """What `write_talking_clip` wrote: the facts a decoder should read back, and the per-frame signals it drew.

    `hair` and `background` name the drawn colours (captions use them). `mouth_opening[i]` (0 closed .. 1 fully
    open) is what frame `i` shows; `audio_envelope[i]` is the RMS of the written audio (channels averaged) over
    frame `i`'s time interval: the loudness the mouth follows. `face_boxes[i]` and `mouth_boxes[i]` are where frame
    `i` drew them (x0, y0, x1, y1 in pixels): the face ellipse's bounds, and the mouth box in `ftalk prepare`'s
    convention (0.5 face widths by 0.35 face heights, centred on the mouth), which holds the mouth fully open.
    """

    num_frames: int
    fps: float
    width: int
    height: int
    sample_rate: int
    channels: int
    audio_seconds: float
    codec: str
    hair: str
    background: str
    mouth_opening: tuple[float, ...] = field(repr=False)
    audio_envelope: tuple[float, ...] = field(repr=False)
    face_boxes: tuple[Box, ...] = field(repr=False, default=())
    mouth_boxes: tuple[Box, ...] = field(repr=False, default=())

    @property
    def video_seconds(self) -> float:
        """Duration of the video stream: frames / fps."""
        return self.num_frames / self.fps

    def track(self) -> dict[str, object]:
        """The clip's face/mouth track file (`docs/prepare.md#the-track-format`): where it drew them."""
        return track_document(
            fps=self.fps, width=self.width, height=self.height, face=self.face_boxes, mouth=self.mouth_boxes
        )

    def probe_facts(self) -> ProbeFacts:
        """The facts probing this clip should find (what `validate-metadata` would store)."""
        return ProbeFacts(
            width=self.width,
            height=self.height,
            num_frames=self.num_frames,
            fps=self.fps,
            audio_duration=self.audio_seconds,
            sample_rate=self.sample_rate,
            channels=self.channels,
        )


@dataclass(frozen=True)
class DemoClip:
    """One metadata entry of a demo dataset: paths relative to the dataset folder, caption and what was written."""

    file_path: str
    audio_path: str
    text: str
    info: ClipInfo
    track_path: str

    def metadata_entry(self) -> dict[str, str]:
        """The entry as it appears in `metadata_control.json` (`track`: its face/mouth boxes, as `ftalk prepare`
        writes them, for the lip-weighted stage 2)."""
        return {"file_path": self.file_path, "audio_path": self.audio_path, "text": self.text, "type": "video",
                "track": self.track_path}  # fmt: skip


@dataclass(frozen=True)
class DemoDataReport:
    """Result of `make_demo_dataset`: where the dataset is and what each clip holds."""

    out_dir: Path
    clips: list[DemoClip]

    @property
    def metadata_path(self) -> Path:
        return self.out_dir / METADATA_NAME

    @property
    def total_seconds(self) -> float:
        """Summed video duration of all clips."""
        return sum(clip.info.video_seconds for clip in self.clips)

    def summary(self) -> str:
        """A few lines for the terminal: count, duration, and the mix of sizes, frame rates and audio formats."""

        def mix(counts: Counter[str]) -> str:
            return ", ".join(f"{key} x{n}" for key, n in sorted(counts.items()))

        infos = [clip.info for clip in self.clips]
        sizes = Counter(f"{i.width}x{i.height}" for i in infos)
        fps = Counter(f"{i.fps:g}" for i in infos)
        audio = Counter(f"{i.sample_rate} Hz {'mono' if i.channels == 1 else f'{i.channels}ch'}" for i in infos)
        codecs = Counter(i.codec for i in infos)
        return "\n".join(
            [
                f"Wrote {len(self.clips)} synthetic talking clips ({self.total_seconds:.1f} s) to {self.out_dir}",
                f"  sizes:    {mix(sizes)}",
                f"  fps:      {mix(fps)}",
                f"  audio:    {mix(audio)}",
                f"  codec:    {mix(codecs)}",
                f"  metadata: {self.metadata_path}",
            ]
        )


def speech_like_audio(seconds: float, sample_rate: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A mono speech-like signal and its amplitude envelope, both float32 of `round(seconds * sample_rate)` samples.

    The source is voiced: harmonics of a drifting pitch (90-220 Hz) up to 4 kHz. The envelope is a chain of
    syllable bumps at 3-6 Hz grouped into words of 1-5 syllables with 0.15-0.5 s pauses between words, so the
    loudness has the rhythm of speech and real silences. Peak is scaled to 0.8; a faint noise floor stays in pauses.
    """
    n = max(1, round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate

    envelope = np.zeros(n)
    cursor = rng.uniform(0.0, 0.25)
    while cursor < seconds:
        for _ in range(int(rng.integers(1, 6))):
            length = 1.0 / rng.uniform(3.0, 6.0)
            start, stop = round(cursor * sample_rate), min(n, round((cursor + length) * sample_rate))
            if start >= n:
                break
            bump = np.sin(np.pi * np.arange(stop - start) / max(1, round(length * sample_rate))) ** 2
            envelope[start:stop] = rng.uniform(0.35, 1.0) * bump
            cursor += length
        cursor += rng.uniform(0.15, 0.5)

    f0 = rng.uniform(90.0, 220.0) * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = np.zeros(n)
    top = min(4000.0, 0.45 * sample_rate)
    for k in range(1, int(top // f0.max()) + 1):
        voiced += np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k
    signal = envelope * voiced
    peak = float(np.abs(signal).max())
    if peak > 0:
        signal *= _PEAK / peak
    signal += 0.002 * rng.standard_normal(n)
    return signal.astype(np.float32), envelope.astype(np.float32)


def frame_rms(samples: np.ndarray, sample_rate: int, fps: float, num_frames: int) -> np.ndarray:
    """RMS of `samples` (shape (n,) or (n, channels); channels are averaged first) over each frame's interval."""
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    edges = np.round(np.arange(num_frames + 1) * sample_rate / fps).astype(np.int64).clip(0, len(mono))
    out = np.zeros(num_frames)
    for i in range(num_frames):
        chunk = mono[edges[i] : edges[i + 1]].astype(np.float64)
        out[i] = np.sqrt(np.mean(chunk**2)) if len(chunk) else 0.0
    return out


@cache
def default_codec() -> str:
    """`libx264` (yuv420p) when this PyAV build has it, else `mpeg4`; both decode in decord with exact counts."""
    try:
        av.codec.Codec("libx264", "w")
    except Exception:  # PyAV raises UnknownCodecError (a ValueError) or FFmpegError depending on version.
        return "mpeg4"
    return "libx264"


def write_talking_clip(
    video_path: Path,
    audio_path: Path,
    *,
    width: int,
    height: int,
    fps: float,
    seconds: float,
    sample_rate: int = 16000,
    channels: int = 1,
    seed: int = 0,
    codec: str | None = None,
) -> ClipInfo:
    """Write one talking-face clip: an mp4 of `round(seconds * fps)` frames and a PCM_16 wav of
    `round(seconds * sample_rate)` samples, whose drawn mouth opens with the audio's per-frame loudness.

    `seed` picks the voice, the syllable rhythm, colours and face placement. `codec` defaults to
    `default_codec()`. Parent folders are created. Raises `ValueError` for sizes or rates it cannot encode.
    """
    if width < _MIN_SIDE or height < _MIN_SIDE or width % 2 or height % 2:
        raise ValueError(f"width and height must be even and at least {_MIN_SIDE} (yuv420p), got {width}x{height}")
    if fps <= 0 or seconds <= 0 or sample_rate < 1000 or channels < 1:
        raise ValueError(
            f"need fps > 0, seconds > 0, sample_rate >= 1000 and channels >= 1; "
            f"got fps={fps}, seconds={seconds}, sample_rate={sample_rate}, channels={channels}"
        )
    rng = np.random.default_rng(seed)
    num_frames = max(1, round(seconds * fps))
    rate = Fraction(fps).limit_denominator(1001)

    mono, _ = speech_like_audio(seconds, sample_rate, rng)
    gains = np.concatenate([[1.0], rng.uniform(0.7, 0.95, channels - 1)])
    audio = (mono[:, None] * gains[None, :]).astype(np.float32)
    if channels > 1:  # Channels differ a little, as real stereo does.
        audio[:, 1:] += 0.002 * rng.standard_normal((len(mono), channels - 1)).astype(np.float32)
    audio = np.clip(audio, -1.0, 1.0)
    envelope = frame_rms(audio, sample_rate, float(rate), num_frames)
    loudest = float(envelope.max())
    opening = envelope / loudest if loudest > 0 else np.zeros(num_frames)

    audio_path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(audio_path), audio if channels > 1 else audio[:, 0], sample_rate, subtype="PCM_16", format="WAV")

    face = _Face(width, height, rng)
    face_boxes: list[Box] = []
    mouth_boxes: list[Box] = []
    chosen = codec or default_codec()
    video_path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(video_path), mode="w", format="mp4") as container:
        stream = container.add_stream(chosen, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1  # Tiny frames: threads cost more than they save, and stay deterministic.
        stream.options = {"crf": "18", "preset": "veryfast"} if chosen == "libx264" else {"qscale": "2"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(face.draw(i / float(rate), float(opening[i])), format="rgb24")
            face_boxes.append(face.face_box(i / float(rate)))
            mouth_boxes.append(face.mouth_box(i / float(rate)))
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))

    return ClipInfo(
        num_frames=num_frames,
        fps=float(rate),
        width=width,
        height=height,
        sample_rate=sample_rate,
        channels=channels,
        audio_seconds=len(audio) / sample_rate,
        codec=chosen,
        hair=face.hair_name,
        background=face.background_name,
        mouth_opening=tuple(float(v) for v in opening),
        audio_envelope=tuple(float(v) for v in envelope),
        face_boxes=tuple(face_boxes),
        mouth_boxes=tuple(mouth_boxes),
    )


class _Face:
    """A flat cartoon head (hair, face ellipse, eyes that blink, a mouth) on a plain background, drawn with numpy
    masks. Only the eyes and the mouth are dark, and the mouth sits in the lower half of the frame."""

    def __init__(self, width: int, height: int, rng: np.random.Generator) -> None:
        self.width, self.height = width, height
        self.yy, self.xx = np.mgrid[0:height, 0:width].astype(np.float32)
        self.background_name = list(_BACKGROUNDS)[rng.integers(len(_BACKGROUNDS))]
        self.hair_name = list(_HAIRS)[rng.integers(len(_HAIRS))]
        self.background = np.array(_BACKGROUNDS[self.background_name], np.uint8)
        self.hair = np.array(_HAIRS[self.hair_name], np.uint8)
        self.skin = np.array(_SKINS[rng.integers(len(_SKINS))], np.uint8)
        self.shirt = np.array(_SHIRTS[rng.integers(len(_SHIRTS))], np.uint8)
        self.ry = 0.36 * min(height, 1.25 * width) * rng.uniform(0.95, 1.05)
        self.rx = 0.78 * self.ry
        self.cx = width / 2 + rng.uniform(-0.05, 0.05) * width
        self.cy = height / 2 - rng.uniform(0.0, 0.04) * height  # Keeps eyes above, mouth below mid-height.
        self.sway_hz, self.sway_phase = rng.uniform(0.2, 0.5), rng.uniform(0, 2 * np.pi)
        self.blinks = rng.uniform(0.0, 60.0, 24)  # Blink start times; 24 covers a minute at a natural rate.

    def _ellipse(self, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((self.xx - cx) / rx) ** 2 + ((self.yy - cy) / ry) ** 2 <= 1.0

    def _centre_x(self, t: float) -> float:
        """The head's centre at time `t`: it sways sideways a little."""
        return self.cx + 0.03 * self.rx * float(np.sin(2 * np.pi * self.sway_hz * t + self.sway_phase))

    def face_box(self, t: float) -> Box:
        """The face ellipse's bounds at time `t`."""
        cx = self._centre_x(t)
        return (cx - self.rx, self.cy - self.ry, cx + self.rx, self.cy + self.ry)

    def mouth_box(self, t: float) -> Box:
        """`ftalk prepare`'s mouth box at time `t`: 0.5 face widths by 0.35 face heights around the mouth's centre
        (the drawn mouth, 0.8 rx wide and at most 0.6 ry tall, fits inside at any opening)."""
        cx, my = self._centre_x(t), self.cy + 0.5 * self.ry
        return (cx - 0.5 * self.rx, my - 0.35 * self.ry, cx + 0.5 * self.rx, my + 0.35 * self.ry)

    def draw(self, t: float, opening: float) -> np.ndarray:
        """RGB uint8 frame (height, width, 3) at time `t` with the mouth `opening` (0..1)."""
        cx, cy, rx, ry = self._centre_x(t), self.cy, self.rx, self.ry
        img = np.empty((self.height, self.width, 3), np.uint8)
        img[:] = self.background
        img[self._ellipse(cx, cy + 1.45 * ry, 1.5 * rx, 0.7 * ry)] = self.shirt
        img[self._ellipse(cx, cy + 0.9 * ry, 0.35 * rx, 0.4 * ry)] = self.skin  # Neck.
        img[self._ellipse(cx, cy - 0.12 * ry, 1.08 * rx, 0.98 * ry)] = self.hair
        img[self._ellipse(cx, cy, rx, ry)] = self.skin
        img[self._ellipse(cx, cy - 0.85 * ry, 0.85 * rx, 0.3 * ry) & (self.yy < cy - 0.6 * ry)] = self.hair
        blinking = bool(np.any((t >= self.blinks) & (t < self.blinks + 0.12)))
        eye_ry = 0.02 * ry if blinking else 0.1 * ry
        for side in (-1, 1):
            img[self._ellipse(cx + side * 0.38 * rx, cy - 0.2 * ry, 0.16 * rx, max(eye_ry, 0.6))] = (245, 245, 245)
            img[self._ellipse(cx + side * 0.38 * rx, cy - 0.2 * ry, 0.08 * rx, max(eye_ry, 0.6))] = (30, 30, 40)
        mouth_ry = (_MOUTH_MIN + (_MOUTH_MAX - _MOUTH_MIN) * opening) * ry
        img[self._ellipse(cx, cy + 0.5 * ry, 0.4 * rx, max(mouth_ry, 0.6))] = (70, 15, 25)
        return img


def make_demo_dataset(out_dir: Path, seed: int = 0, num_clips: int = 12, overwrite: bool = False) -> DemoDataReport:
    """Write `num_clips` synthetic talking clips in the seed's layout (`train/*.mp4`, `wav/*.wav`,
    `metadata_control.json`), with their face/mouth tracks (`tracks/*.json`, the entries' `track` field), into
    `out_dir`, deterministically from `seed`.

    Clips cycle through `DEMO_SIZES`, `DEMO_FPS` and `DEMO_AUDIO` so every combination appears; durations are drawn
    from `DEMO_SECONDS`. The dataset is built in a temporary sibling folder and renamed into place when complete,
    so `out_dir` never holds a half-written dataset. A non-empty `out_dir` is refused unless `overwrite`, and even
    then only if it holds a `metadata_control.json` (so a mistyped path cannot delete unrelated files).
    """
    if num_clips < 1:
        raise DemoDataError(f"num_clips must be at least 1, got {num_clips}")
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    rng = np.random.default_rng(seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(out_dir, "partial")
    staging.mkdir()  # Not mkdtemp: its 0700 mode would become the dataset's.
    try:
        clips = [_write_demo_clip(staging, index, rng) for index in range(num_clips)]
        entries = [clip.metadata_entry() for clip in clips]
        (staging / METADATA_NAME).write_text(json.dumps(entries, indent=2) + "\n", encoding="utf-8")
        swap_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return DemoDataReport(out_dir=out_dir, clips=clips)


def _check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse a target that is a file, or a non-empty folder without `overwrite` or that is not a dataset."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DemoDataError(f"{out_dir} exists and is not a folder; pick another output folder.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise DemoDataError(
            f"{out_dir} exists and is not empty; pass --overwrite to replace it, or pick another folder."
        )
    if not (out_dir / METADATA_NAME).is_file():
        raise DemoDataError(
            f"{out_dir} is not empty and holds no {METADATA_NAME}, so it does not look like a dataset; "
            "not deleting it even with --overwrite. Remove it yourself or pick another folder."
        )


def _sibling(path: Path, kind: str) -> Path:
    """An unused hidden name next to `path` (same filesystem, so renames between them are atomic)."""
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _write_demo_clip(root: Path, index: int, rng: np.random.Generator) -> DemoClip:
    """Clip `index` of the demo mix: size, fps and audio format cycle; duration, voice and caption come from `rng`."""
    width, height = DEMO_SIZES[index % len(DEMO_SIZES)]
    fps = DEMO_FPS[(index + index // len(DEMO_SIZES)) % len(DEMO_FPS)]  # Every size meets every fps in 9 clips.
    sample_rate, channels = DEMO_AUDIO[index % len(DEMO_AUDIO)]
    seconds = round(float(rng.uniform(*DEMO_SECONDS)) * 4) / 4
    clip_seed = int(rng.integers(2**31))
    name = f"{index + 1:08d}"
    file_path, audio_path, track_path = f"train/{name}.mp4", f"wav/{name}.wav", f"tracks/{name}.json"
    info = write_talking_clip(
        root / file_path,
        root / audio_path,
        width=width,
        height=height,
        fps=fps,
        seconds=seconds,
        sample_rate=sample_rate,
        channels=channels,
        seed=clip_seed,
    )
    (root / track_path).parent.mkdir(exist_ok=True)
    (root / track_path).write_text(json.dumps(info.track()) + "\n", encoding="utf-8")
    return DemoClip(
        file_path=file_path, audio_path=audio_path, text=_caption(info, rng), info=info, track_path=track_path
    )


def _caption(info: ClipInfo, rng: np.random.Generator) -> str:
    """A short caption that matches what the clip shows, worded a little differently each time."""
    subject = _SUBJECTS[rng.integers(len(_SUBJECTS))]
    verb = _VERBS[rng.integers(len(_VERBS))]
    return f"{subject} with {info.hair} hair {verb} in front of a plain {info.background} background."
