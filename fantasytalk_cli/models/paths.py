"""The model files a run reads, checked to exist before anything slow (no file is opened): training and the feature
cache call this first, so a wrong path costs seconds, not a queued GPU job."""

from __future__ import annotations

from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.models.dit_config import find_wav2vec


def check_model_paths(model: ModelConfig) -> None:
    """The model files the run will read exist (no file is opened): the base folder, the adapter or
    transformer file, the model config and the wav2vec2 folder."""
    base = model.pretrained_model_name_or_path
    if base is None:
        raise FtalkError("--pretrained_model_name_or_path is required: the Wan2.1-I2V base model folder")
    if not base.is_dir():
        state = "is a file, not a folder" if base.exists() else "does not exist"
        raise FtalkError(f"--pretrained_model_name_or_path {base} {state}: give the Wan2.1-I2V base model folder")
    for flag, path in (("--transformer_path", model.transformer_path), ("--config_path", model.config_path)):
        if path is not None and not path.is_file():
            state = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise FtalkError(f"{flag} {path} {state}")
    wav2vec = find_wav2vec(model)
    if not (wav2vec / "config.json").is_file():
        raise FtalkError(f"wav2vec2 folder {wav2vec} has no config.json: give a local facebook/wav2vec2-base-960h")
