"""The synthetic demo dataset: decodes as written, its mouth follows its audio, it is seeded, and it is written
atomically. The audio-to-mouth check measures both sides from the decoded files, not from what the writer says."""

from __future__ import annotations

import json
from pathlib import Path

import decord
import numpy as np
import pytest
import soundfile as sf
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.data import synthetic
from fantasytalk_cli.data.synthetic import (
    DEMO_AUDIO,
    DEMO_FPS,
    DEMO_SIZES,
    ClipInfo,
    DemoDataError,
    DemoDataReport,
    make_demo_dataset,
    write_talking_clip,
)
from fantasytalk_cli.data.tracks import read_track

DARK_LUMA = 60.0
"""Luma below which a decoded pixel counts as mouth (the mouth is the only dark thing in the lower half)."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoDataReport:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data", seed=0, num_clips=12)


def read_metadata(root: Path) -> list[dict[str, str]]:
    return json.loads((root / "metadata_control.json").read_text(encoding="utf-8"))


def hidden_siblings(root: Path) -> list[str]:
    return sorted(p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}."))


def decoded_mouth_area(video: Path) -> np.ndarray:
    """Per frame, the number of dark pixels in the lower half of the decoded frame."""
    reader = decord.VideoReader(str(video))
    frames = reader.get_batch(list(range(len(reader)))).asnumpy()
    lower = frames[:, frames.shape[1] // 2 :].astype(np.float64)
    luma = 0.299 * lower[..., 0] + 0.587 * lower[..., 1] + 0.114 * lower[..., 2]
    return (luma < DARK_LUMA).sum(axis=(1, 2)).astype(np.float64)


def wav_rms_per_frame(audio: Path, fps: float, num_frames: int) -> np.ndarray:
    """Per video frame, the RMS of the decoded wav (channels averaged) over that frame's time interval."""
    samples, rate = sf.read(str(audio), dtype="float64", always_2d=True)
    mono = samples.mean(axis=1)
    out = np.zeros(num_frames)
    for i in range(num_frames):
        chunk = mono[int(round(i * rate / fps)) : int(round((i + 1) * rate / fps))]
        out[i] = np.sqrt(np.mean(chunk**2)) if len(chunk) else 0.0
    return out


def test_layout_and_metadata_follow_the_seed_format(demo: DemoDataReport) -> None:
    entries = read_metadata(demo.out_dir)
    assert [e["file_path"] for e in entries] == [f"train/{i:08d}.mp4" for i in range(1, 13)]
    assert [e["audio_path"] for e in entries] == [f"wav/{i:08d}.wav" for i in range(1, 13)]
    for entry in entries:
        assert set(entry) == {"file_path", "audio_path", "text", "type", "track"}
        assert entry["track"] == entry["file_path"].replace("train/", "tracks/").replace(".mp4", ".json")
        assert entry["type"] == "video" and entry["text"].strip()
        assert (demo.out_dir / entry["file_path"]).is_file() and (demo.out_dir / entry["audio_path"]).is_file()
    assert entries == [clip.metadata_entry() for clip in demo.clips]
    assert len({e["text"] for e in entries}) > 6, "captions should vary"
    assert sorted(p.name for p in demo.out_dir.iterdir()) == ["metadata_control.json", "tracks", "train", "wav"]
    assert hidden_siblings(demo.out_dir) == []


def test_demo_mix_covers_every_shape_rate_and_audio_format(demo: DemoDataReport) -> None:
    infos = [clip.info for clip in demo.clips]
    assert {(i.width, i.height) for i in infos} == set(DEMO_SIZES)
    assert {w < h for w, h in DEMO_SIZES} == {True, False} and any(w == h for w, h in DEMO_SIZES)
    assert {(i.width, i.height, i.fps) for i in infos} >= {(w, h, f) for w, h in DEMO_SIZES for f in DEMO_FPS}
    assert {(i.sample_rate, i.channels) for i in infos} == {(16000, 1), (16000, 2), (44100, 1), (44100, 2)}
    assert set(DEMO_AUDIO) == {(i.sample_rate, i.channels) for i in infos}
    for info in infos:
        assert info.width % 16 == 0 and info.height % 16 == 0 and 128 <= max(info.width, info.height) <= 192
        assert 1.0 <= info.audio_seconds <= 6.0
    assert demo.total_seconds == pytest.approx(sum(i.num_frames / i.fps for i in infos))
    summary = demo.summary()
    assert str(demo.out_dir) in summary and "12 synthetic talking clips" in summary


