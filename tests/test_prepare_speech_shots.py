"""`ftalk prepare`'s speech and shot stages: Silero VAD on real (espeak-ng) speech, PyAV audio decoding, and
content-based cuts on synthetic videos, checked against the known answer and, where installed, against
Silero's and PySceneDetect's own implementations."""

from __future__ import annotations

import json
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile
import soxr
import torch

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.prepare import shots, speech
from fantasytalk_cli.prepare.shots import content_scores, cuts_from_scores, rgb_to_hsv, scene_cuts
from fantasytalk_cli.prepare.speech import (
    NoAudioStreamError,
    SileroVadMissingError,
    load_audio_16k,
    spans_from_probabilities,
    speech_ratio,
    speech_spans,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "prepare"
RATE = 16_000
FPS = 25


@pytest.fixture(scope="module")
def spoken() -> tuple[np.ndarray, dict[str, float]]:
    samples, rate = soundfile.read(FIXTURES / "speech.wav", dtype="float32")
    assert rate == RATE and samples.ndim == 1
    return samples, json.loads((FIXTURES / "speech.json").read_text())


def _noisy(samples: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    rms = float(np.sqrt(np.mean(samples[RATE:-RATE] ** 2)))  # the speech part: the fixture pads 1 s each side
    noise = np.random.default_rng(seed).standard_normal(samples.size) * rms / 10 ** (snr_db / 20)
    return (samples + noise).astype(np.float32)


# ---------------------------------------------------------------------------------------------- speech (VAD)


def test_vad_finds_the_spoken_sentence(spoken: tuple[np.ndarray, dict[str, float]]) -> None:
    samples, truth = spoken
    spans = speech_spans(samples)
    start, end = truth["speech_start_s"], truth["speech_end_s"]
    assert 1 <= len(spans) <= 3, spans  # "Hello there." and the rest of the sentence
    assert abs(spans[0][0] - start) < 0.2 and abs(spans[-1][1] - end) < 0.2, spans
    assert speech_ratio(spans, start, end) > 0.8
    assert speech_ratio(spans, 0.0, start - 0.2) == 0.0  # the padding is exact silence
    assert all(a < b <= c for (a, b), (c, _) in zip(spans, spans[1:], strict=False))


def test_vad_finds_nothing_in_silence_or_a_tone(spoken: tuple[np.ndarray, dict[str, float]]) -> None:
    n = spoken[0].size
    t = np.arange(n) / RATE
    assert speech_spans(np.zeros(n, np.float32)) == []
    assert speech_spans((0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)) == []  # Silero: p < 0.01
    assert speech_spans(np.zeros(0, np.float32)) == []


@pytest.mark.parametrize("snr_db", [10.0, 5.0])
def test_vad_finds_speech_in_noise(spoken: tuple[np.ndarray, dict[str, float]], snr_db: float) -> None:
    samples, truth = spoken
    spans = speech_spans(_noisy(samples, snr_db))
    start, end = truth["speech_start_s"], truth["speech_end_s"]
    assert speech_ratio(spans, start, end) > 0.8
    assert speech_ratio(spans, 0.0, start - 0.2) < 0.3


def test_our_pass_matches_silero_get_speech_timestamps(spoken: tuple[np.ndarray, dict[str, float]]) -> None:
    threads = torch.get_num_threads()
    silero = pytest.importorskip("silero_vad")  # its import sets torch to one thread for the process
    torch.set_num_threads(threads)
    model = silero.load_silero_vad()
    torch.set_num_threads(threads)
    for audio in (spoken[0], _noisy(spoken[0], 5.0)):
        theirs = silero.get_speech_timestamps(torch.from_numpy(audio), model)
        ours = speech_spans(audio)
        assert [(round(a * RATE), round(b * RATE)) for a, b in ours] == [(d["start"], d["end"]) for d in theirs]


def test_span_rules_hysteresis_minimums_and_padding() -> None:
    window = speech.WINDOW / RATE  # 32 ms
    n = 40 * speech.WINDOW
    # speech at 5..15, a dip into the undecided band (0.4 > 0.35) at 15..20 that must not close it,
    # then 2 quiet windows (64 ms < 100 ms) that must not close it either, then a real pause from 24
    probs = np.zeros(40)
    probs[5:15], probs[15:20], probs[20:22], probs[22:24] = 0.9, 0.4, 0.1, 0.9
    assert spans_from_probabilities(probs, n_samples=n, pad_ms=0) == [(5 * window, 24 * window)]
    # a 7-window burst (224 ms) is not longer than 250 ms: dropped
    short = np.zeros(40)
    short[10:17] = 0.9
    assert spans_from_probabilities(short, n_samples=n) == []
    # spans one window (32 ms) apart share the gap instead of overlapping; padding stops at the audio's ends
    two = np.zeros(40)
    two[0:10], two[11:40] = 0.9, 0.9
    spans = spans_from_probabilities(two, n_samples=n, min_silence_ms=0)
    assert spans[0][0] == 0.0 and spans[-1][1] == n / RATE
    assert spans[0][1] == pytest.approx(spans[1][0]) == pytest.approx(10.5 * window)
    # a wider gap (4 windows, 128 ms): each side gets the full 30 ms
    two[10:14] = 0.0
    spans = spans_from_probabilities(two, n_samples=n, min_silence_ms=50)
    assert spans[0][1] == pytest.approx(10 * window + 0.03) and spans[1][0] == pytest.approx(14 * window - 0.03)
    with pytest.raises(ValueError, match="threshold"):
        spans_from_probabilities(two, n_samples=n, threshold=1.5)


def test_speech_ratio() -> None:
    assert speech_ratio([(0.0, 1.0), (2.0, 3.0)], 0.5, 2.5) == pytest.approx(0.5)
    assert speech_ratio([(0.0, 2.0), (1.0, 3.0)], 0.0, 4.0) == pytest.approx(0.75)  # overlap counted once
    assert speech_ratio([(5.0, 6.0)], 0.0, 4.0) == 0.0
    with pytest.raises(ValueError, match="end > start"):
        speech_ratio([], 2.0, 2.0)


def test_vad_rejects_stereo_or_integer_audio() -> None:
    with pytest.raises(ValueError, match="1-D mono"):
        speech_spans(np.zeros((2, 16000), np.float32))
    with pytest.raises(ValueError, match="float"):
        speech_spans(np.zeros(16000, np.int16))


def test_missing_silero_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = speech.importlib.util.find_spec
    monkeypatch.setattr(speech.importlib.util, "find_spec", lambda name: None if name == "silero_vad" else real(name))
    speech._load_model.cache_clear()
    try:
        with pytest.raises(SileroVadMissingError, match="pip install silero-vad") as caught:
            speech_spans(np.zeros(RATE, np.float32))
        assert isinstance(caught.value, FtalkError)
    finally:
        speech._load_model.cache_clear()


# ---------------------------------------------------------------------------------------------- audio decoding


def _write_video(
    path: Path, frames: Iterator[np.ndarray], *, audio: np.ndarray | None = None, rate: int = 48_000
) -> None:
    """H.264 video (near lossless) and, given `audio` (channels, samples), stereo AAC at `rate`."""
    with av.open(str(path), mode="w") as container:
        first = next(frames)
        video = container.add_stream("libx264", rate=FPS, options={"crf": "12", "preset": "veryfast"})
        video.height, video.width = first.shape[:2]
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=rate, layout="stereo") if audio is not None else None
        for image in (first, *frames):
            container.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video.encode())
        if sound is not None and audio is not None:
            for at in range(0, audio.shape[1], 1024):
                chunk = av.AudioFrame.from_ndarray(
                    np.ascontiguousarray(audio[:, at : at + 1024]), format="fltp", layout="stereo"
                )
                chunk.sample_rate, chunk.pts, chunk.time_base = rate, at, Fraction(1, rate)
                container.mux(sound.encode(chunk))
            container.mux(sound.encode())


