"""Test videos for `ftalk prepare`, built from the committed real fixtures: the public-domain astronaut portrait
(`tests/fixtures/prepare/portrait.png`, its face box and mouth labelled in `portrait.json`) and espeak-ng speech
(`speech.wav`). The portrait moves slightly over a grey frame and its mouth region opens with the speech's
loudness; each case knows where the face and the mouth are in every frame."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "prepare"
WIDTH, HEIGHT, FPS, RATE = 640, 360, 25, 16_000


@dataclass
class Built:
    """A test video and, per frame, the known face box and mouth point of its (first) portrait."""

    path: Path
    faces: list[tuple[float, float, float, float]] = field(default_factory=list)
    mouths: list[tuple[float, float]] = field(default_factory=list)


def speech() -> np.ndarray:
    samples, rate = soundfile.read(FIXTURES / "speech.wav", dtype="float32")
    assert rate == RATE
    return samples


def _portrait(side: int) -> tuple[np.ndarray, dict[str, list[float]]]:
    image = Image.open(FIXTURES / "portrait.png").convert("RGB")
    labels = json.loads((FIXTURES / "portrait.json").read_text())
    scale = side / image.width
    resized = np.asarray(image.resize((side, round(image.height * scale)), Image.Resampling.LANCZOS))
    return resized, {"face": [v * scale for v in labels["face_box"]], "mouth": [v * scale for v in labels["mouth"]]}


def build(
    path: Path,
    *,
    audio: np.ndarray | None,
    portraits: int = 1,
    side: int = 240,
    cut_at: float | None = None,
    cut_to: np.ndarray | None = None,
    seconds: float | None = None,
) -> Built:
    """Write ``path``: ``portraits`` copies of the portrait (side by side) moving a few pixels, the mouth opening
    with ``audio``'s loudness; from ``cut_at`` seconds on, another scene: the frames ``cut_to`` [N, H, W, 3] (looped,
    scaled to the frame), else a noise texture; AAC audio when given."""
    duration = seconds if seconds is not None else (len(audio) / RATE if audio is not None else 7.0)
    frames = int(duration * FPS)
    face, labels = _portrait(side)
    envelope = _envelope(audio, frames) if audio is not None else np.zeros(frames)
    built = Built(path)
    rng = np.random.default_rng(0)
    other = rng.integers(0, 255, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        sound = container.add_stream("aac", rate=RATE, layout="mono") if audio is not None else None
        for i in range(frames):
            if cut_at is not None and i >= cut_at * FPS:
                if cut_to is None:
                    canvas = np.roll(other, i, axis=1)
                else:
                    scene = Image.fromarray(cut_to[i % len(cut_to)]).resize((WIDTH, HEIGHT))
                    canvas = np.asarray(scene)
            else:
                canvas = np.full((HEIGHT, WIDTH, 3), 110, np.uint8)
                for p in range(portraits):
                    dx = round(4 * np.sin(i / 9)) + (p * (side + 20)) + (WIDTH - portraits * (side + 20)) // 2
                    dy = round(3 * np.cos(i / 11)) + (HEIGHT - face.shape[0]) // 2
                    canvas[dy : dy + face.shape[0], dx : dx + face.shape[1]] = _open_mouth(face, labels, envelope[i])
                    if p == 0:
                        x0, y0, x1, y1 = labels["face"]
                        built.faces.append((x0 + dx, y0 + dy, x1 + dx, y1 + dy))
                        built.mouths.append((labels["mouth"][0] + dx, labels["mouth"][1] + dy))
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            for packet in video.encode(frame):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        if sound is not None and audio is not None:
            chunk = 1024
            for start in range(0, len(audio), chunk):
                piece = audio[start : start + chunk].astype(np.float32)[None]
                out = av.AudioFrame.from_ndarray(piece, format="flt", layout="mono")
                out.sample_rate, out.pts, out.time_base = RATE, start, Fraction(1, RATE)
                for packet in sound.encode(out):
                    container.mux(packet)
            for packet in sound.encode():
                container.mux(packet)
    return built


def _envelope(audio: np.ndarray, frames: int) -> np.ndarray:
    per = len(audio) / frames
    rms = np.array([np.sqrt(np.mean(audio[int(i * per) : int((i + 1) * per)] ** 2) + 1e-12) for i in range(frames)])
    return np.clip(rms / (rms.max() + 1e-9), 0, 1)


def _open_mouth(face: np.ndarray, labels: dict[str, list[float]], opening: float) -> np.ndarray:
    """The portrait with a dark ellipse at the mouth, as tall as ``opening`` (0..1) says."""
    out = face.copy()
    x0, y0, x1, y1 = labels["face"]
    mx, my = labels["mouth"]
    half_w, half_h = 0.18 * (x1 - x0), max(1.0, 0.08 * (y1 - y0) * opening)
    yy, xx = np.mgrid[0 : face.shape[0], 0 : face.shape[1]]
    inside = ((xx - mx) / half_w) ** 2 + ((yy - my) / half_h) ** 2 <= 1
    out[inside] = (out[inside] * 0.3).astype(np.uint8)
    return out


def tone(seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
