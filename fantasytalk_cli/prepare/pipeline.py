"""`ftalk prepare SRC OUT`: raw talking videos -> clips (H.264), 16 kHz mono wavs, face/mouth tracks and the seed's
`metadata_control.json`, with a report of what was kept and dropped and why.

Per source (`prepare_source`): probe; scene cuts; the face detector on every `analysis_stride`-th frame; Silero
VAD on the 16 kHz audio; clip windows inside shot ∩ one-face ∩ speech; then one decode pass writing each clip
(crop of the smoothed face track, resized, re-encoded at the source fps or `fps`), its wav cut to exactly the
clip's frames, and its track. A source is finished when its done-marker (`.prepare/<key>.json`, written last and
atomically) exists: a rerun skips it, and an interrupted source is redone from the start (every file is written
atomically, so no partial clip is ever left). Sources are never modified.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

from fantasytalk_cli.data.probe import probe_audio, probe_video
from fantasytalk_cli.data.probing import facts_from_results
from fantasytalk_cli.data.tracks import track_document
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import atomic_file, write_text_atomic
from fantasytalk_cli.prepare.crop import Aspect, Crop, crop_for, smooth
from fantasytalk_cli.prepare.faces import Face
from fantasytalk_cli.prepare.sources import Source, SourceInfo, probe_source
from fantasytalk_cli.prepare.spans import (
    Box,
    FaceRules,
    Span,
    WindowRules,
    clip_windows,
    frame_verdict,
    interpolate_boxes,
    intersect,
    main_face,
    shot_spans,
    verdict_spans,
)
from fantasytalk_cli.sample.video_io import write_mp4

SAMPLE_RATE = 16_000
DEFAULT_CAPTION = "A person is talking."
"""Upstream FantasyTalking's inference prompt, plainly: the caption of clips without a sidecar or `--caption`."""
MARKERS = ".prepare"
ENCODE_PRESET = "veryfast"
"""x264's preset for the clips (crf 18 keeps them visually lossless): ~1.3x faster than the default `medium` on
this machine for ~8% larger files."""


@dataclass(frozen=True)
class PrepareOptions:
    """`ftalk prepare`'s settings (the command's flags one to one)."""

    min_face_fraction: float = 0.15
    min_speech_ratio: float = 0.6
    min_seconds: float = 3.5
    max_seconds: float = 10.0
    aspect: Aspect = "1:1"
    size: int = 512
    fps: float | None = None
    caption: str | None = None
    analysis_stride: int = 4
    """Run the face detector on every N-th frame (the track is interpolated between)."""
    smooth_frames: int = 9


@dataclass
class SourceResult:
    """What one source gave: its entries and the seconds kept and dropped, by reason."""

    source: str
    entries: list[dict[str, object]] = field(default_factory=list)
    kept_seconds: float = 0.0
    dropped: dict[str, float] = field(default_factory=dict)
    """Reason -> seconds (a source dropped whole counts its whole duration)."""
    source_dropped: str | None = None
    first_frames: list[tuple[str, list[float]]] = field(default_factory=list)
    """(clip path, its first frame's face box and mouth box in the clip): for the contact sheet."""
    error: str | None = None
    """Why a `broken` source failed part-way."""

    def drop(self, reason: str, seconds: float) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0.0) + seconds


def marker_path(out: Path, source: Source) -> Path:
    return out / MARKERS / f"{source.key}.json"


def read_marker(out: Path, source: Source) -> SourceResult | None:
    """The finished result of ``source``, when its done-marker exists."""
    path = marker_path(out, source)
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    data["first_frames"] = [tuple(x) for x in data.get("first_frames", [])]
    return SourceResult(**data)


def prepare_source(source: Source, out: Path, options: PrepareOptions) -> SourceResult:
    """Turn one source into clips under ``out`` and write its done-marker (see the module docstring)."""
    done = read_marker(out, source)
    if done is not None:
        return done
    result = SourceResult(source=str(source.path))
    info = probe_source(source.path)
    if isinstance(info, str):
        result.source_dropped = info
        result.drop(info, _duration_or_zero(source.path))
    else:
        try:
            _clips_of(source, info, out, options, result)
        except (av.FFmpegError, OSError, ValueError, RuntimeError, FtalkError) as exc:
            # a source that breaks part-way is dropped and counted, never retried: its clips so far are removed
            for entry in result.entries:
                for key in ("file_path", "audio_path", "track"):
                    (out / str(entry[key])).unlink(missing_ok=True)
            result = SourceResult(
                source=str(source.path), source_dropped="broken", error=f"{type(exc).__name__}: {exc}"
            )
            result.drop("broken", info.duration)
    write_text_atomic(marker_path(out, source), json.dumps(asdict(result), indent=1))
    return result