def _solid(color: tuple[int, int, int], count: int, size: tuple[int, int] = (96, 160)) -> Iterator[np.ndarray]:
    for _ in range(count):
        yield np.full((*size, 3), color, np.uint8)


def test_load_audio_16k_mixes_and_resamples(tmp_path: Path, spoken: tuple[np.ndarray, dict[str, float]]) -> None:
    source = soxr.resample(spoken[0], RATE, 48_000, "HQ").astype(np.float32)
    stereo = np.stack([source, 0.5 * source]).astype(np.float32)  # mono mix = 0.75 * source
    seconds = source.size / 48_000
    path = tmp_path / "talk.mp4"
    _write_video(path, _solid((90, 90, 90), round(seconds * FPS)), audio=stereo)
    mixed = load_audio_16k(path)
    assert mixed.dtype == np.float32 and mixed.ndim == 1
    assert abs(mixed.size - spoken[0].size) <= 1024 * RATE // 48_000 + 16  # AAC ends on a whole frame
    n = min(mixed.size, spoken[0].size)
    assert np.corrcoef(mixed[:n], spoken[0][:n])[0, 1] > 0.97
    assert float(np.sqrt(np.mean(mixed[:n] ** 2)) / np.sqrt(np.mean(spoken[0][:n] ** 2))) == pytest.approx(0.75, 0.05)
    with av.open(str(path)) as container:  # an open container works too
        assert np.array_equal(load_audio_16k(container), mixed)
    spans = speech_spans(mixed)
    assert speech_ratio(spans, spoken[1]["speech_start_s"], spoken[1]["speech_end_s"]) > 0.8


