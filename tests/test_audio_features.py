"""Audio loading, the clip's exact audio span, and wav2vec2 features through a tiny local model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from fantasytalk_cli.models.audio import Wav2Vec2Features, cut_audio_to_frames, load_audio, read_audio_for_frames

SR = 16000


@pytest.mark.parametrize(
    ("fps", "stride", "num_frames", "start", "first", "length"),
    [
        (25, 2, 81, 0, 0, 103_680),  # 81*2/25 s = 6.48 s
        (25, 1, 81, 10, 6_400, 51_840),
        (30, 1, 49, 17, 9_067, 26_133),  # 17/30 s = 9066.67 -> 9067; 66/30 s = 35200
        (23.976, 3, 33, 5, 3_337, 66_066),  # 5*16000/23.976 = 3336.7; 104*16000/23.976 = 69402.7 -> 69403
    ],
)
def test_cut_covers_exactly_the_sampled_frames(fps, stride, num_frames, start, first, length) -> None:
    samples = np.arange(200_000, dtype=np.float32)  # sample i holds value i: the cut's position is visible
    cut = cut_audio_to_frames(samples, SR, start, num_frames, stride, fps)
    assert cut[0] == first and len(cut) == length
    assert np.array_equal(cut, samples[first : first + length])
    assert abs(len(cut) / SR - num_frames * stride / fps) <= 1 / SR


def test_cut_pads_less_than_a_frame_and_rejects_more() -> None:
    needed = 81 * 2 * 640  # 640 samples per frame at 25 fps
    padded = cut_audio_to_frames(np.ones(needed - 300, np.float32), SR, 0, 81, 2, 25)
    assert len(padded) == needed and padded[: needed - 300].all() and not padded[needed - 300 :].any()
    with pytest.raises(ValueError, match="too short by 700 samples"):
        cut_audio_to_frames(np.ones(needed - 700, np.float32), SR, 0, 81, 2, 25)
    with pytest.raises(ValueError, match="mono"):
        cut_audio_to_frames(np.ones((2, needed), np.float32), SR, 0, 81, 2, 25)


def test_load_resamples_44k1_keeping_duration_and_pitch(tmp_path: Path) -> None:
    t = np.arange(44_100 * 2) / 44_100
    sf.write(tmp_path / "tone.wav", 0.5 * np.sin(2 * np.pi * 440.0 * t), 44_100, subtype="FLOAT")
    audio = load_audio(tmp_path / "tone.wav")
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 2 * SR) <= 1
    spectrum = np.abs(np.fft.rfft(audio))
    peak_hz = np.argmax(spectrum) * SR / len(audio)
    assert abs(peak_hz - 440.0) <= 1.0
    assert abs(np.abs(audio[SR // 2 : -SR // 2]).max() - 0.5) < 0.01  # amplitude kept away from the edges


def test_load_downmixes_stereo(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(SR, 2)).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", stereo, SR, subtype="FLOAT")
    audio = load_audio(tmp_path / "stereo.wav")
    np.testing.assert_allclose(audio, stereo.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize(("rate", "channels"), [(16_000, 1), (44_100, 2), (8_000, 1), (48_000, 1), (22_050, 2)])
def test_reading_only_the_span_equals_cutting_the_whole_file(tmp_path: Path, rate: int, channels: int) -> None:
    rng = np.random.default_rng(rate)
    seconds = 4.3
    noise = (0.3 * rng.standard_normal((int(rate * seconds), channels))).astype(np.float32)  # every frequency
    path = tmp_path / "a.wav"
    sf.write(path, noise, rate, subtype="FLOAT")
    whole = load_audio(path)
    for _ in range(60):  # random spans, the file's first and last samples included
        fps, stride, frames = rng.choice([23.0, 25.0, 29.97, 30.0]), int(rng.integers(1, 3)), int(rng.choice([9, 49]))
        start = int(rng.integers(0, int(seconds * fps) - frames * stride + 1))
        want = cut_audio_to_frames(whole, SR, start, frames, stride, fps)
        got = read_audio_for_frames(path, start, frames, stride, fps)
        assert got.dtype == np.float32 and got.shape == want.shape
        if rate == SR:
            assert np.array_equal(got, want)
        else:  # resampled from a margin around the span: equal up to the resampler's filter tails
            np.testing.assert_allclose(got, want, atol=2e-6)
    too_long = int(seconds * 25) + 2  # frames past the end by more than one frame interval
    with pytest.raises(ValueError, match="too short"):
        read_audio_for_frames(path, 0, too_long, 1, 25.0)


@pytest.fixture(scope="module")
def tiny_wav2vec2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny wav2vec2 folder in the transformers layout, with the real conv kernel/stride pattern."""
    folder = tmp_path_factory.mktemp("wav2vec2-tiny")
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        conv_kernel=(10, 3, 3, 3, 3, 2, 2),
        conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="group",
    )
    torch.manual_seed(0)
    Wav2Vec2Model(config).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=False
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("seconds", [2.0, 6.48])
def test_wav2vec2_features_length(tiny_wav2vec2: Path, seconds: float) -> None:
    features = Wav2Vec2Features.from_pretrained(tiny_wav2vec2)
    assert not features.model.training and not any(p.requires_grad for p in features.model.parameters())
    samples = np.random.default_rng(1).standard_normal(round(seconds * SR)).astype(np.float32)
    out = features(samples)
    expected = (len(samples) - 400) // 320 + 1  # stride 320, receptive field 400
    assert out.shape == (1, expected, 32) and features.num_tokens(len(samples)) == expected
    assert abs(expected - 49.9 * seconds) <= 1.5
    assert not out.requires_grad

    # Each clip is normalised on its own: a batch equals its clips run one by one; scale does not matter.
    batch = features(np.stack([samples, 3 * samples[::-1].copy()]))
    torch.testing.assert_close(batch[0], out[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features(10 * samples), out, rtol=1e-4, atol=1e-4)


def test_wav2vec2_needs_a_local_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="local folders only"):
        Wav2Vec2Features.from_pretrained(tmp_path / "facebook" / "wav2vec2-base-960h")
