"""write_mp4 / read_mp4 / frame_strip on tiny real files: facts and pixels survive the round trip, the audio
track lasts as long as the video whatever the source's rate, channels and length, and a failed write leaves
what was there before."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.sample.video_io import VideoWriteError, frame_strip, read_mp4, write_mp4


def smooth_frames(num_frames: int = 24, height: int = 48, width: int = 64) -> np.ndarray:
    """Gradients that drift from frame to frame: content H.264 keeps within a few levels at crf 18."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for i in range(num_frames):
        phase = i / num_frames
        out[i, ..., 0] = 60 + 120 * x / width + 30 * phase
        out[i, ..., 1] = 50 + 100 * y / height
        out[i, ..., 2] = 128 + 60 * np.sin(2 * np.pi * (x / width + y / height + phase))
    return out


def write_tone(path: Path, sample_rate: int, channels: int, seconds: float) -> Path:
    """A quiet 440 Hz tone (each channel a different level) written with soundfile."""
    t = np.arange(round(sample_rate * seconds)) / sample_rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    sf.write(path, np.stack([tone * (1 - 0.1 * c) for c in range(channels)], axis=-1), sample_rate)
    return path


def audio_stream_format(path: Path) -> tuple[int, int]:
    """(sample rate, channels) of the mp4's audio stream."""
    with av.open(str(path)) as container:
        ctx = container.streams.audio[0].codec_context
        return ctx.sample_rate, ctx.channels


@pytest.mark.parametrize("fps", [23, 30000 / 1001])
def test_frames_fps_and_size_round_trip(tmp_path: Path, fps: float) -> None:
    frames = smooth_frames()
    written = write_mp4(frames, fps, tmp_path / "clip.mp4")
    decoded, read = read_mp4(tmp_path / "clip.mp4")

    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert (read.frames, read.width, read.height) == (24, 64, 48)
    assert Fraction(read.fps).limit_denominator(1001) == Fraction(fps).limit_denominator(1001)
    assert read.video_seconds == pytest.approx(24 / fps, abs=1e-9)
    assert read.audio_seconds is None
    assert written == read  # write_mp4 reports what the file holds
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 3


@pytest.mark.parametrize(
    ("sample_rate", "channels", "seconds", "fps", "stored"),
    [
        (16000, 1, 2.0, 23, (16000, 1)),  # longer than the video: cut
        (16000, 1, 0.4, 23, (16000, 1)),  # shorter: padded with silence
        (44100, 2, 2.0, 25, (44100, 2)),
        (44100, 2, 0.5, 23, (44100, 2)),
        (48000, 6, 2.0, 23, (48000, 2)),  # 5.1 is mixed down to stereo
        (37800, 1, 2.0, 25, (48000, 1)),  # a rate AAC cannot carry is resampled
    ],
)
def test_audio_lasts_as_long_as_the_video(
    tmp_path: Path, sample_rate: int, channels: int, seconds: float, fps: int, stored: tuple[int, int]
) -> None:
    audio = write_tone(tmp_path / "speech.wav", sample_rate, channels, seconds)
    written = write_mp4(smooth_frames(16, 32, 32), fps, tmp_path / "clip.mp4", audio_path=audio)
    _, read = read_mp4(tmp_path / "clip.mp4")

    video_seconds = 16 / fps
    assert read.video_seconds == pytest.approx(video_seconds)
    assert read.audio_seconds is not None and written.audio_seconds is not None
    # AAC pads its last 1024-sample frame; read_mp4 stops where the packets say the track ends
    assert abs(read.audio_seconds - video_seconds) < 1 / fps
    assert abs(written.audio_seconds - video_seconds) < 1 / fps
    assert written.audio_padded_seconds == pytest.approx(max(0.0, video_seconds - seconds), abs=1e-3)
    assert audio_stream_format(tmp_path / "clip.mp4") == stored


def test_audio_starts_with_the_first_frame(tmp_path: Path) -> None:
    """A click at 0.5 s is heard at 0.5 s: the AAC encoder's priming samples are not left in front of it."""
    rate = 16000
    signal = np.zeros(rate, dtype=np.float32)
    signal[rate // 2 : rate // 2 + 160] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(160) / rate)
    sf.write(tmp_path / "click.wav", signal, rate)
    write_mp4(smooth_frames(25, 32, 32), 25, tmp_path / "clip.mp4", audio_path=tmp_path / "click.wav")

    with av.open(str(tmp_path / "clip.mp4")) as container:
        decoded = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)])
    loudest = int(np.argmax(np.convolve(np.abs(decoded), np.ones(160), mode="valid")))
    assert abs(loudest - rate // 2) < rate // 1000  # within 1 ms


def test_unreadable_audio_leaves_the_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    out.write_bytes(b"the previous sample")
    bad = tmp_path / "speech.wav"
    bad.write_text("not audio")

    with pytest.raises(VideoWriteError) as caught:
        write_mp4(smooth_frames(), 23, out, audio_path=bad)
    assert str(out) in str(caught.value) and str(bad) in str(caught.value)
    assert isinstance(caught.value, FtalkError)
    assert out.read_bytes() == b"the previous sample"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "speech.wav"]


