"""One training step of FantasyTalking (`docs/training.md#loss`), in one readable function.

Conditioning: VAE latents of the clip (posterior sample, as the reference trains), the I2V condition
y = [4 mask channels ; VAE(first frame, zeros)], umT5 text, CLIP of frame 0, wav2vec2 audio: encoded from the
batch, or taken from the feature cache (`ftalk cache`), with the same random draws either way. Dropout
of text / image / audio conditions per sample. Flow matching with the shifted schedule; timesteps
drawn identically on every rank so `uniform_sampling` stratifies the global batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fantasytalk_cli.config.schema import ModelConfig, TrainConfig
from fantasytalk_cli.data.dataset import to_model_pixels
from fantasytalk_cli.models.audio import Wav2Vec2Features
from fantasytalk_cli.models.encoders import VIDEO_TENSORS, FrozenEncoders, VideoConditions, encode_video
from fantasytalk_cli.runtime.flow import (
    add_noise,
    flow_matching_loss,
    i2v_mask,
    loss_weights,
    sample_timestep_indices,
)
from fantasytalk_cli.runtime.memory_options import activations_on_host
from fantasytalk_cli.runtime.world import World


@dataclass(frozen=True)
class StepContext:
    """Everything a step needs besides the model and the batch."""

    train: TrainConfig
    model_cfg: ModelConfig
    sigmas: torch.Tensor
    """Shifted schedule, noisiest first (float64)."""
    world: World
    """This process's data-parallel rank and the group's size (timesteps are stratified over the global batch)."""
    device: torch.device
    dtype: torch.dtype
    """Dtype of the conditioning tensors fed to the transformer."""
    autocast: Callable[[], Any]
    activation_offload: bool = False
    """Keep the tensors the backward needs in host memory (`memory_options.activations_on_host`)."""


@dataclass
class StepOutput:
    loss: torch.Tensor
    outliers: int
    elements: int
    samples: int
    tokens: int
    inputs: dict[str, torch.Tensor]
    """The transformer's keyword arguments (conditions after dropout), for `zero_gradient_loss`."""


def _generators(seed: int, step: int, rank: int) -> tuple[torch.Generator, torch.Generator]:
    """(shared, local): `shared` is the same on every rank (timesteps), `local` differs (noise, dropout)."""

    def make(*keys: int) -> torch.Generator:
        return torch.Generator().manual_seed(stream_seed(seed, step, *keys))

    return make(0), make(1, rank)


def stream_seed(seed: int, step: int, *keys: int) -> int:
    """A seed of its own per (seed, step, keys): SeedSequence is stable across processes (unlike hash())."""
    return int(np.random.SeedSequence([seed, step, *keys]).generate_state(1)[0])


def seed_module_dropout(seed: int, step: int, rank: int) -> None:
    """Seed the global generator, which module dropout (the LoRA's `--lora_dropout`) draws from, for this
    micro-batch and rank: its masks then depend on the step alone, so a resumed run draws exactly the masks of an
    uninterrupted one whatever else drew from the global generator in between (a data loader iterator made anew
    after resume draws its base seed from it). Gradient checkpointing replays the same state for the recompute."""
    torch.manual_seed(stream_seed(seed, step, 2, rank))