def _duration_or_zero(path: Path) -> float:
    try:
        with av.open(str(path)) as container:
            return (container.duration or 0) / av.time_base
    except (av.FFmpegError, OSError, ValueError):
        return 0.0


def _clips_of(source: Source, info: SourceInfo, out: Path, options: PrepareOptions, result: SourceResult) -> None:
    from fantasytalk_cli.prepare.shots import content_scores, cuts_from_scores
    from fantasytalk_cli.prepare.speech import load_audio_16k, speech_spans

    audio = load_audio_16k(source.path)
    speech = [Span(a, b) for a, b in speech_spans(audio)]
    detections: list[tuple[int, list[Face]]] = []
    cuts = cuts_from_scores(content_scores(_analysed(source.path, options.analysis_stride, detections)))
    shots = shot_spans(cuts, info.frames, info.fps)
    rules = FaceRules(min_face_fraction=options.min_face_fraction)
    times: list[float] = []
    verdicts: list[str] = []
    boxes: list[Box | None] = []
    mouths: list[Box | None] = []
    previous: Box | None = None
    for index, faces in detections:
        if any(index <= cut < index + options.analysis_stride for cut in cuts):
            previous = None  # a cut: the face may move
        verdict = frame_verdict(faces, previous, info.width, info.height, rules)
        face = main_face(faces, rules) if verdict == "ok" else None
        times.append(index / info.fps)
        verdicts.append(verdict)
        boxes.append(face.box if face is not None else None)
        mouths.append(face.mouth_box() if face is not None else None)  # type: ignore[attr-defined]
        previous = face.box if face is not None else None
    duration = min(info.duration, len(audio) / SAMPLE_RATE)
    face_ok: list[Span] = []
    for span, verdict in verdict_spans(times, verdicts, duration):
        if verdict == "ok":
            face_ok.append(span)
        else:
            result.drop(verdict, span.length)
    usable = intersect(shots, face_ok)
    windows, dropped = clip_windows(
        usable, speech, WindowRules(options.min_seconds, options.max_seconds, options.min_speech_ratio)
    )
    for span, reason in dropped:
        result.drop(reason, span.length)
    result.drop("shot-cut-gap", max(0.0, sum(s.length for s in face_ok) - sum(s.length for s in usable)))
    ok = [i for i, b in enumerate(boxes) if b is not None]
    track_times = [times[i] for i in ok]
    face_track = [boxes[i] for i in ok]
    mouth_track = [mouths[i] for i in ok]
    plans = plan_clips(windows, info, options, track_times, face_track, mouth_track)  # type: ignore[arg-type]
    _write_clips(source, out, options, result, plans, audio)


def _analysed(path: Path, stride: int, detections: list[tuple[int, list[Face]]]) -> Iterator[np.ndarray]:
    """One decode pass for both analyses: yields every frame small (for the scene-cut scores) and, as it goes,
    runs the face detector on every ``stride``-th frame at full size into ``detections``."""
    from fantasytalk_cli.prepare.faces import detect_faces
    from fantasytalk_cli.prepare.shots import analysis_size

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        size: tuple[int, int] | None = None
        for index, frame in enumerate(container.decode(stream)):
            if index % stride == 0:
                detections.append((index, detect_faces(frame.to_ndarray(format="rgb24"))))
            size = size or analysis_size(frame.width, frame.height)
            yield frame.to_ndarray(format="rgb24", width=size[0], height=size[1], interpolation="BILINEAR")


def _frames(path: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB frame) of every decoded frame."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            yield index, frame.to_ndarray(format="rgb24")


@dataclass(frozen=True)
class ClipPlan:
    """One clip to write: the source frame of each output frame, the crop, the per-frame face and mouth boxes."""

    number: int
    start: float
    """Seconds into the source of the clip's first frame."""
    fps: float
    sources: list[int]
    crop: Crop
    faces: list[Box]
    mouth: list[Box]