def test_missing_audio_names_it(tmp_path: Path) -> None:
    with pytest.raises(VideoWriteError, match="nowhere.wav"):
        write_mp4(smooth_frames(), 23, tmp_path / "clip.mp4", audio_path=tmp_path / "nowhere.wav")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("frames", "says"),
    [
        (smooth_frames().astype(np.float32), "uint8"),
        (smooth_frames()[0], r"\[frames, height, width, 3\]"),
        (np.zeros((4, 32, 32, 4), dtype=np.uint8), r"\[frames, height, width, 3\]"),
        (np.zeros((4, 32, 33, 3), dtype=np.uint8), "even width and height"),
        (np.zeros((0, 32, 32, 3), dtype=np.uint8), "no picture"),
    ],
)
def test_bad_frames_are_refused_before_writing(tmp_path: Path, frames: np.ndarray, says: str) -> None:
    with pytest.raises(VideoWriteError, match=says):
        write_mp4(frames, 25, tmp_path / "clip.mp4")
    assert list(tmp_path.iterdir()) == []


def test_bad_fps_crf_and_folder_target_are_refused(tmp_path: Path) -> None:
    with pytest.raises(VideoWriteError, match="fps"):
        write_mp4(smooth_frames(), 0, tmp_path / "clip.mp4")
    with pytest.raises(VideoWriteError, match="crf"):
        write_mp4(smooth_frames(), 25, tmp_path / "clip.mp4", crf=60)
    with pytest.raises(VideoWriteError, match="is a folder"):
        write_mp4(smooth_frames(), 25, tmp_path)
    assert list(tmp_path.iterdir()) == []


_FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    from pathlib import Path
    import numpy as np
    from fantasytalk_cli.sample.video_io import VideoWriteError, write_mp4

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    noise = np.random.default_rng(0).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)  # far over 4 KiB as H.264
    try:
        write_mp4(noise, 25, Path(sys.argv[1]))
    except VideoWriteError as exc:
        print(exc)
    else:
        sys.exit("write_mp4 succeeded past the file size limit")
    """
)


@pytest.fixture(scope="module")
def full_disk_write(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A write that fails half way (the file size limit stands in for a full disk), over an existing file."""
    folder = tmp_path_factory.mktemp("full_disk")
    (folder / "clip.mp4").write_bytes(b"the previous sample")
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(folder / "clip.mp4")], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return folder, run.stdout


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_write_failing_half_way_keeps_the_existing_file(full_disk_write: tuple[Path, str]) -> None:
    folder, message = full_disk_write
    assert str(folder / "clip.mp4") in message and "File too large" in message
    assert (folder / "clip.mp4").read_bytes() == b"the previous sample"


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_write_failing_half_way_leaves_no_temp_file(full_disk_write: tuple[Path, str]) -> None:
    folder, _ = full_disk_write
    assert [p.name for p in folder.iterdir()] == ["clip.mp4"]


def test_frame_strip_size_and_content(tmp_path: Path) -> None:
    frames = smooth_frames(24, 48, 64)
    path = frame_strip(frames, tmp_path / "strip.png", count=8, height=32)

    assert path == tmp_path / "strip.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (8 * 43, 32)  # 64 * 32 / 48 = 42.7 -> 43 per frame
        strip = np.asarray(image.convert("RGB"), dtype=np.float32)
    first, last = strip[:, :43], strip[:, -43:]
    assert np.abs(first.mean(axis=(0, 1)) - frames[0].mean(axis=(0, 1))).max() < 2
    assert np.abs(last.mean(axis=(0, 1)) - frames[-1].mean(axis=(0, 1))).max() < 2
    assert [p.name for p in tmp_path.iterdir()] == ["strip.png"]


def test_frame_strip_of_a_short_video_holds_each_frame_once(tmp_path: Path) -> None:
    path = frame_strip(smooth_frames(5, 32, 32), tmp_path / "strip.png", count=8, height=16)
    with Image.open(path) as image:
        assert image.size == (5 * 16, 16)
