"""`ftalk prepare` end to end on videos built from real fixtures (the astronaut portrait, espeak-ng speech): the
talking cases become clips whose face box is where the face is and whose mouth region covers the mouth; every other
case is dropped or split with its reason; the folder validates with no error and trains with the README's recipe
arguments; a killed run reruns to the same output; two ranks merge the same metadata as one."""

from __future__ import annotations

import json
import math
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.data.synthetic import METADATA_NAME
from fantasytalk_cli.data.tracks import read_track
from fantasytalk_cli.prepare.dataset import REPORT_NAME, SHEET_NAME, prepare_dataset
from fantasytalk_cli.prepare.pipeline import MARKERS, PrepareOptions
from fantasytalk_cli.runtime.world import World
from tests.prepare_videos import Built, build, speech, tone
from tests.test_raw_metadata import SCALE_DOWN
from tests.test_surface import readme_ftalk_args

REPO = Path(__file__).resolve().parents[1]
OPTIONS = PrepareOptions(size=128, min_seconds=3.0)
FLAGS = ["--size", "128", "--min_seconds", "3"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    src = tmp_path_factory.mktemp("sources")
    voice = speech()
    silence = voice * 0
    return {
        "talking": build(src / "a_talking.mp4", audio=voice),
        "two_faces": build(src / "b_two_faces.mp4", audio=voice, portraits=2, side=200),
        "silent": build(src / "c_silent.mp4", audio=silence),
        "tone": build(src / "d_tone.mp4", audio=tone(len(voice) / 16000)),
        "cut": build(src / "e_cut.mp4", audio=voice, cut_at=4.5, cut_to=_demo_frames(tmp_path_factory)),
        "no_audio": build(src / "f_no_audio.mp4", audio=None, seconds=4.0),
        "small": build(src / "g_small.mp4", audio=voice, side=110),  # found, but 12% of the frame height
    }


def _demo_frames(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The frames of one of the demo's synthetic talking clips (`make-demo-data`): the scene cut to."""
    from fantasytalk_cli.data.synthetic import make_demo_dataset

    folder = tmp_path_factory.mktemp("demo")
    make_demo_dataset(folder / "data", num_clips=1)
    (clip,) = sorted((folder / "data").rglob("*.mp4"))
    with av.open(str(clip)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def prepared(cases: dict[str, Built], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "dataset"
    src = cases["talking"].path.parent
    result = CliRunner().invoke(app, ["prepare", str(src), str(out), *FLAGS])
    assert result.exit_code == 0, result.output
    assert "kept" in result.output and "two-faces" in result.output
    return out


def _entries(out: Path) -> list[dict]:
    return json.loads((out / METADATA_NAME).read_text())


def _tracks(out: Path, source: Path) -> list[dict]:
    found = []
    for entry in _entries(out):
        track = json.loads((out / entry["track"]).read_text())
        if track["source"] == str(source):
            found.append(track)
    return found


def _in_clip(box: tuple[float, ...], track: dict) -> tuple[float, ...]:
    """A source-frame box (or point) in the clip's pixels, through the clip's crop."""
    x0, y0, width, height = track["crop"]
    sx, sy = track["width"] / width, track["height"] / height
    return tuple((v - (x0 if i % 2 == 0 else y0)) * (sx if i % 2 == 0 else sy) for i, v in enumerate(box))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["talking", "cut"])
def test_talking_cases_become_clips_with_the_face_and_mouth_where_they_are(
    prepared: Path, cases: dict[str, Built], case: str
) -> None:
    built = cases[case]
    (track,) = _tracks(prepared, built.path)
    (entry,) = [e for e in _entries(prepared) if json.loads((prepared / e["track"]).read_text()) == track]
    assert len(read_track(prepared / entry["track"]).mouth) == len(track["face"])  # what stage 2 reads
    first = round(track["source_start"] * 25)
    frames = len(track["face"])
    assert frames >= 3.0 * 25
    if case == "cut":  # the clip ends at the cut (frame 113, the first of the new scene): no clip spans it
        assert first + frames <= math.ceil(4.5 * 25)
    for k in range(0, frames, 10):
        known = _in_clip(built.faces[first + k], track)
        got = track["face"][k]
        size = known[3] - known[1]  # the position within 10% of the face's size; the size within 25%
        centre = ((got[0] + got[2] - known[0] - known[2]) / 2, (got[1] + got[3] - known[1] - known[3]) / 2)
        assert max(abs(c) for c in centre) <= 0.1 * size, (k, got, known)
        assert abs((got[3] - got[1]) - size) <= 0.25 * size, (k, got, known)
        mx, my = _in_clip(built.mouths[first + k], track)
        m0, m1, m2, m3 = track["mouth"][k]
        assert m0 <= mx <= m2 and m1 <= my <= m3, (k, track["mouth"][k], (mx, my))


@pytest.mark.slow
def test_every_other_case_is_dropped_with_its_reason(prepared: Path, cases: dict[str, Built]) -> None:
    report = json.loads((prepared / REPORT_NAME).read_text())
    assert report["clips"] == 2 and report["sources"] == 7
    dropped = report["dropped_hours"]
    for reason in ("two-faces", "little-speech", "face-too-small", "no-face"):
        assert dropped.get(reason, 0) > 0, (reason, dropped)
    assert report["dropped_sources"] == {"no-audio-stream": 1}
    for case in ("two_faces", "silent", "tone", "no_audio", "small"):
        assert not _tracks(prepared, cases[case].path), case
    # every second of the talking sources is kept or accounted to a reason
    assert (prepared / SHEET_NAME).is_file()
    for case in ("two_faces", "silent", "tone", "small"):
        assert cases[case].path.stat().st_size > 0  # sources are never modified


@pytest.mark.slow
def test_the_prepared_folder_validates_and_trains_with_the_recipe_arguments(
    prepared: Path, tiny_world: dict, tmp_path: Path
) -> None:
    meta = prepared / METADATA_NAME
    entries = _entries(prepared)
    assert all(set(e) >= {"file_path", "audio_path", "text", "type", "probe", "track"} for e in entries)
    result = CliRunner().invoke(app, ["validate-metadata", str(meta), *SCALE_DOWN[:3]])
    assert result.exit_code == 0, result.output
    assert "0 errors, 0 warnings" in result.output, result.output
    values = {
        "$MODEL_NAME": str(tiny_world["model"]),
        "$DATASET_NAME": str(prepared),
        "$DATASET_META_NAME": str(meta),
        "models/FantasyTalking/fantasytalking_model.ckpt": str(tiny_world["model"] / "fantasytalking_model.ckpt"),
    }
    args = []
    for arg in readme_ftalk_args():
        for name, value in values.items():
            arg = arg.replace(name, value)
        args.append(arg)
    cmd = [sys.executable, "-m", "fantasytalk_cli", "train", *args, *SCALE_DOWN, f"--output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, shlex.join(cmd) + "\n" + proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoint-2" / "meta.json").is_file()


@pytest.mark.slow
def test_a_killed_prepare_reruns_to_the_same_output_and_two_ranks_merge_the_same(
    prepared: Path, cases: dict[str, Built], tmp_path: Path
) -> None:
    src = cases["talking"].path.parent
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fantasytalk_cli", "prepare", str(src), str(out), *FLAGS]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list((out / MARKERS).glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / METADATA_NAME).exists()
    leftovers = [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name]
    for path in leftovers:
        path.unlink()  # a killed atomic write leaves only its hidden temporary, never a partial clip
    result = CliRunner().invoke(app, ["prepare", str(src), str(out), *FLAGS, "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert "already done" in result.output  # and 2 worker processes give the bytes 1 gives
    assert (out / METADATA_NAME).read_bytes() == (prepared / METADATA_NAME).read_bytes()
    for entry in _entries(prepared):
        for key in ("file_path", "audio_path", "track"):
            assert (out / entry[key]).read_bytes() == (prepared / entry[key]).read_bytes(), entry[key]
    ranks = tmp_path / "ranks"
    for rank in (0, 1):
        report = prepare_dataset(src, ranks, OPTIONS, world=World(dp_rank=rank, dp_size=2, local_rank=rank))
        assert report.merged == (rank == 1)
    assert (ranks / METADATA_NAME).read_bytes() == (prepared / METADATA_NAME).read_bytes()


def test_bad_arguments_are_refused_before_anything_runs(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["prepare", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "no such folder or list file" in result.output
    result = CliRunner().invoke(app, ["prepare", str(tmp_path), str(tmp_path / "out"), "--aspect", "4:3"])
    assert result.exit_code == 2 and "choose keep, 1:1, 9:16, 16:9" in result.output


@pytest.mark.slow
def test_a_broken_source_is_dropped_and_counted_once(
    cases: dict[str, Built], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fantasytalk_cli.prepare.speech as speech_stage

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(cases["talking"].path, src / "talking.mp4")
    data = cases["talking"].path.read_bytes()
    (src / "truncated.mp4").write_bytes(data[: len(data) // 2])  # the index (moov) is at the end: unreadable
    calls = []

    def failing(audio: object, **kwargs: object) -> list:
        calls.append(1)
        raise RuntimeError("a decoder gave up part-way")

    monkeypatch.setattr(speech_stage, "speech_spans", failing)
    first = prepare_dataset(src, tmp_path / "out", OPTIONS)
    assert first.dropped_sources == {"broken": 1, "unreadable": 1} and first.clips == 0
    assert "a decoder gave up part-way" in next(iter(first.broken.values()))
    again = prepare_dataset(src, tmp_path / "out", OPTIONS)
    assert len(calls) == 1 and again.dropped_sources == first.dropped_sources  # not retried
    assert not list((tmp_path / "out" / "clips").iterdir())


@pytest.mark.slow
def test_fps_and_aspect_resample_and_crop_as_asked(cases: dict[str, Built], tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(cases["talking"].path, src / "talking.mp4")
    (src / "talking.txt").write_text("An astronaut talks about her mission.\n")
    report = prepare_dataset(src, tmp_path / "out", PrepareOptions(size=128, min_seconds=3.0, fps=12.5, aspect="9:16"))
    (entry,) = _entries(tmp_path / "out")
    probe = entry["probe"]
    assert entry["text"] == "An astronaut talks about her mission." and report.clips == 1
    assert probe["fps"] == 12.5 and probe["width"] == 128 and abs(probe["height"] / 128 - 16 / 9) < 0.02
    assert abs(probe["audio_duration"] - probe["num_frames"] / 12.5) < 1e-3  # the wav is exactly the clip
    track = json.loads((tmp_path / "out" / entry["track"]).read_text())
    assert len(track["face"]) == probe["num_frames"] and track["fps"] == 12.5
    for k in range(0, len(track["face"]), 5):
        known = _in_clip(cases["talking"].faces[round((track["source_start"] + k / 12.5) * 25)], track)
        got, size = track["face"][k], known[3] - known[1]
        assert abs((got[0] + got[2] - known[0] - known[2]) / 2) <= 0.1 * size, (k, got, known)
