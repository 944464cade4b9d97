"""Voice activity for `ftalk prepare`: decode a video's sound to 16 kHz mono and find where someone speaks.

The speech probabilities come from Silero VAD, whose TorchScript model ships inside the `silero-vad` wheel
(`silero_vad/data/silero_vad.jit`). Loading it is `torch.jit.load` of a file that a pip package installs, the
same trust as importing that package's code; it needs nothing beyond torch (the ONNX copy would need
onnxruntime). We call the wrapper's inner 16 kHz network `_model` ((1, 64 + 512) samples, state) ->
(probability, state), the contract of Silero's ONNX export, so the recurrent state stays explicit and one
loaded model serves any number of calls; the window pass and the span logic are ours, and a test checks
them against Silero's own `get_speech_timestamps`.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import av
import av.container
import numpy as np
import soxr
import torch

from fantasytalk_cli.errors import FtalkError

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per probability at 16 kHz (32 ms), fixed by the model
CONTEXT = 64  # samples of the previous window the model sees in front of each new one
STATE_SHAPE = (2, 1, 128)  # LSTM (h, c), batch 1
NEG_THRESHOLD_GAP = 0.15  # a started span ends only below threshold - 0.15 (hysteresis)
MIN_NEG_THRESHOLD = 0.01

Span = tuple[float, float]


class SileroVadMissingError(FtalkError):
    """The `silero-vad` package (which carries the VAD model) is not installed or is damaged."""


class NoAudioStreamError(FtalkError):
    """A media file given to `ftalk prepare` has no audio stream to look for speech in."""


def _model_path() -> Path:
    # find_spec locates the package without running its __init__, which calls torch.set_num_threads(1)
    # for the whole process; we only want its data file.
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise SileroVadMissingError(
            "ftalk prepare finds speech with Silero VAD, whose model ships in the `silero-vad` package; "
            "it is not installed: run `pip install silero-vad` (it needs only torch and packaging)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.jit"
    if not path.is_file():
        raise SileroVadMissingError(
            f"{path}: the Silero VAD model file is missing from the installed `silero-vad` package; "
            "reinstall it: `pip install --force-reinstall silero-vad`."
        )
    return path


@lru_cache(maxsize=1)
def _load_model() -> torch.jit.ScriptModule:
    """The packaged 16 kHz network (`_model`: (window with context, state) -> (probability, state)), once."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript loading
        wrapper = torch.jit.load(str(_model_path()), map_location="cpu")
    wrapper.eval()
    return wrapper._model