def test_video_without_sound_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mute.mp4"
    _write_video(path, _solid((90, 90, 90), 10))
    with pytest.raises(NoAudioStreamError, match="mute.mp4") as caught:
        load_audio_16k(path)
    assert isinstance(caught.value, FtalkError)


# ---------------------------------------------------------------------------------------------- shots


def _shot_frames(lengths: list[int], size: tuple[int, int]) -> Iterator[np.ndarray]:
    """Shots of `lengths` frames, cycling through five looks that each move or fade within the shot:
    a moving square, a panning colour gradient, a slow brightness ramp, a block texture, a fade out."""
    height, width = size
    yy, xx = np.mgrid[0:height, 0:width]
    blocks = np.random.default_rng(0).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    texture = blocks.repeat(8, 0).repeat(8, 1)[:height, :width]
    for shot, count in enumerate(lengths):
        look = shot % 5
        for i in range(count):
            if look == 0:
                image = np.full((height, width, 3), (30, 40, 120), np.uint8)
                x = (3 * i) % (width - 40)
                image[height // 3 : height // 3 + 40, x : x + 40] = 235
            elif look == 1:
                phase = (xx + 2 * i) / width
                image = np.stack([200 * phase % 255, 120 + 0 * xx, 255 - 200 * phase % 255], -1).astype(np.uint8)
            elif look == 2:
                image = np.full((height, width, 3), np.array([180, 120, 60]) * (0.3 + 0.7 * i / count), np.uint8)
            elif look == 3:
                image = texture
            else:
                image = np.full((height, width, 3), np.array([40, 200, 70]) * (1.0 - 0.7 * i / count), np.uint8)
            yield np.ascontiguousarray(image)


def _cut_frames(lengths: list[int]) -> list[int]:
    return np.cumsum(lengths)[:-1].tolist()


def test_rgb_to_hsv_uses_opencv_ranges() -> None:
    colours = np.array([[[255, 0, 0], [255, 255, 0], [0, 255, 0], [0, 255, 255], [0, 0, 255], [255, 0, 255]]])
    assert rgb_to_hsv(colours.astype(np.uint8))[0].tolist() == [[h, 255, 255] for h in (0, 30, 60, 90, 120, 150)]
    greys = np.array([[[0, 0, 0], [128, 128, 128], [255, 255, 255], [200, 100, 50]]], np.uint8)
    assert rgb_to_hsv(greys)[0].tolist() == [[0, 0, 0], [0, 0, 128], [0, 0, 255], [10, 191, 200]]
    with pytest.raises(ValueError, match="uint8 RGB"):
        rgb_to_hsv(np.zeros((2, 2, 3), np.float32))


def test_rgb_to_hsv_matches_opencv_bit_for_bit() -> None:
    cv2 = pytest.importorskip("cv2")
    pixels = np.random.default_rng(1).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    pixels[:8] = np.arange(256, dtype=np.uint8)[None, :256, None].repeat(2, 1)[:, :512]  # greys and ties
    assert np.array_equal(rgb_to_hsv(pixels), cv2.cvtColor(pixels, cv2.COLOR_RGB2HSV))


@pytest.fixture(scope="module")
def cut_video(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """320x176 (scaled to 256 wide for analysis): a moving square, a panning gradient, a brightness ramp,
    a texture, a fade out."""
    lengths = [40, 40, 70, 50, 40]
    path = tmp_path_factory.mktemp("shots") / "cuts.mp4"
    _write_video(path, _shot_frames(lengths, (176, 320)))
    return path, _cut_frames(lengths)


def test_cuts_found_at_the_right_frames(cut_video: tuple[Path, list[int]]) -> None:
    path, expected = cut_video
    assert scene_cuts(path) == expected == [40, 80, 150, 200]
    with av.open(str(path)) as container:
        assert scene_cuts(container) == expected
    scores = content_scores(shots.video_frames(path))
    assert scores.size == 240 and scores[0] == 0.0
    within = np.delete(scores, expected)
    assert within.max() < 0.3 * shots.DEFAULT_THRESHOLD  # motion, pans and fades stay far below
    assert scores[expected].min() > 1.5 * shots.DEFAULT_THRESHOLD


@pytest.mark.parametrize(
    ("size", "analysed"), [((96, 160), (96, 160)), ((176, 320), (141, 256)), ((360, 640), (144, 256))]
)
def test_frames_are_analysed_at_most_256_wide(tmp_path: Path, size: tuple[int, int], analysed: tuple[int, int]) -> None:
    path = tmp_path / "small.mp4"
    _write_video(path, _solid((90, 90, 90), 2, size))
    assert [frame.shape for frame in shots.video_frames(path)] == [(*analysed, 3)] * 2  # PySceneDetect's sizes


def test_gradual_fades_do_not_cut() -> None:
    # brightness only: a ramp that walked across hues would wrap 179 -> 0 and cut, in PySceneDetect as here
    ramp = [np.full((72, 128, 3), np.array([180, 120, 60]) * (0.1 + 0.9 * i / 63), np.uint8) for i in range(64)]
    assert content_scores(ramp).max() < 5.0
    assert scene_cuts(ramp) == []
    assert scene_cuts(ramp, luma_only=True) == []
    jump = ramp[:32] + [np.full((72, 128, 3), (240, 240, 240), np.uint8)] * 32  # the same ramp, then a cut
    assert scene_cuts(jump) == [32]


def test_min_scene_len_is_respected() -> None:
    flash = [*_solid((220, 40, 40), 30), *_solid((20, 90, 20), 5), *_solid((60, 60, 250), 30)]
    assert scene_cuts(flash) == [30]  # the 5-frame shot is merged into the next one
    assert scene_cuts(flash, min_scene_len=3) == [30, 35]
    early = [*_solid((220, 40, 40), 10), *_solid((20, 90, 20), 40)]
    assert scene_cuts(early) == []  # a first shot shorter than min_scene_len: no cut
    assert scene_cuts(early, min_scene_len=5) == [10]
    assert scene_cuts(early, min_scene_len=0) == [10]
    exact = [*_solid((220, 40, 40), 15), *_solid((20, 90, 20), 40)]
    assert scene_cuts(exact) == [15] and scene_cuts(exact[1:]) == []  # 15 frames is long enough, 14 is not


def test_merge_rule_of_pyscenedetect() -> None:
    scores = np.zeros(90)
    scores[[20, 25, 60]] = 50.0
    # 25 is too close to 20: it starts a merge that ends with the next loud frame (60) once 15 quiet frames follow
    assert cuts_from_scores(scores) == [20, 60]
    assert cuts_from_scores(scores[:70]) == [20]  # the video ends while still merging
    assert cuts_from_scores(scores, threshold=60.0) == []


def test_frames_of_changing_size_are_refused() -> None:
    with pytest.raises(ValueError, match="frame 1"):
        scene_cuts([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 10, 3), np.uint8)])