def plan_clips(
    windows: list[Span], info: SourceInfo, options: PrepareOptions, times: list[float], faces: list[Box],
    mouths: list[Box],
) -> list[ClipPlan]:  # fmt: skip
    """Each window's output frames (at `--fps`, else the source's), their source frames (nearest in time), the
    smoothed track at their times and the crop covering it."""
    fps = options.fps or info.fps
    plans = []
    for number, window in enumerate(windows):
        first = math.ceil(window.start * fps - 1e-6)
        count = math.floor(window.end * fps + 1e-6) - first
        at = [(first + j) / fps for j in range(count)]
        sources = [min(info.frames - 1, round(t * info.fps)) for t in at]
        face = smooth(interpolate_boxes(times, faces, at), options.smooth_frames)
        mouth = smooth(interpolate_boxes(times, mouths, at), options.smooth_frames)
        crop = crop_for(face, info.width, info.height, options.aspect, options.size)
        plans.append(ClipPlan(number, first / fps, fps, sources, crop, face, mouth))
    return [p for p in plans if len(p.sources) >= 2]


def _write_clips(
    source: Source, out: Path, options: PrepareOptions, result: SourceResult, plans: list[ClipPlan], audio: np.ndarray
) -> None:
    """One more decode pass writing the clips in time order (one clip's frames in memory at a time)."""
    if not plans:
        return
    caption = options.caption or source.caption or DEFAULT_CAPTION
    pending, kept = 0, {}
    plan, wanted = plans[0], set(plans[0].sources)
    for index, frame in _frames(source.path):
        if index in wanted:
            kept[index] = _crop(frame, plan.crop)
        while index >= plan.sources[-1]:  # the clip's last frame is in: write it, go on to the next
            if len(kept) == len(wanted):
                _write_clip(source, out, plan, np.stack([kept[i] for i in plan.sources]), audio, caption, result)
            pending, kept = pending + 1, {}
            if pending == len(plans):
                return
            plan, wanted = plans[pending], set(plans[pending].sources)
            if index in wanted:
                kept[index] = _crop(frame, plan.crop)


def _write_clip(
    source: Source, out: Path, plan: ClipPlan, frames: np.ndarray, audio: np.ndarray, caption: str,
    result: SourceResult,
) -> None:  # fmt: skip
    """The clip's mp4, its wav cut to exactly its frames, its track in its pixels; its entry with probe facts."""
    name = f"{source.key}_{plan.number:03d}"
    video, wav, track = out / "clips" / f"{name}.mp4", out / "wav" / f"{name}.wav", out / "tracks" / f"{name}.json"
    write_mp4(frames, plan.fps, video, preset=ENCODE_PRESET)
    begin = round(plan.start * SAMPLE_RATE)
    _write_wav(wav, audio[begin : begin + round(len(frames) / plan.fps * SAMPLE_RATE)])
    track_data = track_document(
        fps=plan.fps,
        width=plan.crop.out_width,
        height=plan.crop.out_height,
        source=str(source.path),
        source_start=plan.start,
        crop=[plan.crop.x0, plan.crop.y0, plan.crop.width, plan.crop.height],
        face=[plan.crop.map_box(b) for b in plan.faces],
        mouth=[plan.crop.map_box(b) for b in plan.mouth],
    )
    write_text_atomic(track, json.dumps(track_data))
    facts = facts_from_results(probe_video(video), probe_audio(wav))
    entry: dict[str, object] = {
        "file_path": f"clips/{name}.mp4",
        "audio_path": f"wav/{name}.wav",
        "text": caption,
        "type": "video",
        "track": f"tracks/{name}.json",
    }
    if facts is not None:
        entry["probe"] = facts.to_dict()
    result.entries.append(entry)
    result.kept_seconds += len(frames) / plan.fps
    result.first_frames.append((f"clips/{name}.mp4", [*track_data["face"][0], *track_data["mouth"][0]]))  # type: ignore[index]


def _crop(frame: np.ndarray, crop: Crop) -> np.ndarray:
    """The crop of ``frame``, resized to the clip's size (PIL's bilinear, which widens its support to antialias when
    it shrinks: a few ms a frame, against tens for torch's interpolate on two threads)."""
    region = Image.fromarray(frame[crop.y0 : crop.y0 + crop.height, crop.x0 : crop.x0 + crop.width])
    return np.asarray(region.resize((crop.out_width, crop.out_height), Image.Resampling.BILINEAR))


def _write_wav(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, binary=True) as handle:
        soundfile.write(handle, samples.astype(np.float32), SAMPLE_RATE, subtype="PCM_16", format="WAV")