def test_clips_decode_as_written(demo: DemoDataReport) -> None:
    for clip in demo.clips:
        info = clip.info
        reader = decord.VideoReader(str(demo.out_dir / clip.file_path))
        assert len(reader) == info.num_frames, clip.file_path
        assert reader.get_avg_fps() == pytest.approx(info.fps, abs=1e-6), clip.file_path
        assert reader[0].shape == (info.height, info.width, 3), clip.file_path
        wav = sf.info(str(demo.out_dir / clip.audio_path))
        assert (wav.samplerate, wav.channels, wav.subtype) == (info.sample_rate, info.channels, "PCM_16")
        assert wav.frames / wav.samplerate == pytest.approx(info.audio_seconds)
        assert abs(info.audio_seconds - info.video_seconds) < 1.0 / info.fps, "audio and video cover the same time"


def test_mouth_opening_follows_audio_loudness_in_every_clip(demo: DemoDataReport) -> None:
    for clip in demo.clips:
        area = decoded_mouth_area(demo.out_dir / clip.file_path)
        rms = wav_rms_per_frame(demo.out_dir / clip.audio_path, clip.info.fps, len(area))
        assert area.max() - area.min() > 50, f"{clip.file_path}: the mouth barely moves"
        r = float(np.corrcoef(area, rms)[0, 1])
        assert r > 0.8, f"{clip.file_path}: mouth area vs audio RMS correlation {r:.3f}"
        # The writer's own per-frame record agrees with what the files hold.
        assert np.corrcoef(area, clip.info.mouth_opening)[0, 1] > 0.95
        np.testing.assert_allclose(clip.info.audio_envelope, rms, atol=1e-3)


def test_tracks_hold_the_drawn_mouth_and_face(demo: DemoDataReport) -> None:
    """The track `make-demo-data` writes is where it drew: every dark-red mouth pixel of each decoded frame (below
    the face's centre, where no other feature is drawn) lies in that frame's mouth box (1 px of codec blur
    allowed), the box is prepare's size, and the face box holds it."""
    for clip in demo.clips:
        track = read_track(demo.out_dir / clip.track_path)
        assert (track.width, track.height) == (clip.info.width, clip.info.height)
        frames = decord.VideoReader(str(demo.out_dir / clip.file_path)).get_batch(range(clip.info.num_frames))
        assert len(track.mouth) == len(track.face) == clip.info.num_frames
        for i, frame in enumerate(frames.asnumpy().astype(int)):
            fx0, fy0, fx1, fy1 = track.face[i]
            lower = np.arange(frame.shape[0])[:, None] > (fy0 + fy1) / 2
            ys, xs = np.nonzero((np.abs(frame - (70, 15, 25)).sum(-1) < 40) & lower)
            x0, y0, x1, y1 = track.mouth[i]
            assert len(xs) > 0, f"{clip.file_path} frame {i}: no mouth drawn"
            assert x0 - 1 <= xs.min() and xs.max() <= x1 + 1 and y0 - 1 <= ys.min() and ys.max() <= y1 + 1, (
                f"{clip.file_path} frame {i}: mouth pixels outside the track's box"
            )
            assert x1 - x0 == pytest.approx(0.5 * (fx1 - fx0), abs=0.02)
            assert y1 - y0 == pytest.approx(0.35 * (fy1 - fy0), abs=0.02)
            assert fx0 <= x0 and x1 <= fx1 and fy0 <= y0 and y1 <= fy1


def test_audio_sounds_like_speech_with_pauses(demo: DemoDataReport) -> None:
    for clip in demo.clips:
        rms = np.asarray(clip.info.audio_envelope)
        assert (rms < 0.05 * rms.max()).any(), f"{clip.file_path}: no pause"
        assert (rms > 0.5 * rms.max()).mean() > 0.1, f"{clip.file_path}: hardly any loud frames"


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = make_demo_dataset(tmp_path / "a", seed=5, num_clips=4)
    b = make_demo_dataset(tmp_path / "b", seed=5, num_clips=4)
    c = make_demo_dataset(tmp_path / "c", seed=6, num_clips=4)
    assert read_metadata(a.out_dir) == read_metadata(b.out_dir)
    for clip in a.clips:
        for rel in (clip.audio_path, clip.file_path, clip.track_path):
            assert (a.out_dir / rel).read_bytes() == (b.out_dir / rel).read_bytes(), rel
    assert read_metadata(a.out_dir) != read_metadata(c.out_dir)
    for clip in a.clips:
        assert (a.out_dir / clip.audio_path).read_bytes() != (c.out_dir / clip.audio_path).read_bytes()


