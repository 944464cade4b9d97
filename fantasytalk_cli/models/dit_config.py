"""The DiT's configuration and the adapter's sizes, read from a model folder without building anything.

Used by `dit_loading` to build the transformer and by the planner's memory estimate (`planning.model_dims`), so
that both read the same sizes. The original Wan ``config.json`` and the diffusers one are described in
``docs/weights.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.config.wan_yaml import WanModelYaml
from fantasytalk_cli.models.adapter_file import read_adapter_file
from fantasytalk_cli.models.key_mapping import Shape
from fantasytalk_cli.models.layout import (
    DIT_SHARD_PREFIX,
    Layout,
    ModelLoadError,
    detect_layout,
    read_json,
    wan_yaml_or_default,
)
from fantasytalk_cli.models.weights import TensorSource, safetensors_source

WAV2VEC_DIR = "wav2vec2-base-960h"
"""The wav2vec2 folder looked for inside or beside the base model folder when ``--wav2vec_path`` is not given."""

WAN_DIT_DEFAULTS: dict[str, Any] = {
    "model_type": "t2v",
    "patch_size": [1, 2, 2],
    "text_len": 512,
    "in_dim": 16,
    "dim": 2048,
    "ffn_dim": 8192,
    "freq_dim": 256,
    "text_dim": 4096,
    "out_dim": 16,
    "num_heads": 16,
    "num_layers": 32,
    "window_size": [-1, -1],
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
"""Wan's ``WanModel`` constructor defaults: what an original ``config.json`` leaves out means these."""


def dit_config_from_original(config: Mapping[str, Any], shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """An original Wan ``config.json`` (``dim``, ``num_heads``, ``in_dim``...) -> diffusers constructor kwargs.

    Keys it leaves out take ``WanModel``'s defaults; the CLIP width (``image_dim``), which ``WanModel`` hard-codes
    to 1280, is read from the stored ``img_emb.proj.0.weight`` shape.
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in WAN_DIT_DEFAULTS)
    if unknown:
        raise ModelLoadError(f"{path}: keys Wan's WanModel does not take: {unknown}")
    cfg = {**WAN_DIT_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cfg["model_type"] != "i2v":
        raise ModelLoadError(f"{path}: model_type {cfg['model_type']!r}; FantasyTalking needs the I2V DiT ('i2v')")
    if list(cfg["window_size"]) != [-1, -1]:
        raise ModelLoadError(f"{path}: window_size {cfg['window_size']} (local attention) is not supported")
    dim, heads = int(cfg["dim"]), int(cfg["num_heads"])
    if dim % heads:
        raise ModelLoadError(f"{path}: dim {dim} is not divisible by num_heads {heads}")
    image_key = "img_emb.proj.0.weight"
    if image_key not in shapes:
        raise ModelLoadError(f"{path}: the I2V DiT weights lack {image_key!r} (the CLIP image embedding)")
    return {
        "patch_size": list(cfg["patch_size"]),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(cfg["in_dim"]),
        "out_channels": int(cfg["out_dim"]),
        "text_dim": int(cfg["text_dim"]),
        "freq_dim": int(cfg["freq_dim"]),
        "ffn_dim": int(cfg["ffn_dim"]),
        "num_layers": int(cfg["num_layers"]),
        "cross_attn_norm": bool(cfg["cross_attn_norm"]),
        "qk_norm": "rms_norm_across_heads" if cfg["qk_norm"] else None,
        "eps": float(cfg["eps"]),
        "image_dim": int(shapes[image_key][0]),
        "added_kv_proj_dim": dim,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def dit_files(model_dir: Path, wan_yaml: WanModelYaml | None) -> tuple[Layout, Path, dict[str, Any], TensorSource]:
    """The DiT of a model folder in either layout: (layout, folder, diffusers-style config, tensor source)."""
    layout = detect_layout(model_dir, wan_yaml)
    if layout == "original":
        folder = model_dir / wan_yaml_or_default(wan_yaml).transformer_additional_kwargs.transformer_subpath
        source = safetensors_source(folder, DIT_SHARD_PREFIX, "Wan DiT weights")
        config_path = folder / "config.json"
        config = dit_config_from_original(read_json(config_path, "Wan DiT config"), source.shapes, config_path)
    else:
        folder = model_dir / "transformer"
        source = safetensors_source(folder, DIT_SHARD_PREFIX, "diffusers transformer weights")
        config = read_json(folder / "config.json", "diffusers transformer config")
    return layout, folder, config, source


def find_wav2vec(model: ModelConfig) -> Path:
    """`--wav2vec_path`, else `wav2vec2-base-960h/` inside or beside the base model folder."""
    if model.wav2vec_path is not None:
        return model.wav2vec_path
    base = model.pretrained_model_name_or_path
    if base is None:
        raise ModelLoadError("--pretrained_model_name_or_path is required: the Wan2.1-I2V base model folder")
    for candidate in (base / WAV2VEC_DIR, base.parent / WAV2VEC_DIR):
        if candidate.is_dir():
            return candidate
    raise ModelLoadError(
        f"no wav2vec2 folder found: looked for {base / WAV2VEC_DIR} and {base.parent / WAV2VEC_DIR}; "
        "pass --wav2vec_path (a local facebook/wav2vec2-base-960h download)"
    )


def adapter_dims(wav2vec_dir: Path, adapter_path: Path | None) -> dict[str, int]:
    """The adapter's sizes: input = the wav2vec2 width (768 for base-960h), projection = what the adapter
    file holds (2048 in the release), else FantasyTalking's default."""
    config = json.loads((wav2vec_dir / "config.json").read_text())
    dims = {"audio_in_dim": int(config["hidden_size"])}
    if adapter_path is not None:
        _, source = read_adapter_file(adapter_path)
        proj = source.shapes.get("proj_model.proj.weight")  # absent in a base-only transformer file
        if proj is not None:
            dims["audio_proj_dim"] = int(proj[0])
    return dims
