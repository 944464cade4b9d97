"""The transformer dims a memory estimate uses: the configured base model's, read as training reads them, else the
built-in Wan2.1-I2V-14B config with a note saying why."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fantasytalk_cli.config.load import ConfigError
from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.models.dims import WAN21_I2V_14B_CONFIG
from fantasytalk_cli.models.dit_config import adapter_dims, dit_files, find_wav2vec
from fantasytalk_cli.models.layout import ModelLoadError
from fantasytalk_cli.planning.model_size import transformer_params


def default_transformer_config() -> dict[str, Any]:
    """The real model's transformer config (Wan2.1-I2V-14B + FantasyTalking adapter)."""
    return dict(WAN21_I2V_14B_CONFIG)


BUILTIN_MODEL = "the built-in Wan2.1-I2V-14B + FantasyTalking config"


@dataclass(frozen=True)
class ModelDims:
    """The transformer config a memory estimate uses, where it came from, and what the user should know."""

    config: dict[str, Any]
    source: str
    notes: list[str] = field(default_factory=list)


def configured_model_dims(model: ModelConfig) -> ModelDims:
    """The transformer dims of the configured base model, read as training reads them: the loaders' own reader of
    the folder's DiT `config.json` (with the sizes the original layout leaves to the stored shapes), the adapter
    dims from the wav2vec2 width and the adapter file (`adapter_dims`). Without a folder, or when it cannot be
    read, the built-in 14B config, with a note saying so. The encoders are the released Wan2.1 ones either way."""
    base = model.pretrained_model_name_or_path
    if base is None:
        note = f"no --pretrained_model_name_or_path: memory estimated with {BUILTIN_MODEL}"
        return ModelDims(default_transformer_config(), BUILTIN_MODEL, [note])
    try:
        layout, folder, config, _ = dit_files(Path(base), load_wan_yaml(model.config_path))
    except (ModelLoadError, ConfigError, OSError) as exc:
        note = f"cannot read the transformer config of {base} ({exc}): memory estimated with {BUILTIN_MODEL}"
        return ModelDims(default_transformer_config(), BUILTIN_MODEL, [note])
    notes: list[str] = []
    try:
        given = adapter_dims(find_wav2vec(model), model.transformer_path)
    except (ModelLoadError, OSError, KeyError, ValueError) as exc:
        given = {}
        notes.append(f"adapter dims not read ({exc}): FantasyTalking's defaults assumed")
    dims = {k: v for k, v in config.items() if not k.startswith("_")}
    for key in ("audio_in_dim", "audio_proj_dim"):  # as `load_transformer`: the config's, else given, else default
        dims.setdefault(key, given.get(key, WAN21_I2V_14B_CONFIG[key]))
    source = f"{folder / 'config.json'} ({layout} layout)"
    try:
        params = transformer_params(dims)
    except (KeyError, TypeError, ValueError) as exc:
        note = f"{source} lacks a size the estimate needs ({exc}): memory estimated with {BUILTIN_MODEL}"
        return ModelDims(default_transformer_config(), BUILTIN_MODEL, [note])
    if params != transformer_params(WAN21_I2V_14B_CONFIG):
        notes.append("frozen encoders counted at the sizes of the released Wan2.1 ones (not read from the folder)")
    return ModelDims(dims, source, notes)
