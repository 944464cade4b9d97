"""The time logic of `ftalk prepare`, pure and seed-free: spans of seconds, their intersections, the face track's
good spans (one dominant face, large enough, inside the frame, not jumping), and the clip windows cut from
shot ∩ face ∩ speech. Every second not kept is accounted to one drop reason, so the report adds up."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fantasytalk_cli.prepare.faces import Box


class Detected(Protocol):
    """What the face stage needs of a detection (`faces.Face`)."""

    box: Box
    score: float


@dataclass(frozen=True, order=True)
class Span:
    """[start, end) in seconds."""

    start: float
    end: float

    @property
    def length(self) -> float:
        return max(0.0, self.end - self.start)


def intersect(a: Sequence[Span], b: Sequence[Span]) -> list[Span]:
    """The parts of time both sorted, disjoint span lists cover."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        start, end = max(a[i].start, b[j].start), min(a[i].end, b[j].end)
        if end > start:
            out.append(Span(start, end))
        if a[i].end < b[j].end:
            i += 1
        else:
            j += 1
    return out


def covered(spans: Iterable[Span], window: Span) -> float:
    """Seconds of ``window`` that ``spans`` (disjoint) cover."""
    return sum(max(0.0, min(s.end, window.end) - max(s.start, window.start)) for s in spans)


def shot_spans(cuts: Sequence[int], num_frames: int, fps: float) -> list[Span]:
    """The shots between scene cuts (frame indices where a new shot starts)."""
    edges = [0, *sorted(c for c in cuts if 0 < c < num_frames), num_frames]
    return [Span(a / fps, b / fps) for a, b in zip(edges, edges[1:], strict=False) if b > a]


# --------------------------------------------------------------------------------------------------------------------
# The face track.


@dataclass(frozen=True)
class FaceRules:
    """When an analysed frame has one usable face."""

    min_face_fraction: float = 0.15
    """Least face-box height as a share of the frame height."""
    second_face_share: float = 0.3
    """A second face whose box area is at least this share of the largest one's makes the frame two-faced."""
    max_jump: float = 0.5
    """Most the face centre may move between analysed frames, in face heights."""
    min_score: float = 0.5
    edge_tolerance: float = 0.02
    """How far (share of the frame) a box may reach past the frame's edge and still count as inside."""


FRAME_VERDICTS = ("ok", "no-face", "two-faces", "face-too-small", "face-outside-frame", "face-jumps")


def frame_verdict(faces: Sequence[Detected], previous: Box | None, width: int, height: int, rules: FaceRules) -> str:
    """One of `FRAME_VERDICTS` for an analysed frame's detections (``previous``: the last frame's kept box)."""
    found = sorted((f for f in faces if f.score >= rules.min_score), key=lambda f: -_area(f.box))
    if not found:
        return "no-face"
    if len(found) > 1 and _area(found[1].box) >= rules.second_face_share * _area(found[0].box):
        return "two-faces"
    x0, y0, x1, y1 = found[0].box
    if (y1 - y0) < rules.min_face_fraction * height:
        return "face-too-small"
    tol_x, tol_y = rules.edge_tolerance * width, rules.edge_tolerance * height
    if x0 < -tol_x or y0 < -tol_y or x1 > width + tol_x or y1 > height + tol_y:
        return "face-outside-frame"
    if previous is not None:
        (cx, cy), (px, py) = _centre(found[0].box), _centre(previous)
        if math.hypot(cx - px, cy - py) > rules.max_jump * (previous[3] - previous[1]):
            return "face-jumps"
    return "ok"


def main_face(faces: Sequence[Detected], rules: FaceRules) -> Detected | None:
    """The largest confident face."""
    found = [f for f in faces if f.score >= rules.min_score]
    return max(found, key=lambda f: _area(f.box)) if found else None


def verdict_spans(times: Sequence[float], verdicts: Sequence[str], end: float) -> list[tuple[Span, str]]:
    """Runs of equal verdicts as spans: analysed frame k stands for [t_k, t_k+1) (the last one up to ``end``)."""
    out: list[tuple[Span, str]] = []
    for k, (t, verdict) in enumerate(zip(times, verdicts, strict=True)):
        stop = times[k + 1] if k + 1 < len(times) else end
        if out and out[-1][1] == verdict:
            out[-1] = (Span(out[-1][0].start, stop), verdict)
        else:
            out.append((Span(t, stop), verdict))
    return out


def _area(box: Box) -> float:
    return max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def interpolate_boxes(times: Sequence[float], boxes: Sequence[Box], at: Sequence[float]) -> list[Box]:
    """Boxes at times ``at``, linearly between the analysed frames' boxes (held at the ends)."""
    columns = [np.interp(at, times, [box[i] for box in boxes]) for i in range(4)]
    return [(float(a), float(b), float(c), float(d)) for a, b, c, d in zip(*columns, strict=True)]


# --------------------------------------------------------------------------------------------------------------------
# Clip windows.


@dataclass(frozen=True)
class WindowRules:
    min_seconds: float
    max_seconds: float
    min_speech_ratio: float


def clip_windows(
    usable: Sequence[Span], speech: Sequence[Span], rules: WindowRules
) -> tuple[list[Span], list[tuple[Span, str]]]:
    """Cut each usable span (shot ∩ face) into windows of at most ``max_seconds`` (as equal as the span allows,
    none shorter than ``min_seconds``); keep those whose speech share reaches ``min_speech_ratio``. Returns
    (kept windows, dropped spans with their reason: `too-short` or `little-speech`)."""
    kept: list[Span] = []
    dropped: list[tuple[Span, str]] = []
    for span in usable:
        if span.length < rules.min_seconds:
            dropped.append((span, "too-short"))
            continue
        count = max(1, math.ceil(span.length / rules.max_seconds - 1e-9))
        size = span.length / count
        for k in range(count):
            window = Span(span.start + k * size, span.start + (k + 1) * size)
            if covered(speech, window) >= rules.min_speech_ratio * window.length:
                kept.append(window)
            else:
                dropped.append((window, "little-speech"))
    return kept, dropped
