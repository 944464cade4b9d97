"""The raw videos `ftalk prepare` reads: found in a folder (recursively) or listed in a text / JSON Lines file, each
with its sidecar caption (`NAME.txt`) where there is one, probed with PyAV (a video and an audio stream, duration,
fps, size). A source that cannot be used is dropped with its reason, never retried."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import av

from fantasytalk_cli.errors import FtalkUsageError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".flv", ".ts", ".mpg", ".mpeg")


class PrepareSourceError(FtalkUsageError):
    """SRC names nothing `ftalk prepare` can read sources from."""


@dataclass(frozen=True)
class Source:
    """One raw video and the caption that came with it."""

    path: Path
    caption: str | None = None

    @property
    def key(self) -> str:
        """A stable name for the source's outputs and its done-marker (its path, hashed)."""
        return hashlib.sha256(str(self.path.resolve()).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class SourceInfo:
    """What probing a source found."""

    width: int
    height: int
    fps: float
    duration: float
    frames: int
    """Frames the container claims (or duration * fps)."""
    audio_rate: int


def find_sources(src: Path, out: Path) -> list[Source]:
    """Every video under folder ``src`` (sorted, the output folder left out), or the videos a ``.txt`` (one path per
    line, `#` comments) or ``.jsonl`` (`{"path": ..., "caption": ...}` per line) file lists, relative to its folder."""
    src = Path(src)
    if src.is_dir():
        out_resolved = Path(out).resolve()
        found = [
            p
            for p in sorted(src.rglob("*"))
            if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file() and out_resolved not in p.resolve().parents
        ]
        return [Source(p, _sidecar(p)) for p in found]
    if not src.is_file():
        raise PrepareSourceError(f"{src}: no such folder or list file (give a folder of videos, a .txt or a .jsonl)")
    if src.suffix == ".jsonl":
        return [_jsonl_source(src, n, line) for n, line in enumerate(src.read_text().splitlines(), 1) if line.strip()]
    if src.suffix == ".txt":
        lines = [line.strip() for line in src.read_text().splitlines()]
        paths = [src.parent / line for line in lines if line and not line.startswith("#")]
        return [Source(p, _sidecar(p)) for p in paths]
    raise PrepareSourceError(f"{src}: a list of sources must be a .txt (one path per line) or .jsonl file")


def _jsonl_source(listing: Path, number: int, line: str) -> Source:
    try:
        row = json.loads(line)
        path = listing.parent / row["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PrepareSourceError(
            f"{listing}:{number}: each line must be a JSON object with a `path` (and an optional `caption`)"
        ) from exc
    caption = row.get("caption")
    return Source(path, str(caption) if caption else _sidecar(path))


def _sidecar(video: Path) -> str | None:
    caption = video.with_suffix(".txt")
    if caption.is_file():
        text = caption.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    return None


def probe_source(path: Path) -> SourceInfo | str:
    """The source's facts, or why it cannot be used (`unreadable`, `no-video-stream`, `no-audio-stream`,
    `too-short`)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                return "no-video-stream"
            if not container.streams.audio:
                return "no-audio-stream"
            video, audio = container.streams.video[0], container.streams.audio[0]
            rate = video.average_rate or video.guessed_rate
            fps = float(rate) if rate else 0.0
            if video.duration is not None and video.time_base is not None:
                duration = float(video.duration * video.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = 0.0
            frames = video.frames or int(round(duration * fps))
            if fps <= 0 or duration <= 0 or not video.codec_context.width:
                return "unreadable"
            return SourceInfo(
                video.codec_context.width, video.codec_context.height, fps, duration, frames,
                int(audio.codec_context.sample_rate or 0),
            )  # fmt: skip
    except (av.FFmpegError, OSError, ValueError):
        return "unreadable"
