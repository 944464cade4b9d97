"""The frozen encoders of the training step: VAE latents, umT5 caption embeddings, CLIP image features.

Each wrapper reproduces what Wan2.1 feeds its DiT: normalised VAE latents ``(mu - mean) / std`` per channel;
captions cleaned, tokenised to ``text_len`` (512) and encoded, with the embeddings beyond each caption's real length
set to zero (Wan keeps the true-length embeddings and zero-pads them); CLIP ViT-H/14 penultimate hidden states
(257 x 1280) of the first frame resized to 224 with Wan's CLIP mean/std. All stay in eval mode without gradients;
`FrozenEncoders` moves them together, and off the accelerator between uses when ``low_vram`` is set.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from fantasytalk_cli.config.wan_yaml import WanModelYaml, load_wan_yaml
from fantasytalk_cli.models.frozen_loading import load_image_encoder, load_text_encoder, load_tokenizer, load_vae
from fantasytalk_cli.models.weights import Device

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, PreTrainedTokenizerBase, UMT5EncoderModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean Wan normalises CLIP input with (OpenAI CLIP's), after mapping [-1, 1] pixels to [0, 1]."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std, as above."""


class _Frozen(nn.Module):
    """Always eval, never trainable: ``train()`` from a parent module cannot switch dropout back on."""

    def freeze(self) -> None:
        """Eval mode and ``requires_grad=False`` on everything."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> _Frozen:  # noqa: ARG002 (frozen on purpose)
        return super().train(False)


class VaeEncoder(_Frozen):
    """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, (F-1)/4+1, H/8, W/8], ``vae_mini_batch``
    videos at a time."""

    def __init__(self, vae: AutoencoderKLWan, mini_batch: int = 1) -> None:
        super().__init__()
        if mini_batch < 1:
            raise ValueError(f"vae_mini_batch must be >= 1, got {mini_batch}")
        self.vae = vae
        self.mini_batch = mini_batch
        config = vae.config
        self.register_buffer("latents_mean", torch.tensor(config.latents_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("latents_std", torch.tensor(config.latents_std, dtype=torch.float32), persistent=False)
        self.temporal = int(config.scale_factor_temporal or 4)
        self.spatial = int(config.scale_factor_spatial or 8)
        self.freeze()

    def normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the DiT's space: ``(z - mean) / std`` per channel, in float32."""
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        return (latents.float() - self.latents_mean.view(shape)) / self.latents_std.view(shape)

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of `normalise` (for decoding)."""
        shape = (1, -1) + (1,) * (latents.ndim - 2)
        return latents.float() * self.latents_std.view(shape) + self.latents_mean.view(shape)

    @torch.no_grad()
    def encode(
        self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Encode, then normalise. ``sample=True`` draws from the posterior (what the reference trainer trains on),
        ``False`` takes its mean (what inference uses)."""
        return torch.cat([self.normalise(d.sample(generator) if sample else d.mean) for d in self._posteriors(pixels)])

    def _posteriors(self, pixels: torch.Tensor) -> Iterator[Any]:
        """The VAE's latent distribution of ``pixels``, ``vae_mini_batch`` videos at a time (shapes checked first)."""
        self._check(pixels)
        param = next(self.vae.parameters())
        for chunk in pixels.split(self.mini_batch):
            yield self.vae.encode(chunk.to(device=param.device, dtype=param.dtype)).latent_dist

    def _check(self, pixels: torch.Tensor) -> None:
        if pixels.ndim != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, F, H, W], got {tuple(pixels.shape)}")
        frames, height, width = pixels.shape[2:]
        if (frames - 1) % self.temporal or height % self.spatial or width % self.spatial:
            raise ValueError(
                f"pixels {tuple(pixels.shape)}: frames must be {self.temporal}k+1 and H, W multiples of {self.spatial}"
            )

    @torch.no_grad()
    def posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent distribution in the DiT's space, ``vae_mini_batch`` videos at a time: (normalised mean,
        std / latents_std), float32 [B, 16, T, h, w]. ``mean + std * eps`` is a normalised posterior sample; the
        feature cache stores these two, so a cached step draws the same sample as an online one."""
        shape = (1, -1) + (1,) * (pixels.ndim - 2)
        means, stds = [], []
        for dist in self._posteriors(pixels):
            means.append(self.normalise(dist.mean))
            stds.append(dist.std.float() / self.latents_std.view(shape))
        return torch.cat(means), torch.cat(stds)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> pixels [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1] (float32), one video at a
        time (the VAE decodes in tiles when its tiling is enabled)."""
        param = next(self.vae.parameters())
        out = []
        for one in latents.split(1):
            video = self.vae.decode(self.denormalise(one).to(device=param.device, dtype=param.dtype)).sample
            out.append(video.float().clamp_(-1.0, 1.0))
        return torch.cat(out)


def clean_caption(text: str) -> str:
    """Wan's ``whitespace_clean(basic_clean(text))``: HTML entities unescaped twice, runs of whitespace collapsed.

    Wan also runs ``ftfy.fix_text``; that happens here too when ftfy is installed (it only repairs mojibake).
    """
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder(_Frozen):
    """Captions -> umT5 embeddings [B, text_len, d_model], zero beyond each caption's tokens (EOS included)."""

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = 512) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.freeze()

    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask [B, text_len]: cleaned, EOS appended, padded or truncated to ``text_len``."""
        batch = self.tokenizer(
            [clean_caption(c) for c in captions],
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Embeddings [B, text_len, d_model] in the encoder's dtype; rows past each caption's length are zero."""
        ids, mask = self.tokenize(captions)
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden * mask.unsqueeze(-1).to(hidden.dtype)


