"""The denoising loop of FantasyTalking inference (`docs/inference.md#sampler`, `#guidance`): FlowMatch Euler with
the shifted schedule, and per step up to three transformer passes combined by the audio/prompt guidance formula.

Pure functions over explicit inputs and generators: the same code samples for `ftalk sample` and for validation
during training, and the tests capture the passes' predictions to check the combination against the formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NEGATIVE_PROMPT = (
    "人物静止不动，静止，色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)
"""Upstream `infer.py`'s negative prompt: Wan2.1's default with "the person stays motionless, still" in front
(`docs/inference.md#negative-prompt`)."""


@dataclass(frozen=True)
class Guidance:
    """How one denoising run is guided (upstream's flags, plus `audio_cfg_end`)."""

    num_inference_steps: int = 30
    prompt_cfg_scale: float = 5.0
    audio_cfg_scale: float = 5.0
    audio_scale: float = 1.0
    audio_cfg_end: float = 1.0
    """Fraction of the steps, from the first, that use audio guidance (three passes). The later steps use plain
    prompt guidance with the audio on in both passes, as upstream does without an audio guidance scale."""
    shift: float = 5.0

    def audio_guided_steps(self) -> int:
        """How many of the first steps use audio guidance: round(audio_cfg_end x steps), at least 1 when > 0."""
        if self.audio_cfg_end <= 0:
            return 0
        return min(self.num_inference_steps, max(1, round(self.audio_cfg_end * self.num_inference_steps)))


def inference_sigmas(steps: int, shift: float) -> torch.Tensor:
    """FlowMatch sigmas of inference (float64, noisiest first, then a final 0): linspace(1, 0, steps + 1) without
    its last entry, shifted as in training (s sigma / (1 + (s - 1) sigma)), with 0 appended for the last step."""
    sigma = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1]
    shifted = shift * sigma / (1.0 + (shift - 1.0) * sigma)
    return torch.cat([shifted, torch.zeros(1, dtype=torch.float64)])


def combine(
    posi: torch.Tensor,
    noaudio: torch.Tensor | None,
    uncond: torch.Tensor | None,
    *,
    prompt_cfg: float,
    audio_cfg: float | None,
) -> torch.Tensor:
    """The guided flow prediction (`docs/inference.md#guidance`).

    With audio guidance (``audio_cfg`` given): ``uncond + prompt_cfg (noaudio - uncond) + audio_cfg (posi -
    noaudio)``, or ``noaudio + audio_cfg (posi - noaudio)`` without an ``uncond`` pass (prompt_cfg 1). Without:
    ``uncond + prompt_cfg (posi - uncond)`` (here ``uncond`` ran with the audio on), or ``posi`` alone."""
    if audio_cfg is not None:
        if noaudio is None:
            raise ValueError("audio guidance needs the no-audio prediction")
        base = noaudio if uncond is None else uncond + prompt_cfg * (noaudio - uncond)
        return base + audio_cfg * (posi - noaudio)
    return posi if uncond is None else uncond + prompt_cfg * (posi - uncond)


@dataclass(frozen=True)
class Conditions:
    """What the transformer is conditioned on for one video, on the sampling device."""

    text: torch.Tensor
    """umT5 embedding of the prompt [1, 512, text_dim]."""
    negative_text: torch.Tensor
    """umT5 embedding of the negative prompt [1, 512, text_dim]."""
    image: torch.Tensor
    """CLIP embedding of the reference image [1, 257, image_dim]."""
    y: torch.Tensor
    """I2V condition [1, 4 + 16, T_lat, h, w]: the mask channels and the VAE latents of image + black frames."""
    audio: torch.Tensor
    """wav2vec2 features of the audio [1, L, audio_in_dim]."""


Predict = Callable[..., torch.Tensor]
"""``predict(latents, timestep, text=..., audio_scale=...) -> flow`` (the transformer pass, e.g. under autocast)."""


def denoise(
    predict: Predict,
    cond: Conditions,
    guidance: Guidance,
    *,
    generator: torch.Generator,
    dtype: torch.dtype,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Latents [1, 16, T_lat, h, w] (float32) denoised from seeded noise drawn on the CPU, as upstream does.

    ``predict(hidden_states, timestep, encoder_hidden_states, audio_scale)`` runs one transformer pass; it is
    called 3 times per audio-guided step (2 with prompt_cfg 1), then 2 (1) times per later step."""
    _, _, frames, height, width = cond.y.shape
    device = cond.y.device
    latents = torch.randn((1, 16, frames, height, width), generator=generator, dtype=torch.float32).to(device)
    sigmas = inference_sigmas(guidance.num_inference_steps, guidance.shift)
    audio_steps = guidance.audio_guided_steps()
    with_uncond = guidance.prompt_cfg_scale != 1.0
    for step in range(guidance.num_inference_steps):
        sigma, sigma_next = float(sigmas[step]), float(sigmas[step + 1])
        timestep = torch.tensor([sigma * 1000.0], dtype=torch.float32, device=device)
        hidden = torch.cat([latents, cond.y], dim=1).to(dtype)

        def run(text: torch.Tensor, audio_scale: float) -> torch.Tensor:
            return predict(hidden, timestep, text.to(dtype), audio_scale).float()  # noqa: B023 (called right away)

        posi = run(cond.text, guidance.audio_scale)
        if step < audio_steps:
            noaudio = run(cond.text, 0.0)
            uncond = run(cond.negative_text, 0.0) if with_uncond else None
            flow = combine(
                posi, noaudio, uncond, prompt_cfg=guidance.prompt_cfg_scale, audio_cfg=guidance.audio_cfg_scale
            )
        else:
            uncond = run(cond.negative_text, guidance.audio_scale) if with_uncond else None
            flow = combine(posi, None, uncond, prompt_cfg=guidance.prompt_cfg_scale, audio_cfg=None)
        latents = latents + flow * (sigma_next - sigma)
        if on_step is not None:
            on_step(step)
    return latents


def steps_count(guidance: Guidance) -> int:
    """Transformer passes of one video (for progress and timing)."""
    audio_steps = guidance.audio_guided_steps()
    per = 2 if guidance.prompt_cfg_scale != 1.0 else 1
    return audio_steps * (per + 1) + (guidance.num_inference_steps - audio_steps) * per