def audio_features(
    wav2vec: Wav2Vec2Features | None,
    clips: list[torch.Tensor],
    device: torch.device,
    cached: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """wav2vec2 features [B, L, C] of clips of different lengths: each encoded on its own (no padding,
    wav2vec2-base has no mask), or taken from the feature cache, then resampled in time to the longest so windows
    stay proportional."""
    cached = cached or [None] * len(clips)
    feats = []
    for clip, hit in zip(clips, cached, strict=True):
        if hit is None:
            assert wav2vec is not None, "an audio clip missed the cache but wav2vec2 is not loaded"
            hit = wav2vec(clip.numpy())
        feats.append(hit.to(device))
    longest = max(f.shape[1] for f in feats)
    same = [
        f if f.shape[1] == longest else F.interpolate(f.transpose(1, 2), size=longest, mode="linear").transpose(1, 2)
        for f in feats
    ]
    return torch.cat(same).float()


def video_conditions(encoders: FrozenEncoders, batch: dict[str, Any], device: torch.device) -> VideoConditions:
    """The batch's cached video conditions (``batch["video"]``), else encoded from its pixels."""
    cached = batch.get("video")
    if cached is not None:
        return VideoConditions(**{name: cached[name].to(device) for name in VIDEO_TENSORS})
    height, width, _ = batch["shape"]
    return encode_video(encoders, to_model_pixels(batch["pixels"], height, width, device))


def text_conditions(encoders: FrozenEncoders, batch: dict[str, Any], drop: torch.Tensor) -> torch.Tensor:
    """umT5 embeddings of the captions, the empty caption where text is dropped: cached per caption when the
    batch carries them (``batch["text_cache"]``: each caption's and the empty caption's), else encoded."""
    cached = batch.get("text_cache")
    if cached is not None:
        return torch.cat(
            [cached["empty"] if d else hit for d, hit in zip(drop.tolist(), cached["captions"], strict=True)]
        )
    captions = ["" if d else t for d, t in zip(drop.tolist(), batch["text"], strict=True)]
    return encoders.text.encode(captions)


def training_step(
    model: torch.nn.Module,
    encoders: FrozenEncoders,
    wav2vec: Wav2Vec2Features | None,
    batch: dict[str, Any],
    ctx: StepContext,
    step: int,
) -> StepOutput:
    """Loss of one micro-batch (not yet backpropagated)."""
    cfg = ctx.train
    shared, local = _generators(cfg.seed, step, ctx.world.dp_rank)
    seed_module_dropout(cfg.seed, step, ctx.world.dp_rank)
    bsz, frames, height, width = len(batch["text"]), batch["shape"][2], batch["shape"][0], batch["shape"][1]

    # Per-sample condition dropout (classifier-free guidance for text, image and audio).
    drop = torch.rand(3, bsz, generator=local)
    drop_text = drop[0] < cfg.text_dropout
    drop_image = drop[1] < cfg.image_dropout
    drop_audio = drop[2] < cfg.audio_drop_probability()

    with torch.no_grad(), encoders.on(ctx.device):
        video = video_conditions(encoders, batch, ctx.device)
        eps = torch.randn(video.mean.shape, generator=local, dtype=video.mean.dtype).to(ctx.device)
        latents = video.mean.to(ctx.device) + video.std.to(ctx.device) * eps  # a posterior sample, normalised
        mask = i2v_mask(frames, latents.shape[-2], latents.shape[-1], device=ctx.device)
        y = torch.cat([mask.unsqueeze(0).expand(bsz, -1, -1, -1, -1), video.first.to(ctx.device)], dim=1)
        text = text_conditions(encoders, batch, drop_text).to(ctx.device)
        image = video.image.to(ctx.device)
        image = image * (~drop_image).to(image.dtype).to(ctx.device).view(-1, 1, 1)
        audio = audio_features(wav2vec, batch["audio"], ctx.device, batch.get("audio_cache"))

    idx = sample_timestep_indices(
        global_batch=bsz * ctx.world.dp_size,
        rank=ctx.world.dp_rank,
        local_batch=bsz,
        num_train_timesteps=ctx.sigmas.numel(),
        uniform_sampling=cfg.uniform_sampling,
        scheme=cfg.weighting_scheme,
        generator=shared,
        logit_mean=cfg.logit_mean,
        logit_std=cfg.logit_std,
        mode_scale=cfg.mode_scale,
    )
    sigmas = ctx.sigmas[idx]
    noise = torch.randn(latents.shape, generator=local).to(ctx.device)
    noisy = add_noise(latents, noise, sigmas.to(ctx.device))
    audio_scale = torch.where(drop_audio, 0.0, ctx.model_cfg.audio_scale).to(ctx.device)

    inputs = {
        "hidden_states": torch.cat([noisy, y], dim=1).to(ctx.dtype),
        "timestep": (sigmas * 1000).to(ctx.device, torch.float32),
        "encoder_hidden_states": text.to(ctx.dtype),
        "encoder_hidden_states_image": image.to(ctx.dtype),
        "audio_features": audio.to(ctx.dtype),
        "audio_scale": audio_scale,
    }
    with ctx.autocast(), activations_on_host(ctx.activation_offload):
        pred = model(**inputs)[0]
    cells = batch.get("loss_cells")
    result = flow_matching_loss(
        pred,
        noise - latents,
        loss_weights(sigmas, cfg.weighting_scheme).to(ctx.device),
        cfg.loss_outlier_threshold,
        None if cells is None else cells.to(ctx.device),
    )
    tokens = latents.shape[2] * (height // 16) * (width // 16) * bsz
    return StepOutput(result.loss, result.outliers, result.elements, bsz, tokens, inputs)


def zero_gradient_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], ctx: StepContext) -> torch.Tensor:
    """Stand-in loss of a micro-batch whose real loss is NaN/inf: its backward gives exactly zero gradients.

    It runs the same (wrapped) forward on all-zero inputs of the same shapes, so DDP/FSDP/ZeRO see the
    hooks and collectives of a normal micro-batch and DeepSpeed counts it. `nan_to_num(loss) * 0` is not
    enough: when the activations are non-finite, their backward multiplies the zero by NaN/inf."""
    zeros = {key: torch.zeros_like(value) if key != "audio_scale" else value for key, value in inputs.items()}
    with ctx.autocast():
        pred = model(**zeros)[0]
    return pred.float().sum() * 0.0
