"""Benchmark of `ftalk prepare` in seconds of source processed per second per core, against a raw decode.

Sources: `--sources` talking videos of `--seconds` at `--size`, 25 fps H.264 with 48 kHz stereo AAC, built here from
the tests' committed fixtures (the astronaut portrait, 0.6 of the frame height, moving a few pixels over a textured
background, its mouth opening with the espeak-ng speech, tiled and shifted per source). At 1280x720 and 1920x1080
the 1:1 512 px crops need resizing and the clips run up to 10 s (250 frames), as on real data.

Rows, per `--repeats` (medians shown): the floor, one process decoding every frame of every source to rgb24 (PyAV,
`thread_type="AUTO"` as the pipeline decodes) and its audio; `prepare_dataset` with `workers=1` and `workers=2`
(fresh output each time; per core = source seconds / wall / workers). Stages: `prepare_source` once more per source,
in one process, with each stage function it calls wrapped in a timer, so the order and the calls are the product's
own: probe, audio decode, VAD, the analysis pass (one decode feeding the face detector every 4th frame and the
scene-cut scores), and clip writing (its frame decode, crop + resize, `write_mp4`, the clips' probe facts). Goal:
within 2x the decode floor.

Run from the repository root: ``.venv/bin/python -m bench.prepare`` (4 sources of 20 s at 1280x720), or
``.venv/bin/python -m bench.prepare --sources 2 --seconds 8 --size 640x360`` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import av
import numpy as np
import soundfile
import soxr
from PIL import Image
from rich.console import Console
from rich.table import Table

from fantasytalk_cli.prepare import faces, pipeline, shots, speech
from fantasytalk_cli.prepare.dataset import prepare_dataset
from fantasytalk_cli.prepare.pipeline import PrepareOptions, prepare_source
from fantasytalk_cli.prepare.sources import find_sources, probe_source

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "prepare"
FPS, SPEECH_RATE, AUDIO_RATE = 25, 16_000, 48_000
GOAL = 2.0
T = TypeVar("T")
STAGES: list[tuple[str, ModuleType, str]] = [
    ("probe", pipeline, "probe_source"),
    ("audio decode (load_audio_16k)", speech, "load_audio_16k"),
    ("VAD (speech_spans)", speech, "speech_spans"),
    ("analysis pass: decode (full + small)", pipeline, "_analysed"),
    ("analysis pass: detect_faces", faces, "detect_faces"),
    ("analysis pass: scene-cut scores", shots, "content_scores"),
    ("clip writing: decode", pipeline, "_frames"),
    ("clip writing: crop + resize", pipeline, "_crop"),
    ("clip writing: encode (write_mp4)", pipeline, "write_mp4"),
    ("probe facts", pipeline, "probe_video"),
    ("probe facts", pipeline, "probe_audio"),
]
GENERATORS = {"_analysed", "_frames"}
"""Generator stages: their time is what each `next()` takes (the analysis pass's includes `detect_faces`, and
`content_scores`' includes the analysis pass: both are made exclusive after the run)."""


def build_source(path: Path, width: int, height: int, seconds: float, seed: int) -> None:
    """A talking video from the fixtures (see the module docstring)."""
    labels = json.loads((FIXTURES / "portrait.json").read_text())
    portrait = Image.open(FIXTURES / "portrait.png").convert("RGB")
    side = 2 * round(0.3 * height)
    scale = side / portrait.width
    face = np.asarray(portrait.resize((side, round(portrait.height * scale)), Image.Resampling.LANCZOS))
    x0, y0, x1, _ = (v * scale for v in labels["face_box"])
    mx, my = (v * scale for v in labels["mouth"])
    yy, xx = np.mgrid[0 : face.shape[0], 0 : face.shape[1]]
    across = ((xx - mx) / (0.18 * (x1 - x0))) ** 2
    voice, _ = soundfile.read(FIXTURES / "speech.wav", dtype="float32")
    samples = round(seconds * SPEECH_RATE)
    voice = np.roll(np.tile(voice, -(-samples // len(voice)) + 1), -seed * 21_000)[:samples]
    frames = int(seconds * FPS)
    loud = np.array([np.sqrt(np.mean(c**2) + 1e-12) for c in np.array_split(voice, frames)])
    opening = np.clip(loud / loud.max(), 0, 1)
    rng = np.random.default_rng(seed)
    texture = Image.fromarray(rng.integers(60, 200, (height // 24, width // 24, 3), dtype=np.uint8))
    background = np.asarray(texture.resize((width, height), Image.Resampling.BICUBIC))
    wave = soxr.resample(voice, SPEECH_RATE, AUDIO_RATE, "HQ").astype(np.float32)
    stereo = np.stack([wave, 0.8 * wave])
    motion = height / 360
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=FPS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        sound = container.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        for i in range(frames):
            canvas = background.copy()
            dx = round(motion * 4 * np.sin(i / 9)) + (width - face.shape[1]) // 2
            dy = round(motion * 3 * np.cos(i / 11)) + (height - face.shape[0]) // 2
            half_h = max(1.0, 0.08 * (labels["face_box"][3] - labels["face_box"][1]) * scale * opening[i])
            mouth = face.copy()
            inside = across + ((yy - my) / half_h) ** 2 <= 1
            mouth[inside] = (mouth[inside] * 0.3).astype(np.uint8)
            canvas[dy : dy + face.shape[0], dx : dx + face.shape[1]] = mouth
            container.mux(video.encode(av.VideoFrame.from_ndarray(canvas, format="rgb24")))
        container.mux(video.encode())
        for start in range(0, stereo.shape[1], 1024):
            chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo[:, start : start + 1024]), "fltp", "stereo")
            chunk.sample_rate, chunk.pts, chunk.time_base = AUDIO_RATE, start, Fraction(1, AUDIO_RATE)
            container.mux(sound.encode(chunk))
        container.mux(sound.encode())


def cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the spawned pool's workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def decode_floor(paths: list[Path]) -> None:
    """Every video frame to rgb24 and every audio frame to samples, one pass per source."""
    for path in paths:
        with av.open(str(path)) as container:
            container.streams.video[0].thread_type = "AUTO"
            for frame in container.decode(video=0, audio=0):
                if isinstance(frame, av.VideoFrame):
                    frame.to_ndarray(format="rgb24")
                else:
                    frame.to_ndarray()


@contextmanager
def stage_timers(seconds: dict[str, float]) -> Iterator[None]:
    """Wrap each of `STAGES`' functions in its module so that its time adds to ``seconds[label]`` (a generator's:
    the time of its `next()` calls)."""
    originals = {(module, name): getattr(module, name) for _, module, name in STAGES}

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - started

        return call

    def generator(label: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def call(*args: Any, **kwargs: Any) -> Iterator[Any]:
            inner = fn(*args, **kwargs)
            while True:
                started = time.perf_counter()
                item = next(inner, None)
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - started
                if item is None:
                    return
                yield item

        return call

    for label, module, name in STAGES:
        wrap = generator if name in GENERATORS else timed
        setattr(module, name, wrap(label, originals[(module, name)]))
    try:
        yield
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)


def exclusive(seconds: dict[str, float]) -> dict[str, float]:
    """Nested stage times made exclusive: scores minus the pass feeding them, the pass minus its face detection."""
    out = dict(seconds)
    analysis, faces_s = "analysis pass: decode (full + small)", "analysis pass: detect_faces"
    out["analysis pass: scene-cut scores"] -= out[analysis]
    out[analysis] -= out[faces_s]
    return out


def run_stages(root: Path, out: Path, options: PrepareOptions) -> tuple[dict[str, float], float]:
    """Per-stage seconds of `prepare_source` over every source, and its total wall time."""
    seconds: dict[str, float] = {}
    total = 0.0
    for folder in ("clips", "wav", "tracks", pipeline.MARKERS):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for source in find_sources(root, out):
        started = time.perf_counter()
        with stage_timers(seconds):
            prepare_source(source, out, options)
        total += time.perf_counter() - started
    missing = {label for label, _, _ in STAGES} - set(seconds)
    if missing:
        raise RuntimeError(f"the pipeline no longer calls {sorted(missing)}: update bench/prepare.py's STAGES")
    return exclusive(seconds), total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each source")
    parser.add_argument("--size", choices=["640x360", "1280x720", "1920x1080"], default="1280x720")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    console, options = Console(width=160), PrepareOptions()
    with tempfile.TemporaryDirectory(prefix="ftalk-bench-prepare-") as tmp:
        root = Path(tmp) / "src"
        root.mkdir()
        started = time.perf_counter()
        paths = [root / f"talk_{i:02d}.mp4" for i in range(args.sources)]
        for i, path in enumerate(paths):
            build_source(path, width, height, args.seconds, seed=i)
        infos = [probe_source(p) for p in paths]
        source_s = sum(info.duration for info in infos if not isinstance(info, str))
        built = time.perf_counter() - started
        console.print(f"built {len(paths)} sources, {source_s:.1f} s at {args.size}, in {built:.0f} s")
        faces.detect_faces(np.zeros((height, width, 3), np.uint8))  # load the models outside the timings
        speech.speech_spans(np.zeros(SPEECH_RATE, np.float32))
        rows: dict[str, list[tuple[float, float]]] = {}
        stage_runs: list[dict[str, float]] = []
        stage_walls: list[float] = []
        clips = kept = 0.0
        for repeat in range(args.repeats):
            timed_row(rows, "decode floor (PyAV rgb24 + audio)", decode_floor, paths)
            for workers in (1, 2):
                out = Path(tmp) / f"out_w{workers}_{repeat}"
                setting = f"prepare, workers={workers}"
                report = timed_row(rows, setting, prepare_dataset, root, out, options, workers=workers)
                clips, kept = report.clips, report.kept_hours * 3600
            seconds, wall = run_stages(root, Path(tmp) / f"out_stages_{repeat}", options)
            stage_runs.append(seconds)
            stage_walls.append(wall)
    render(console, args, rows, stage_runs, stage_walls, source_s)
    console.print(f"clips per run: {clips:.0f}, {kept:.1f} s kept of {source_s:.1f} s; medians of {args.repeats}")


def timed_row(rows: dict[str, list[tuple[float, float]]], setting: str, fn: Callable[..., T], *args: Any,
              **kwargs: Any) -> T:  # fmt: skip
    """``fn(*args, **kwargs)``, its wall and CPU seconds appended to ``rows[setting]``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args, **kwargs)
    rows.setdefault(setting, []).append((time.perf_counter() - wall, cpu_seconds() - cpu))
    return result


def render(
    console: Console, args: argparse.Namespace, rows: dict[str, list[tuple[float, float]]],
    stage_runs: list[dict[str, float]], stage_walls: list[float], source_s: float,
) -> None:  # fmt: skip
    table = Table(title=f"prepare: {args.sources} sources x {args.seconds:g} s at {args.size}")
    columns = ("setting", "sources", "source s", "wall s", "source s per s per core", "ratio to floor", "CPU s",
               "ratio by CPU s")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column == "setting" else "right")
    floor = floor_cpu = None
    per_core: dict[str, float] = {}
    for setting, runs in rows.items():
        wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        cores = min(2, args.sources) if setting.endswith("=2") else 1
        per_core[setting] = source_s / wall / cores
        floor, floor_cpu = floor or per_core[setting], floor_cpu or cpu
        table.add_row(setting, str(args.sources), f"{source_s:.1f}", f"{wall:.2f}", f"{per_core[setting]:.2f}",
                      f"{floor / per_core[setting]:.2f}x", f"{cpu:.2f}", f"{cpu / floor_cpu:.2f}x")  # fmt: skip
    console.print(table)
    floor_wall = source_s / (floor or 1.0)
    stages = Table(title="stages of prepare_source (one process, wrapped stage functions)")
    for column in ("stage", "s", "share", "x floor wall"):
        stages.add_column(column, justify="left" if column == "stage" else "right")
    labels = list(dict.fromkeys(label for label, _, _ in STAGES))
    medians = {label: statistics.median(run[label] for run in stage_runs) for label in labels}
    total = statistics.median(stage_walls)
    medians["other (planning, wav/track/marker writes)"] = max(0.0, total - sum(medians.values()))
    for label, value in medians.items():
        stages.add_row(label, f"{value:.2f}", f"{value / total:.1%}", f"{value / floor_wall:.2f}")
    stages.add_row("total", f"{total:.2f}", "100%", f"{total / floor_wall:.2f}")
    console.print(stages)
    ratio = (floor or 0.0) / per_core["prepare, workers=1"]
    verdict = "[green]met[/]" if ratio <= GOAL else "[red]missed[/]"
    top = max(medians, key=lambda k: medians[k])
    console.print(f"goal: workers=1 within {GOAL:g}x the decode floor per core: {ratio:.2f}x, {verdict}; "
                  f"largest stage: {top} ({medians[top] / total:.0%})")  # fmt: skip


if __name__ == "__main__":
    main()
