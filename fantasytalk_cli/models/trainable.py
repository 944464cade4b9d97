"""What trains, in one place: the default `--trainable_modules`, the selection rule, which parameters are the audio
adapter (kept out of fp8 storage, loaded in the adapter's dtype, written to the released `.ckpt`), and the
trainable-parameter count the planner uses, taken from the real selection on the meta model.

Everything that asks "is this trained?" or "is this the adapter?" asks here (litgpt's `lora.py` with its save
filter: one module knows what trains). The module imports no torch at import time: the config schema reads
`DEFAULT_TRAINABLE_MODULES` from it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_TRAINABLE_MODULES: tuple[str, ...] = ("processor.", "proj_model.")
"""The seed's default `--trainable_modules`: substrings of parameter names selecting the audio adapter."""

LORA_TARGETS: dict[str, str] = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
"""The linears of a DiT block a LoRA may wrap: diffusers' name (inside `blocks.{i}.`) -> the original Wan name.
The audio k/v (`attn2.processor.*`) are the adapter's own weights, never LoRA targets."""
DEFAULT_LORA_TARGETS: tuple[str, ...] = tuple(n for n in LORA_TARGETS if "add_" not in n)
"""Each block's self- and cross-attention q/k/v/o and both FFN linears (the image k/v stay as they are), as
diffusers' and musubi-tuner's Wan LoRA scripts target them."""
LORA_PATTERNS: tuple[str, ...] = (".lora_A.", ".lora_B.")
"""Substrings of peft's LoRA parameter names (`blocks.0.attn1.to_q.lora_A.default.weight`)."""
LORA_AUDIO_DROPOUT = 0.1
"""`--audio_dropout` when a LoRA trains and the user did not set it: the audio-off pass of audio guidance is then the
LoRA'd model without audio, which it must learn (VideoX-Fun's InfiniteTalk/S2V and StableAvatar train with 0.1)."""


def lora_target_name(name: str) -> str:
    """A `--lora_target_modules` entry in diffusers' block-relative form (`attn1.to_q`); the original Wan name
    (`self_attn.q`) is accepted too. A `ValueError` lists the names that exist."""
    if name in LORA_TARGETS:
        return name
    for ours, original in LORA_TARGETS.items():
        if name == original:
            return ours
    listing = ", ".join(f"{ours} ({original})" for ours, original in LORA_TARGETS.items())
    raise ValueError(f"lora_target_modules: {name!r} is not a linear of a Wan block; the targets are: {listing}")


def is_lora_name(name: str) -> bool:
    """True for peft's LoRA parameters (``...lora_A.<adapter>.weight``, ``...lora_B.<adapter>.weight``)."""
    return any(p in name for p in LORA_PATTERNS)


def trained_patterns(trainable_modules: Iterable[str], lora_rank: int) -> tuple[str, ...]:
    """Everything that trains: the `--trainable_modules` substrings, plus the LoRA's parameters when it is on."""
    return (*trainable_modules, *(LORA_PATTERNS if lora_rank else ()))


ADAPTER_MODULE_PATTERN = r"^proj_model\.|\.attn2\.processor\."
"""The audio adapter's parameters (and leaf modules) under our names: the projector `proj_model.*` and each block's
audio k/v `blocks.{i}.attn2.processor.{k,v}_proj`. A regular expression, as diffusers' layerwise casting takes its
skip patterns."""
_ADAPTER_RE = re.compile(ADAPTER_MODULE_PATTERN)


def is_adapter_name(name: str) -> bool:
    """True for the FantasyTalking adapter's parameters under our names (``proj_model.*``, per-block audio k/v)."""
    return _ADAPTER_RE.search(name) is not None


def matching_names(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Parameter names of ``model`` containing any of ``patterns`` (the seed's selection rule); at least one
    non-empty pattern is required."""
    patterns = [p for p in patterns if p]
    if not patterns:
        raise ValueError("no trainable pattern given (e.g. 'processor.' 'proj_model.')")
    return [name for name, _ in model.named_parameters() if any(p in name for p in patterns)]


def set_trainable(model: nn.Module, patterns: Iterable[str]) -> int:
    """Make exactly the parameters matching ``patterns`` trainable; return their element count.

    Fails when nothing matches, since a typo in ``trainable_modules`` would otherwise train nothing silently.
    """
    patterns = list(patterns)
    names = set(matching_names(model, patterns))
    if not names:
        raise ValueError(f"trainable patterns {patterns} match no parameter of {type(model).__name__}")
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
        count += getattr(param, "ds_numel", param.numel()) if name in names else 0  # ZeRO-3: full size
    return count


def adapter_weights(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The audio adapter's tensors among ``weights`` (our names)."""
    return {name: tensor for name, tensor in weights.items() if is_adapter_name(name)}


def released_adapter(trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """What goes into the released FantasyTalking `.ckpt` of a checkpoint: the trained weights when they are exactly
    audio-adapter weights (the released file holds nothing else), else None (another selection is not that file)."""
    adapter = adapter_weights(trained)
    return adapter if adapter and len(adapter) == len(trained) else None


def trainable_count(
    transformer_config: Mapping[str, Any],
    patterns: Iterable[str] = DEFAULT_TRAINABLE_MODULES,
    lora: tuple[int, tuple[str, ...]] | None = None,
) -> tuple[int, int]:
    """(adapter, LoRA) trainable parameters of a run: ``patterns`` applied to the transformer of
    ``transformer_config`` built wholly on the meta device (nothing allocated: 0.2 s for the 14B's config), with a
    LoRA of ``lora`` = (rank, block-relative targets) injected as training injects it. Cached per arguments."""
    config_json = json.dumps(dict(transformer_config), sort_keys=True, default=str)
    return _trainable_count(config_json, tuple(patterns), lora)


@functools.lru_cache(maxsize=32)
def _trainable_count(
    config_json: str, patterns: tuple[str, ...], lora: tuple[int, tuple[str, ...]] | None
) -> tuple[int, int]:
    import torch

    from fantasytalk_cli.models.lora import LoraSpec, inject_lora
    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    with torch.device("meta"):
        model = FantasyTalkingTransformer.from_config(json.loads(config_json))
        if lora is not None:
            inject_lora(model, LoraSpec(rank=lora[0], alpha=float(lora[0]), dropout=0.0, targets=lora[1]))
    adapter = sum(p.numel() for n, p in model.named_parameters() if not is_lora_name(n) and _matches(n, patterns))
    lora_count = sum(p.numel() for n, p in model.named_parameters() if is_lora_name(n))
    return adapter, lora_count


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(p and p in name for p in patterns)