def test_refuses_a_non_empty_folder_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DemoDataError, match="--overwrite") as excinfo:
        make_demo_dataset(target, num_clips=1)
    assert str(target) in str(excinfo.value)
    # Even with overwrite, a folder that is not a dataset is not deleted.
    with pytest.raises(DemoDataError, match="metadata_control.json"):
        make_demo_dataset(target, num_clips=1, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert hidden_siblings(target) == []


def test_overwrite_replaces_a_dataset_and_an_empty_folder_is_used(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.mkdir()
    make_demo_dataset(target, seed=1, num_clips=2)
    (target / "stale.txt").write_text("old run")
    with pytest.raises(DemoDataError):
        make_demo_dataset(target, seed=2, num_clips=3)
    report = make_demo_dataset(target, seed=2, num_clips=3, overwrite=True)
    assert read_metadata(target) == [clip.metadata_entry() for clip in report.clips]
    assert not (target / "stale.txt").exists()
    assert len(list((target / "train").iterdir())) == 3
    assert hidden_siblings(target) == []
    assert target.stat().st_mode & 0o755 == 0o755, "the dataset folder gets ordinary permissions"


def test_a_failure_leaves_the_previous_dataset_and_no_temp_folder(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "data"
    make_demo_dataset(target, seed=1, num_clips=2)
    before = read_metadata(target)
    calls = []

    def fail_on_second(*args, **kwargs) -> ClipInfo:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return write_talking_clip(*args, **kwargs)

    monkeypatch.setattr(synthetic, "write_talking_clip", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        make_demo_dataset(target, seed=2, num_clips=3, overwrite=True)
    assert read_metadata(target) == before
    assert hidden_siblings(target) == []


def test_a_file_in_the_way_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "data"
    target.write_text("not a folder")
    with pytest.raises(DemoDataError, match="not a folder"):
        make_demo_dataset(target, num_clips=1, overwrite=True)


@pytest.mark.parametrize(
    ("codec", "fps", "sample_rate", "channels"),
    [("mpeg4", 29.97, 22050, 6), ("libx264", 12.5, 8000, 1)],
)
def test_write_talking_clip_odd_formats(
    tmp_path: Path, codec: str, fps: float, sample_rate: int, channels: int
) -> None:
    info = write_talking_clip(
        tmp_path / "v" / "odd.mp4",
        tmp_path / "a" / "odd.wav",
        width=64,
        height=48,
        fps=fps,
        seconds=1.3,
        sample_rate=sample_rate,
        channels=channels,
        seed=9,
        codec=codec,
    )
    reader = decord.VideoReader(str(tmp_path / "v" / "odd.mp4"))
    assert (len(reader), reader[0].shape) == (info.num_frames, (48, 64, 3)) == (round(1.3 * fps), (48, 64, 3))
    assert reader.get_avg_fps() == pytest.approx(fps, abs=1e-6)
    wav = sf.info(str(tmp_path / "a" / "odd.wav"))
    assert (wav.samplerate, wav.channels, wav.frames) == (sample_rate, channels, round(1.3 * sample_rate))
    assert info.codec == codec and len(info.mouth_opening) == len(info.audio_envelope) == info.num_frames
    assert info.probe_facts().num_frames == info.num_frames


def test_write_talking_clip_rejects_sizes_it_cannot_encode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="even"):
        write_talking_clip(tmp_path / "x.mp4", tmp_path / "x.wav", width=65, height=48, fps=25, seconds=1)
    with pytest.raises(ValueError, match="fps"):
        write_talking_clip(tmp_path / "x.mp4", tmp_path / "x.wav", width=64, height=48, fps=0, seconds=1)
    assert not (tmp_path / "x.mp4").exists()


def test_cli_make_demo_data(tmp_path: Path) -> None:
    target = tmp_path / "cli"
    runner = CliRunner()
    result = runner.invoke(app, ["make-demo-data", str(target), "--seed", "3", "--num-clips", "4"])
    assert result.exit_code == 0, result.output
    assert "4 synthetic talking clips" in result.output
    assert len(read_metadata(target)) == 4
    assert sorted(p.name for p in (target / "wav").iterdir()) == [f"{i:08d}.wav" for i in range(1, 5)]
    again = runner.invoke(app, ["make-demo-data", str(target), "--seed", "3", "--num-clips", "4"])
    assert again.exit_code == 2
    assert "--overwrite" in again.output
    replaced = runner.invoke(app, ["make-demo-data", str(target), "--seed", "4", "--num-clips", "2", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert len(read_metadata(target)) == 2
