"""What the feature cache holds for a run, and the key of each entry.

Keys are content addresses: a hash of everything that affects the tensors. Text: the caption, the umT5 and
tokenizer files (fingerprinted) and the precision. Audio: the audio file's content hash, the frame window, the
wav2vec2 files. Video: the video file's content hash, the frame window, the bucket (crop) size, the VAE and CLIP
files and the precision. So a changed caption re-encodes only its text, a changed audio file only its audio, a
changed bucket size only latents and CLIP; nothing stale is ever read.

Which windows: a clip's frame window is drawn per (seed, epoch, clip), so the cache holds the windows of the first
`cache_epochs` epochs (each in the bucket the plan gives the clip that epoch), or, with `fixed_window`, the
epoch-0 window every epoch uses. Batches that `random_frame_crop` shortens are not cached (computed online).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from fantasytalk_cli.cache.fingerprint import model_fingerprint
from fantasytalk_cli.config.schema import DataConfig, ModelConfig, TrainConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.data.buckets import ClipWindow, clip_window
from fantasytalk_cli.data.plan import BucketPlan, ClipFacts
from fantasytalk_cli.models.dit_config import find_wav2vec
from fantasytalk_cli.models.layout import detect_layout

EMPTY_CAPTION = ""
"""The caption text dropout puts in: cached once."""


def _hash(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CacheSettings:
    """Fingerprints of what produces each kind of entry (model files, precision)."""

    text: str
    audio: str
    video: str

    def text_key(self, caption: str) -> str:
        return _hash("text", self.text, caption)

    def audio_key(self, audio_sha256: str, window: ClipWindow) -> str:
        return _hash(
            "audio", self.audio, audio_sha256, window.start_frame, window.num_frames, window.stride, window.fps
        )

    def video_key(self, video_sha256: str, window: ClipWindow, height: int, width: int) -> str:
        return _hash(
            "video", self.video, video_sha256, window.start_frame, window.num_frames, window.stride, height, width
        )


def model_files(model: ModelConfig) -> dict[str, list[Path]]:
    """The files each kind of entry is computed from, in either base layout."""
    base = model.pretrained_model_name_or_path
    assert base is not None, "checked by the caller"
    wav2vec = [find_wav2vec(model)]
    if detect_layout(base) == "diffusers":
        return {
            "text": [base / "text_encoder", base / "tokenizer"],
            "audio": wav2vec,
            "video": [base / "vae", base / "image_encoder"],
        }
    wan = load_wan_yaml(model.config_path)
    return {
        "text": [base / wan.text_encoder_kwargs.text_encoder_subpath, base / wan.text_encoder_kwargs.tokenizer_subpath],
        "audio": wav2vec,
        "video": [base / wan.vae_kwargs.vae_subpath, base / wan.image_encoder_kwargs.image_encoder_subpath],
    }


def cache_settings(model: ModelConfig, train: TrainConfig) -> CacheSettings:
    """Fingerprint the model files (first and last MiB of each, see `model_fingerprint`) and the precision."""
    files = model_files(model)
    precision = train.mixed_precision
    return CacheSettings(
        text=_hash(model_fingerprint(files["text"]), precision),
        audio=_hash(model_fingerprint(files["audio"])),
        video=_hash(model_fingerprint(files["video"]), precision),
    )


@dataclass(frozen=True)
class CacheItem:
    """One (clip, frame window, bucket) the run can train on."""

    index: int
    window: ClipWindow
    height: int
    width: int
    epoch: int


def window_for(
    facts: ClipFacts, plan: BucketPlan, index: int, frames: int, *, seed: int, epoch: int, data: DataConfig
) -> ClipWindow:
    """The frame window the dataset draws for entry ``index`` in ``epoch`` (epoch 0's with `fixed_window`)."""
    return clip_window(
        int(facts.num_frames[index]),
        float(facts.fps[index]),
        frames,
        int(plan.stride[index]),
        seed=seed,
        epoch=0 if data.fixed_window else epoch,
        index=index,
    )


def planned_items(
    facts: ClipFacts, plan: BucketPlan, *, seed: int, data: DataConfig, epochs: int
) -> Iterator[CacheItem]:
    """Every (clip, window, bucket) of ``epochs`` epochs at the buckets' full frame counts, each once."""
    seen: set[tuple[int, int, int, int, int]] = set()
    for epoch in range(epochs):
        for index, bucket in enumerate(plan.assignment(epoch).tolist()):
            if bucket < 0:
                continue
            height, width, frames = plan.grid.shape(bucket)
            window = window_for(facts, plan, index, frames, seed=seed, epoch=epoch, data=data)
            key = (index, window.start_frame, frames, height, width)
            if key not in seen:
                seen.add(key)
                yield CacheItem(index, window, height, width, epoch)
