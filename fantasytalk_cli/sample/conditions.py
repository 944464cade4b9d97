"""What a video is conditioned on, encoded by the frozen encoders: the prompt and the negative prompt (umT5), the
reference image (CLIP, and the I2V condition through the VAE), the audio (wav2vec2), as upstream inference builds
them (`docs/inference.md#inputs-and-image-size`, `#frame-count-and-audio-cut`) and as training does."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from fantasytalk_cli.models.audio import SAMPLE_RATE, Wav2Vec2Features, load_audio
from fantasytalk_cli.models.encoders import ImageEncoder, TextEncoder, VaeEncoder
from fantasytalk_cli.runtime.flow import i2v_mask


def encode_prompts(text: TextEncoder, prompts: Sequence[str], device: torch.device) -> list[torch.Tensor]:
    """umT5 embeddings [1, 512, text_dim] of each prompt, on ``device`` (one encoder pass per distinct prompt)."""
    distinct = list(dict.fromkeys(prompts))
    encoded = text.encode(distinct).to(device)
    by_prompt = {prompt: encoded[i : i + 1] for i, prompt in enumerate(distinct)}
    return [by_prompt[prompt] for prompt in prompts]


def image_pixels(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> [1, 3, H, W] in [-1, 1] (float32) on ``device``."""
    pixels = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1).unsqueeze(0)
    return pixels.float().div_(127.5).sub_(1.0)


@torch.no_grad()
def image_conditions(
    vae: VaeEncoder, clip: ImageEncoder, image: np.ndarray, num_frames: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP embedding [1, 257, image_dim], I2V condition y [1, 20, T_lat, h, w]) of the reference image: y is the
    4 mask channels then the VAE latents (posterior mean) of the image followed by ``num_frames - 1`` black frames."""
    pixels = image_pixels(image, device)
    video = torch.cat(
        [pixels.unsqueeze(2), torch.zeros_like(pixels).unsqueeze(2).expand(-1, -1, num_frames - 1, -1, -1)], 2
    )
    first = vae.encode(video, sample=False).to(device)
    mask = i2v_mask(num_frames, first.shape[-2], first.shape[-1], device=device)
    y = torch.cat([mask.unsqueeze(0), first], dim=1)
    return clip.encode(pixels).to(device), y


def audio_condition(
    wav2vec: Wav2Vec2Features, audio_path: Path, num_frames: int, fps: float, device: torch.device
) -> torch.Tensor:
    """wav2vec2 features [1, L, hidden] of the audio's first ``num_frames / fps`` seconds at 16 kHz (upstream cuts
    ``int(num_frames / fps * 16000)`` samples, fewer when the audio ends first)."""
    samples = load_audio(audio_path, SAMPLE_RATE)[: int(num_frames / fps * SAMPLE_RATE)]
    return wav2vec(samples).to(device).float()


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels [1, 3, F, H, W] in [-1, 1] -> RGB uint8 [F, H, W, 3] (rounded)."""
    video = ((pixels[0].float().clamp(-1, 1) + 1.0) * 127.5).round_().to(torch.uint8)
    return video.permute(1, 2, 3, 0).contiguous().cpu().numpy()
