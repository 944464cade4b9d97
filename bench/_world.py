"""Worlds for the benches (and the measured-memory test): the tests' tiny world, and the same world with a wider
FantasyTalking DiT written in the original Wan layout, so the DiT's share of a step is not lost in fixed costs.

The wide model folder reuses the tiny world's encoders, tokenizers and wav2vec2 (symlinked: the DiT's text, image
and audio widths stay the tiny ones) and writes its own DiT shards, original ``config.json`` and adapter file
(``fantasytalking_model.ckpt``, released nested format, random non-zero weights so every adapter weight gets a
gradient). Everything is loaded by the real loaders: no model object is handed over.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fantasytalk_cli.models.adapter_file import adapter_to_format
from fantasytalk_cli.models.layout import DIT_SHARD_PREFIX
from fantasytalk_cli.models.state_dict_adapters import dit_name_to_original
from fantasytalk_cli.models.tiny import TEXT_LEN, TINY_DIT, random_state, write_sharded_safetensors
from fantasytalk_cli.models.trainable import is_adapter_name
from fantasytalk_cli.models.weights import build_empty
from tests.tiny_world import build_world, world_config

__all__ = ["build_world", "wide_dit_config", "wide_world", "world_config", "write_wide_model"]

ADAPTER_FILE = "fantasytalking_model.ckpt"


def wide_dit_config(dim: int, layers: int, ffn: int, *, head_dim: int = 64, audio_proj_dim: int | None = None) -> dict:
    """`FantasyTalkingTransformer` kwargs: the tiny world's DiT (text/image/audio widths of its encoders) at width
    `dim` (heads of `head_dim`), `layers` blocks and FFN width `ffn`; the audio projection defaults to `dim / 2`."""
    if dim % head_dim:
        raise ValueError(f"dim {dim} is not a multiple of head_dim {head_dim}")
    return {
        **TINY_DIT,
        "num_attention_heads": dim // head_dim,
        "attention_head_dim": head_dim,
        "ffn_dim": ffn,
        "num_layers": layers,
        "added_kv_proj_dim": dim,
        "audio_proj_dim": audio_proj_dim or dim // 2,
    }


def _original_config(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The DiT's ``config.json`` in Wan's own keys (what `dit_config_from_original` reads back)."""
    return {
        "_class_name": "WanModel",
        "dim": kwargs["num_attention_heads"] * kwargs["attention_head_dim"],
        "eps": kwargs["eps"],
        "ffn_dim": kwargs["ffn_dim"],
        "freq_dim": kwargs["freq_dim"],
        "in_dim": kwargs["in_channels"],
        "model_type": "i2v",
        "num_heads": kwargs["num_attention_heads"],
        "num_layers": kwargs["num_layers"],
        "out_dim": kwargs["out_channels"],
        "text_dim": kwargs["text_dim"],
        "text_len": TEXT_LEN,
    }


def write_wide_model(tiny_model: Path, out: Path, kwargs: dict[str, Any], *, seed: int = 0, shards: int = 3) -> Path:
    """A base model folder at `out`: the DiT of `kwargs` (random, seeded) in the original layout, the tiny
    folder's other files symlinked, and a matching adapter file. Returns the adapter file's path."""
    import json

    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    out.mkdir(parents=True, exist_ok=False)
    skip = {"config.json", ADAPTER_FILE}
    for item in sorted(tiny_model.iterdir()):
        if item.name not in skip and not item.name.startswith(DIT_SHARD_PREFIX):
            (out / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    state = random_state(build_empty(lambda: FantasyTalkingTransformer(**kwargs)), seed * 100 + 1)
    base = {dit_name_to_original(k): v for k, v in state.items() if not is_adapter_name(k)}
    write_sharded_safetensors(base, out, DIT_SHARD_PREFIX, shards)
    (out / "config.json").write_text(json.dumps(_original_config(kwargs), indent=2) + "\n")
    adapter = {k: v for k, v in state.items() if is_adapter_name(k)}
    torch.save(adapter_to_format(adapter, "fantasytalking"), out / ADAPTER_FILE)
    return out / ADAPTER_FILE


def wide_world(root: Path, kwargs: dict[str, Any] | None, *, num_clips: int = 6, seed: int = 0) -> dict[str, Path]:
    """`build_world(root)`, and with `kwargs` a wide model folder beside the tiny one that the returned `model`
    path points at (`world_config` then trains it, adapter file included)."""
    world = build_world(root, num_clips=num_clips, seed=seed)
    if kwargs is not None:
        write_wide_model(world["model"], root / "wide_model", kwargs, seed=seed)
        world["model"] = root / "wide_model"
    return world
