"""Audio for FantasyTalking: 16 kHz mono loading, the clip's exact audio span, and wav2vec2 features.

Public API:
- ``load_audio(path, target_sr=16000) -> np.ndarray`` float32 mono (channels averaged, soxr resampling).
- ``cut_audio_to_frames(samples, sr, start_frame, num_frames, stride, fps) -> np.ndarray``: the samples covering
  exactly the sampled frames' time span.
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

SAMPLE_RATE = 16000
"""wav2vec2-base-960h was trained on 16 kHz audio."""


def load_audio(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Read an audio file as float32 mono at ``target_sr`` (channels averaged, then resampled with soxr)."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1, dtype=np.float32)
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr)
    return np.ascontiguousarray(mono, dtype=np.float32)


def _sample_index(frame: float, sr: int, fps: float) -> int:
    """The sample at time ``frame / fps``, rounded half up (deterministic, unlike Python's round-half-even)."""
    return math.floor(frame * sr / fps + 0.5)


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
    if sr <= 0 or fps <= 0 or stride < 1 or num_frames < 1 or start_frame < 0:
        raise ValueError(f"bad clip: {sr=} {fps=} {stride=} {num_frames=} {start_frame=}")
    first = _sample_index(start_frame, sr, fps)
    last = _sample_index(start_frame + num_frames * stride, sr, fps)
    shortfall = last - len(samples)
    if shortfall >= sr / fps:
        raise ValueError(
            f"audio too short by {shortfall} samples ({shortfall / sr:.3f} s): frames {start_frame}.."
            f"{start_frame + num_frames * stride} at {fps} fps need samples {first}..{last}, the audio has "
            f"{len(samples)} at {sr} Hz (at most one frame interval, {sr / fps:.0f} samples, is zero-padded)"
        )
    segment = samples[first:last]
    if len(segment) < last - first:
        segment = np.pad(segment, (0, last - first - len(segment)))
    return segment


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
        from fantasytalk_cli.models.loaders import load_wav2vec2

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
