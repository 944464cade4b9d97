"""The reference layout's model config YAML (`--config_path`, e.g. `config/wan2.1/wan_civitai.yaml`).

It says where each sub-model lives inside the base model folder and how the flow-matching scheduler
is set. Users bring their existing file, so keys of the reference format are accepted as written;
keys unknown to ftalk are kept (the reference ignores many of them too) and listed by `unknown_keys`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fantasytalk_cli.config.load import ConfigError, format_validation_error, read_yaml


class _Part(BaseModel):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


class TransformerPart(_Part):
    transformer_subpath: str = "./"
    """Folder of the DiT shards, relative to the base model folder."""


class VaePart(_Part):
    vae_subpath: str = "Wan2.1_VAE.pth"
    """VAE weights file."""
    temporal_compression_ratio: int = 4
    """Frames per latent frame."""
    spatial_compression_ratio: int = 8
    """Pixels per latent pixel."""


class TextEncoderPart(_Part):
    text_encoder_subpath: str = "models_t5_umt5-xxl-enc-bf16.pth"
    """umT5 encoder weights file (Wan naming)."""
    tokenizer_subpath: str = "google/umt5-xxl"
    """Tokenizer folder."""
    text_length: int = 512
    """Tokens per caption after padding."""


class ImageEncoderPart(_Part):
    image_encoder_subpath: str = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    """open-clip XLM-R ViT-H/14 weights file."""


class SchedulerPart(_Part):
    num_train_timesteps: int = Field(1000, ge=1)
    """Discrete training timesteps."""
    shift: float = Field(5.0, gt=0)
    """Flow-matching sigma shift: s*sigma / (1 + (s-1)*sigma)."""


class WanModelYaml(BaseModel):
    """The whole model config file."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)

    format: str = "civitai"
    """`civitai` = the original Wan file layout."""
    pipeline: str = "Wan"
    """Pipeline family."""
    transformer_additional_kwargs: TransformerPart = Field(default_factory=TransformerPart)
    vae_kwargs: VaePart = Field(default_factory=VaePart)
    text_encoder_kwargs: TextEncoderPart = Field(default_factory=TextEncoderPart)
    image_encoder_kwargs: ImageEncoderPart = Field(default_factory=ImageEncoderPart)
    scheduler_kwargs: SchedulerPart = Field(default_factory=SchedulerPart)

    def unknown_keys(self) -> list[str]:
        """Dotted keys present in the file that ftalk does not use."""
        found = [str(k) for k in (self.model_extra or {})]
        for name in type(self).model_fields:
            part = getattr(self, name)
            if isinstance(part, BaseModel):
                found += [f"{name}.{k}" for k in (part.model_extra or {})]
        return found


def load_wan_yaml(path: Path | None) -> WanModelYaml:
    """Read `--config_path`; without one, the Wan2.1 defaults."""
    if path is None:
        return WanModelYaml()
    data: dict[str, Any] = read_yaml(path)
    try:
        return WanModelYaml.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from exc
