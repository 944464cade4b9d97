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


def trainable_count(transformer_config: Mapping[str, Any], patterns: Iterable[str] = DEFAULT_TRAINABLE_MODULES) -> int:
    """Trainable parameters of a run: ``patterns`` applied to the transformer of ``transformer_config`` built wholly
    on the meta device (nothing allocated: 0.2 s for the 14B's config). Cached per config and patterns."""
    return _trainable_count(json.dumps(dict(transformer_config), sort_keys=True, default=str), tuple(patterns))


@functools.lru_cache(maxsize=32)
def _trainable_count(config_json: str, patterns: tuple[str, ...]) -> int:
    import torch

    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    with torch.device("meta"):
        model = FantasyTalkingTransformer.from_config(json.loads(config_json))
    return set_trainable(model, patterns)