def test_file_without_video_is_named(tmp_path: Path) -> None:
    path = tmp_path / "voice.m4a"
    with av.open(str(path), mode="w") as container:
        sound = container.add_stream("aac", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = RATE, 0, Fraction(1, RATE)
        container.mux(sound.encode(frame))
        container.mux(sound.encode())
    with pytest.raises(shots.NoVideoStreamError, match="voice.m4a") as caught:
        scene_cuts(path)
    assert isinstance(caught.value, FtalkError)


@pytest.mark.parametrize(
    ("lengths", "size"),
    [([40, 40, 70, 50, 40], (176, 320)), ([30, 6, 40, 50, 35], (360, 640)), ([18, 3, 3, 25, 9, 30, 16], (96, 160))],
)
def test_same_cuts_as_pyscenedetect(tmp_path: Path, lengths: list[int], size: tuple[int, int]) -> None:
    scenedetect = pytest.importorskip("scenedetect")
    path = tmp_path / "shots.mp4"
    _write_video(path, _shot_frames(lengths, size))
    stats = scenedetect.StatsManager()
    manager = scenedetect.SceneManager(stats)
    manager.add_detector(scenedetect.ContentDetector())
    manager.detect_scenes(scenedetect.open_video(str(path)))
    theirs = [start.frame_num for start, _ in manager.get_scene_list()[1:]]
    ours = content_scores(shots.video_frames(path))
    assert cuts_from_scores(ours) == theirs
    their_scores = np.array([stats.get_metrics(i, ["content_val"])[0] or 0.0 for i in range(ours.size)])
    assert float(np.median(np.abs(ours - their_scores))) < 0.5