class ImageEncoder(_Frozen):
    """Images [B, 3, H, W] in [-1, 1] -> CLIP penultimate hidden states [B, 1 + (size/patch)^2, width]
    (257 x 1280 for ViT-H/14 at 224)."""

    def __init__(self, model: CLIPVisionModel) -> None:
        super().__init__()
        self.model = model
        self.image_size = int(model.config.image_size)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Wan's CLIP preprocessing: bicubic resize to ``image_size`` square (no crop), [-1, 1] -> [0, 1], mean/std."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        size = (self.image_size, self.image_size)
        resized = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        return (resized * 0.5 + 0.5 - self.mean.to(resized.device)) / self.std.to(resized.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate hidden states (Wan's ``use_31_block``: the output of all blocks but the last, no post-norm)."""
        param = next(self.model.parameters())
        pixels = self.preprocess(images.to(param.device)).to(param.dtype)
        return self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


class FrozenEncoders(nn.Module):
    """The frozen encoders together (VAE, text, image, and optionally audio), moved as one.

    With ``low_vram`` they live on the CPU and visit the accelerator only inside `on` blocks.
    """

    def __init__(
        self,
        vae: VaeEncoder | None,
        text: TextEncoder | None,
        image: ImageEncoder | None,
        audio: nn.Module | None = None,
        *,
        low_vram: bool = False,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.text = text
        self.image = image
        self.audio = audio
        self.low_vram = low_vram
        if audio is not None:
            audio.requires_grad_(False).eval()

    def train(self, mode: bool = True) -> FrozenEncoders:  # noqa: ARG002 (frozen on purpose)
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Where the encoders' weights are now (the CPU when none is loaded)."""
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    def offload(self) -> FrozenEncoders:
        """Move everything to the CPU (frees accelerator memory between uses)."""
        return self.to("cpu")

    @contextmanager
    def on(self, device: Device) -> Iterator[FrozenEncoders]:
        """Use the encoders on ``device``; with ``low_vram`` they go back to the CPU afterwards."""
        self.to(device)
        try:
            yield self
        finally:
            if self.low_vram:
                self.offload()


def load_frozen_encoders(
    model_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    wan_yaml: WanModelYaml | None = None,
    vae_mini_batch: int = 1,
    device: Device = "cpu",
    low_vram: bool = False,
    audio: nn.Module | None = None,
    vae_dtype: torch.dtype | None = None,
    text: bool = True,
    video: bool = True,
) -> FrozenEncoders:
    """Load the VAE, umT5 (+ tokenizer) and CLIP of ``model_dir`` (either layout) as `FrozenEncoders`; ``text`` /
    ``video`` False leave umT5 / the VAE and CLIP out (the feature cache holds what they would compute).

    ``text_len`` comes from ``text_encoder_kwargs.text_length`` of the model YAML (512). With ``low_vram`` the
    encoders are loaded onto the CPU whatever ``device`` says.
    """
    wan_yaml = wan_yaml if wan_yaml is not None else load_wan_yaml(None)
    where: Device = "cpu" if low_vram else device
    text_encoder = vae = image = None
    if video:
        vae = VaeEncoder(load_vae(model_dir, dtype=vae_dtype or dtype, wan_yaml=wan_yaml, device=where), vae_mini_batch)
        image = ImageEncoder(load_image_encoder(model_dir, dtype=dtype, wan_yaml=wan_yaml, device=where))
    if text:
        text_encoder = TextEncoder(
            load_text_encoder(model_dir, dtype=dtype, wan_yaml=wan_yaml, device=where),
            load_tokenizer(model_dir, wan_yaml=wan_yaml),
            wan_yaml.text_encoder_kwargs.text_length,
        )
    return FrozenEncoders(vae, text_encoder, image, audio, low_vram=low_vram).to(where)


@dataclass
class VideoConditions:
    """What a batch's video gives the step: the latent distribution (normalised mean and std), the I2V condition's
    first-frame latents and the CLIP embedding of frame 0; from the encoders, or from the feature cache."""

    mean: torch.Tensor
    std: torch.Tensor
    first: torch.Tensor
    image: torch.Tensor


VIDEO_TENSORS = tuple(f.name for f in fields(VideoConditions))
"""The tensors of `VideoConditions`, under the names the feature cache stores them."""


def encode_video(encoders: FrozenEncoders, pixels: torch.Tensor) -> VideoConditions:
    """Encode pixels [B, 3, F, H, W] in [-1, 1]: the VAE posterior, the first frame followed by zeros through the
    VAE (posterior mean), and CLIP of frame 0 (as upstream's I2V conditioning)."""
    mean, std = encoders.vae.posterior(pixels)
    first_only = torch.cat([pixels[:, :, :1], torch.zeros_like(pixels[:, :, 1:])], dim=2)
    return VideoConditions(
        mean, std, encoders.vae.encode(first_only, sample=False), encoders.image.encode(pixels[:, :, 0])
    )
