"""Which on-disk layout a base model folder has, and the small file helpers every loader uses.

The two layouts (the original Wan2.1 folder and the diffusers folder) are described in ``docs/weights.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from fantasytalk_cli.config.wan_yaml import WanModelYaml, load_wan_yaml
from fantasytalk_cli.errors import FtalkError

Layout = Literal["original", "diffusers"]

DIT_SHARD_PREFIX = "diffusion_pytorch_model"
"""File stem of the DiT (and diffusers VAE) weights: ``<stem>.safetensors`` or ``<stem>-0000i-of-0000n`` + index."""


class ModelLoadError(FtalkError):
    """A model file is missing, unreadable, or does not match the model; the message names the file and keys."""


def wan_yaml_or_default(wan_yaml: WanModelYaml | None) -> WanModelYaml:
    """The given Wan yaml, else the embedded default one."""
    return wan_yaml if wan_yaml is not None else load_wan_yaml(None)


def detect_layout(model_dir: Path, wan_yaml: WanModelYaml | None = None) -> Layout:
    """``"diffusers"`` when the folder has ``model_index.json``; ``"original"`` when it has the Wan DiT's
    ``config.json`` or shards (where ``transformer_subpath`` says); otherwise a `ModelLoadError` listing the folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: base model folder not found")
    if (model_dir / "model_index.json").is_file():
        return "diffusers"
    dit_dir = model_dir / wan_yaml_or_default(wan_yaml).transformer_additional_kwargs.transformer_subpath
    if (dit_dir / "config.json").is_file() or any(dit_dir.glob(f"{DIT_SHARD_PREFIX}*.safetensors*")):
        return "original"
    found = sorted(p.name for p in model_dir.iterdir())[:20]
    raise ModelLoadError(
        f"{model_dir} is neither the original Wan2.1 layout (config.json, {DIT_SHARD_PREFIX}-*.safetensors + index, "
        "Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, ...) nor the diffusers layout (model_index.json, "
        f"transformer/, vae/, text_encoder/, ...); it holds: {found}"
    )


def need(path: Path, what: str) -> Path:
    """``path`` if it exists, else a `ModelLoadError` saying what it should have been."""
    if not path.exists():
        raise ModelLoadError(f"{path}: missing ({what})")
    return path


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object read from ``path``; a `ModelLoadError` naming the file when it is missing or malformed."""
    try:
        data = json.loads(need(path, what).read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data
