"""Audio for FantasyTalking: 16 kHz mono loading, the clip's exact audio span, and wav2vec2 features.

Public API:
- ``load_audio(path, target_sr=16000) -> np.ndarray`` float32 mono (channels averaged, soxr resampling).
- ``cut_audio_to_frames(samples, sr, start_frame, num_frames, stride, fps) -> np.ndarray``: the samples covering
  exactly the sampled frames' time span.
- ``read_audio_for_frames(path, start_frame, num_frames, stride, fps) -> np.ndarray``: the same span read from
  the file alone (only that part is read and resampled; what the training dataset uses).
- ``Wav2Vec2Features``: frozen wav2vec2 (``from_pretrained(folder)``, local folders only); calling it on samples
  gives ``last_hidden_state`` [B, L, hidden]; ``num_tokens(num_samples)`` predicts L without running it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from fantasytalk_cli.models.frozen_loading import load_wav2vec2

SAMPLE_RATE = 16000
"""wav2vec2-base-960h was trained on 16 kHz audio."""


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono at ``target_sr`` (channels averaged, then resampled with soxr)."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = _downmix(data)
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _downmix(data: np.ndarray) -> np.ndarray:
    """[n, channels] float32 -> [n] contiguous mean of the channels, summed column by column (numpy's `mean`
    over a short last axis costs more than reading and resampling the audio)."""
    mono = np.array(data[:, 0], dtype=np.float32)
    for channel in range(1, data.shape[1]):
        mono += data[:, channel]
    if data.shape[1] > 1:
        mono /= np.float32(data.shape[1])
    return mono


def _sample_index(frame: float, sr: int, fps: float) -> int:
    """The sample at time ``frame / fps``, rounded half up (deterministic, unlike Python's round-half-even)."""
    return math.floor(frame * sr / fps + 0.5)


def _frame_span(sr: int, start_frame: int, num_frames: int, stride: int, fps: float) -> tuple[int, int]:
    """Samples [first, last) at ``sr`` covering ``start_frame/fps .. (start_frame + num_frames*stride)/fps``."""
    if sr <= 0 or fps <= 0 or stride < 1 or num_frames < 1 or start_frame < 0:
        raise ValueError(f"bad clip: {sr=} {fps=} {stride=} {num_frames=} {start_frame=}")
    return _sample_index(start_frame, sr, fps), _sample_index(start_frame + num_frames * stride, sr, fps)


def _fit_span(
    segment: np.ndarray, first: int, last: int, available: int, sr: int, fps: float, frames: str
) -> np.ndarray:
    """``segment`` (the samples of [first, last) that exist, ``available`` in all) padded to the span's length;
    a shortfall of a frame interval or more raises ``ValueError`` naming it."""
    shortfall = last - available
    if shortfall >= sr / fps:
        raise ValueError(
            f"audio too short by {shortfall} samples ({shortfall / sr:.3f} s): frames {frames} at {fps} fps need "
            f"samples {first}..{last}, the audio has {available} at {sr} Hz (at most one frame interval, "
            f"{sr / fps:.0f} samples, is zero-padded)"
        )
    if len(segment) < last - first:
        segment = np.pad(segment, (0, last - first - len(segment)))
    return segment


def cut_audio_to_frames(
    samples: np.ndarray, sr: int, start_frame: int, num_frames: int, stride: int, fps: float
) -> np.ndarray:
    """The audio of a clip of ``num_frames`` frames taken every ``stride`` frames from ``start_frame``.

    Covers exactly ``start_frame/fps .. (start_frame + num_frames*stride)/fps`` (the reference trainer cuts one
    frame interval short and ignores the stride in places). Audio that ends less than one frame interval early
    (container/encoder slack) is padded with zeros; a larger shortfall raises ``ValueError`` naming it.
    """
    if samples.ndim != 1:
        raise ValueError(f"samples must be mono [n], got shape {samples.shape}")
    first, last = _frame_span(sr, start_frame, num_frames, stride, fps)
    frames = f"{start_frame}..{start_frame + num_frames * stride}"
    return _fit_span(samples[first:last], first, last, len(samples), sr, fps, frames)


_RESAMPLE_MARGIN_S = 0.1
"""Audio read on each side of a span before resampling it, so that the resampler's filter edges fall outside."""


def read_audio_for_frames(
    path: str | Path, start_frame: int, num_frames: int, stride: int, fps: float, target_sr: int = SAMPLE_RATE
) -> np.ndarray:
    """``cut_audio_to_frames(load_audio(path), ...)`` reading and resampling only the span (plus a margin).

    The read starts on a sample where both rates meet exactly (a multiple of ``sr / gcd(sr, target_sr)``), so
    the resampled samples sit on the same target-rate grid as a whole-file resample; with the margin they equal
    it up to the resampler's filter tails (tested). At ``target_sr`` the span is read as it is stored.
    """
    first, last = _frame_span(target_sr, start_frame, num_frames, stride, fps)
    frames = f"{start_frame}..{start_frame + num_frames * stride}"
    with sf.SoundFile(str(path)) as handle:
        sr, total = int(handle.samplerate), int(handle.frames)
        if sr == target_sr:
            handle.seek(min(first, total))
            data = handle.read(max(0, min(last, total) - first), dtype="float32", always_2d=True)
            segment = _downmix(data)
            return _fit_span(segment, first, last, total, sr, fps, frames)
        unit = math.gcd(sr, target_sr)
        src_unit, tgt_unit = sr // unit, target_sr // unit  # src_unit source samples <-> tgt_unit target samples
        margin = math.ceil(_RESAMPLE_MARGIN_S * target_sr / tgt_unit)
        base = max(0, first // tgt_unit - margin)
        src_start = min(base * src_unit, total)
        src_stop = min(total, (-(-last // tgt_unit) + margin) * src_unit)
        handle.seek(src_start)
        data = handle.read(src_stop - src_start, dtype="float32", always_2d=True)
    mono = _downmix(data)
    resampled = soxr.resample(mono, sr, target_sr) if len(mono) else mono
    offset = base * tgt_unit
    available = total * target_sr // sr  # the whole-file resample's length
    segment = np.ascontiguousarray(resampled[first - offset : last - offset], dtype=np.float32)
    return _fit_span(segment, first, last, available, target_sr, fps, frames)


class Wav2Vec2Features:
    """Frozen wav2vec2: per-clip normalisation (``Wav2Vec2FeatureExtractor``) then ``last_hidden_state``.

    Kept in eval mode without gradients; its outputs feed the trainable ``proj_model``.
    """

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor) -> None:
        self.model = model.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> Wav2Vec2Features:
        """Load a transformers-layout wav2vec2 folder (e.g. wav2vec2-base-960h); never touches the hub."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"wav2vec2 folder not found: {folder} (local folders only, nothing is downloaded)")
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(folder, local_files_only=True)
        model = load_wav2vec2(folder)  # strict, the CTC head dropped with its reason
        return cls(model.to(device=device, dtype=dtype), feature_extractor)

    @property
    def sampling_rate(self) -> int:
        """Sample rate the model expects (16 kHz for wav2vec2-base-960h)."""
        return int(self.feature_extractor.sampling_rate)

    @property
    def hidden_size(self) -> int:
        """Width of the features (768 for wav2vec2-base-960h)."""
        return int(self.model.config.hidden_size)

    def to(self, device: str | torch.device) -> Wav2Vec2Features:
        """Move the model (e.g. off the accelerator between uses); returns self."""
        self.model.to(device)
        return self

    def num_tokens(self, num_samples: int) -> int:
        """Feature length for ``num_samples`` samples: the conv stack's arithmetic (stride 320, field 400 in base)."""
        length = num_samples
        for kernel, stride in zip(self.model.config.conv_kernel, self.model.config.conv_stride, strict=True):
            length = (length - kernel) // stride + 1
        return max(length, 0)

    @torch.no_grad()
    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """Features of mono ``samples`` [n] or an equal-length batch [B, n] -> [B, L, hidden] on the model's device.

        Each clip is normalised on its own; batches must not be padded (wav2vec2-base has no attention mask, so
        padding would change the features).
        """
        batch = np.atleast_2d(np.asarray(samples, dtype=np.float32))
        if batch.ndim != 2:
            raise ValueError(f"samples must be [n] or [B, n], got shape {np.shape(samples)}")
        inputs = self.feature_extractor(list(batch), sampling_rate=self.sampling_rate, return_tensors="pt")
        param = next(self.model.parameters())
        return self.model(inputs.input_values.to(param.device, param.dtype)).last_hidden_state
