"""`ftalk evaluate --syncnet`: LSE-D / LSE-C (`lse.py`) of videos sampled from the held-out pairs, and of the
held-out clips themselves (the ground-truth reference row), averaged over clips with bootstrap intervals. Clips in
which the face detector (the one `ftalk prepare` uses) finds no face at all are counted (``lse_no_face``), never
silently dropped."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fantasytalk_cli.checkpoints.metrics import MetricRow
from fantasytalk_cli.data.dataset import read_frames
from fantasytalk_cli.data.metadata import resolve_media_path
from fantasytalk_cli.evaluate.lse import NoFaceError, SyncScore, face_crops, sync_score, to_16k_mono, to_25fps
from fantasytalk_cli.evaluate.syncnet import SyncNet, load_syncnet
from fantasytalk_cli.models.audio import SAMPLE_RATE, load_audio
from fantasytalk_cli.prepare.faces import FaceDetector, default_detector
from fantasytalk_cli.sample.video_io import read_mp4
from fantasytalk_cli.train.audio_reliance import HeldOut, bootstrap_mean


@dataclass(frozen=True)
class Scored:
    score: SyncScore | None
    face_share: float


@dataclass
class LipSync:
    """The loaded SyncNet and face detector, and the held-out clips they score."""

    net: SyncNet
    detector: FaceDetector
    held: HeldOut
    say: Callable[[str], None]

    @classmethod
    def open(cls, syncnet: Path, held: HeldOut, say: Callable[[str], None] = lambda _: None) -> LipSync:
        """Load the SyncNet strictly (a file of another layout is refused naming the keys) and the face detector."""
        net = load_syncnet(syncnet)
        say(f"lip sync: SyncNet from {syncnet}, faces by BlazeFace (ftalk prepare's detector)")
        return cls(net, default_detector(), held, say)

    def score(self, frames: np.ndarray, fps: float, audio: np.ndarray, sample_rate: int) -> Scored:
        """One clip's score (None when no frame shows a face; too short a clip is an error that names why) and the
        share of its frames in which the detector found the face (the others borrow the nearest frame's box)."""
        steady = to_25fps(frames, fps)
        try:
            crops, missing = face_crops(steady, self.detector)
        except NoFaceError:
            return Scored(None, 0.0)
        score = sync_score(self.net, crops, to_16k_mono(audio, sample_rate))
        return Scored(score, 1.0 - missing / len(steady))

    def reference_rows(self) -> list[MetricRow]:
        """The held-out clips as they are, whole (frames and audio): the reference row."""
        scores = []
        root = self.held.dataset.media_root
        for planned in self.held.batches:
            entry = self.held.entries[planned[0]]
            assert entry.probe is not None
            frames = read_frames(resolve_media_path(root, entry.file_path), range(entry.probe.num_frames))
            audio = load_audio(resolve_media_path(root, entry.audio_path))
            scores.append(self.score(np.asarray(frames), entry.probe.fps, audio, SAMPLE_RATE))
        rows = summary_rows(scores, step=0, checkpoint=None, source="reference")
        self.say(f"lip sync of the held-out clips themselves: {_said(rows)}")
        return rows

    def rows(self, videos: Sequence[tuple[int, Path]], step: int, checkpoint: str) -> list[MetricRow]:
        """Scores of sampled videos (each with the audio it was sampled from: its held-out clip's, from its start)."""
        scores = []
        root = self.held.dataset.media_root
        for position, video in videos:
            entry = self.held.entries[self.held.batches[position][0]]
            frames, info = read_mp4(video)
            audio = load_audio(resolve_media_path(root, entry.audio_path))
            spoken = audio[: round(len(frames) / info.fps * SAMPLE_RATE)]
            scores.append(self.score(frames, info.fps, spoken, SAMPLE_RATE))
        rows = summary_rows(scores, step=step, checkpoint=checkpoint, source="evaluate")
        self.say(f"  lip sync: {_said(rows)}")
        return rows


def summary_rows(scored: Sequence[Scored], *, step: int, checkpoint: str | None, source: str) -> list[MetricRow]:
    """`lse_d` and `lse_c` over the clips with a face (mean, bootstrap interval), `lse_no_face` (the count of clips
    without one) and `lse_face_frames` (the mean share of frames in which the face was found)."""
    found = [s.score for s in scored if s.score is not None]
    rows = [
        MetricRow(step=step, metric="lse_no_face", value=float(len(scored) - len(found)), n=len(scored),
                  checkpoint=checkpoint, source=source),
        MetricRow(step=step, metric="lse_face_frames", value=float(np.mean([s.face_share for s in scored])),
                  n=len(scored), checkpoint=checkpoint, source=source),
    ]  # fmt: skip
    for metric, values in (("lse_d", [s.distance for s in found]), ("lse_c", [s.confidence for s in found])):
        if values:
            e = bootstrap_mean(np.asarray(values))
            rows.append(MetricRow(step=step, metric=metric, value=e.value, low=e.low, high=e.high, n=e.n,
                                  checkpoint=checkpoint, source=source))  # fmt: skip
    return rows


def _said(rows: Sequence[MetricRow]) -> str:
    by = {r.metric: r for r in rows}
    parts = [f"{m.upper().replace('_', '-')} {by[m].value:.3f}" for m in ("lse_d", "lse_c") if m in by]
    faces = f"{int(by['lse_no_face'].value)} of {by['lse_no_face'].n} clips without a face"
    return ", ".join([*parts, faces, f"the face found in {by['lse_face_frames'].value:.0%} of the frames"])