def speech_probabilities(audio: np.ndarray) -> np.ndarray:
    """One speech probability per 512-sample window of 16 kHz mono `audio` (the last window zero-padded)."""
    wave = _as_mono_float(audio)
    n_windows = -(-wave.size // WINDOW)
    if n_windows == 0:
        return np.zeros(0, np.float32)
    padded = np.zeros(CONTEXT + n_windows * WINDOW, np.float32)
    padded[CONTEXT : CONTEXT + wave.size] = wave
    # window i is samples [i*512, (i+1)*512) preceded by the 64 samples before it (zeros for the first)
    frames = torch.from_numpy(padded).unfold(0, CONTEXT + WINDOW, WINDOW)
    model = _load_model()
    state = torch.zeros(STATE_SHAPE)
    probs = np.empty(n_windows, np.float32)
    with _one_torch_thread(), torch.inference_mode():
        for i in range(n_windows):
            prob, state = model(frames[i : i + 1], state)
            probs[i] = float(prob)
    return probs


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread for a while: the per-window ops are so small that more threads only add
    synchronisation (7x slower with 2 threads on a 2-core box). The setting is process-wide, so restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def speech_spans(
    audio: np.ndarray,
    *,
    threshold: float = 0.5,
    min_speech_ms: float = 250.0,
    min_silence_ms: float = 100.0,
    pad_ms: float = 30.0,
) -> list[Span]:
    """Speech spans `(start, end)` in seconds in 16 kHz mono float `audio`, sorted and disjoint
    (see `spans_from_probabilities` for the rule; the defaults are Silero's)."""
    wave = _as_mono_float(audio)
    return spans_from_probabilities(
        speech_probabilities(wave),
        n_samples=wave.size,
        threshold=threshold,
        min_speech_ms=min_speech_ms,
        min_silence_ms=min_silence_ms,
        pad_ms=pad_ms,
    )


def spans_from_probabilities(
    probs: np.ndarray,
    *,
    n_samples: int,
    threshold: float = 0.5,
    min_speech_ms: float = 250.0,
    min_silence_ms: float = 100.0,
    pad_ms: float = 30.0,
) -> list[Span]:
    """Speech spans in seconds from per-window probabilities of `n_samples` of 16 kHz audio.

    A span opens at a window whose probability reaches `threshold` and closes once it has stayed below
    `threshold - 0.15` for `min_silence_ms`; spans not longer than `min_speech_ms` are dropped, and the rest
    are widened by `pad_ms` each side (meeting halfway where two would overlap).
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"speech spans: threshold must lie in (0, 1), got {threshold}")
    raw = _hysteresis(
        np.asarray(probs, dtype=np.float64),
        threshold=threshold,
        min_speech=min_speech_ms * SAMPLE_RATE / 1000,
        min_silence=min_silence_ms * SAMPLE_RATE / 1000,
        n_samples=n_samples,
    )
    return _pad(raw, pad=pad_ms * SAMPLE_RATE / 1000, n_samples=n_samples)


def _hysteresis(
    probs: np.ndarray, *, threshold: float, min_speech: float, min_silence: float, n_samples: int
) -> list[tuple[int, int]]:
    """Hysteresis over window probabilities: unpadded spans in samples."""
    neg_threshold = max(threshold - NEG_THRESHOLD_GAP, MIN_NEG_THRESHOLD)
    spans: list[tuple[int, int]] = []
    start: int | None = None  # sample where the open span began
    silence_from: int | None = None  # first quiet window of the open span's current pause
    for i, prob in enumerate(probs.tolist()):
        here = i * WINDOW
        if prob >= threshold:
            silence_from = None
            if start is None:
                start = here
            continue
        if start is None or prob >= neg_threshold:
            continue  # not in speech, or in the undecided band between the two thresholds
        if silence_from is None:
            silence_from = here
        if here - silence_from >= min_silence:
            if silence_from - start > min_speech:
                spans.append((start, silence_from))
            start = silence_from = None
    if start is not None and n_samples - start > min_speech:
        spans.append((start, n_samples))  # still speaking when the audio ends
    return spans


def _pad(spans: list[tuple[int, int]], *, pad: float, n_samples: int) -> list[Span]:
    """Widen each span by `pad` samples, sharing a gap narrower than two pads equally, in seconds."""
    out: list[Span] = []
    for k, (start, end) in enumerate(spans):
        before = pad if k == 0 else min(pad, (start - spans[k - 1][1]) / 2)
        after = pad if k == len(spans) - 1 else min(pad, (spans[k + 1][0] - end) / 2)
        out.append((max(0.0, start - before) / SAMPLE_RATE, min(float(n_samples), end + after) / SAMPLE_RATE))
    return out


def speech_ratio(spans: list[Span], start: float, end: float) -> float:
    """Share of `[start, end]` (seconds) covered by `spans` (overlapping spans count once)."""
    if not end > start:
        raise ValueError(f"speech_ratio: the interval must have end > start, got [{start}, {end}]")
    covered = 0.0
    reach = start  # everything before `reach` is already counted
    for span_start, span_end in sorted(spans):
        lo, hi = max(span_start, reach), min(span_end, end)
        if hi > lo:
            covered += hi - lo
            reach = hi
    return covered / (end - start)


def load_audio_16k(source: str | os.PathLike[str] | av.container.InputContainer) -> np.ndarray:
    """The first audio stream of a media file (a path, or an open PyAV container read from where it stands)
    as float32 mono at 16 kHz: channels averaged, resampled with soxr's high quality filter."""
    if isinstance(source, av.container.InputContainer):
        return _decode_mono(source, name=source.name)
    with av.open(os.fspath(source)) as container:
        return _decode_mono(container, name=os.fspath(source))


def _decode_mono(container: av.container.InputContainer, *, name: str) -> np.ndarray:
    if not container.streams.audio:
        raise NoAudioStreamError(
            f"{name}: no audio stream; ftalk prepare needs the speech inside the video. "
            "Mux it in (e.g. `ffmpeg -i video.mp4 -i speech.wav -c:v copy -c:a aac out.mp4`) or drop the file."
        )
    stream = container.streams.audio[0]
    # planar float at the stream's own rate (the first frame's if the header has none): any sample
    # format then decodes to (channels, samples)
    resampler = av.AudioResampler(format="fltp", rate=stream.rate or None)
    rate = stream.rate
    chunks: list[np.ndarray] = []
    for frame in container.decode(stream):
        rate = rate or frame.sample_rate
        for converted in resampler.resample(frame):
            chunks.append(converted.to_ndarray().mean(axis=0))
    for converted in resampler.resample(None):
        chunks.append(converted.to_ndarray().mean(axis=0))
    mono = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if rate == SAMPLE_RATE or mono.size == 0:
        return mono
    return np.ascontiguousarray(soxr.resample(mono, rate, SAMPLE_RATE, "HQ"), dtype=np.float32)


def _as_mono_float(audio: np.ndarray) -> np.ndarray:
    wave = np.asarray(audio)
    if wave.ndim != 1:
        raise ValueError(f"speech VAD takes 1-D mono 16 kHz audio, got an array of shape {wave.shape}")
    if not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"speech VAD takes float audio in [-1, 1], got dtype {wave.dtype}")
    return np.ascontiguousarray(wave, dtype=np.float32)
