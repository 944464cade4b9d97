"""A LoRA on the DiT's block linears, through peft as diffusers' own training scripts add one (`LoraConfig` and the
transformer's `add_adapter`), not hand-written layers.

peft wraps each target linear: the base weight moves to ``<module>.base_layer.weight`` and the LoRA is
``<module>.lora_A.default.weight`` [r, in] and ``<module>.lora_B.default.weight`` [out, r], scaled by alpha / r.
It is injected after the base weights are loaded (and after float8 storage was set up: the base linear keeps its
casting hook), and initialised here, in float32 from its own seeded generator, whatever the base dtype: lora_A as
peft's default (Kaiming-uniform), lora_B zero, so step 0 is exactly the base model and every rank and strategy
starts from the same bits without drawing from the training's random streams.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from fantasytalk_cli.models.trainable import DEFAULT_LORA_TARGETS, is_lora_name

ADAPTER_NAME = "default"
"""peft's adapter name: the infix of every LoRA parameter name."""
_BLOCK_PREFIX = re.compile(r"^blocks\.\d+\.")
LORA_SEED_OFFSET = 7919
"""Added to the training seed for the LoRA's init generator (a stream of its own)."""


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA: its rank, alpha (scale = alpha / rank), dropout and block-relative target linears."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def target_regex(self) -> str:
        """peft's `target_modules` as a regular expression (matched in full against module names)."""
        return r"blocks\.\d+\.(" + "|".join(t.replace(".", r"\.") for t in self.targets) + ")"

    def describe(self) -> str:
        return f"LoRA rank {self.rank}, alpha {self.alpha:g} (scale {self.scale:g}) on {', '.join(self.targets)}"

    def recorded(self) -> dict[str, object]:
        """What a checkpoint and an exported file record of it."""
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}


class LoraFields(Protocol):
    """The `model` config section's LoRA fields (the schema's `ModelConfig`)."""

    lora_rank: int
    lora_alpha: float | None
    lora_dropout: float
    lora_target_modules: list[str]


def lora_of(model: LoraFields) -> LoraSpec | None:
    """The LoRA `--lora_rank` (0: none), `--lora_alpha` (default: the rank, scale 1), `--lora_dropout` and
    `--lora_target_modules` ask for."""
    if model.lora_rank <= 0:
        return None
    alpha = float(model.lora_alpha if model.lora_alpha is not None else model.lora_rank)
    return LoraSpec(model.lora_rank, alpha, model.lora_dropout, tuple(model.lora_target_modules))


def inject_lora(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Wrap ``spec.targets`` of every block with peft's LoRA layers (diffusers' `add_adapter`); returns the wrapped
    module names. Weights are left as peft makes them (see `init_lora`)."""
    from peft import LoraConfig

    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_regex(),
        init_lora_weights=True,
    )
    model.add_adapter(config, adapter_name=ADAPTER_NAME)  # type: ignore[operator]
    return sorted(lora_layers(model))


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of ``model`` by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def init_lora(model: nn.Module, seed: int) -> None:
    """Give every LoRA weight its float32 start: lora_A Kaiming-uniform (a = sqrt(5), peft's default) drawn from a
    generator of ``seed`` in module order, lora_B zero. Deterministic, and blind to the global random state."""
    generator = torch.Generator().manual_seed(seed + LORA_SEED_OFFSET)
    for _, layer in sorted(lora_layers(model).items()):
        down, up = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
        start = torch.empty(down.weight.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(start, a=math.sqrt(5), generator=generator)
        device = down.weight.device
        down.weight = nn.Parameter(start.to(device), requires_grad=down.weight.requires_grad)
        up.weight = nn.Parameter(
            torch.zeros(up.weight.shape, dtype=torch.float32, device=device), requires_grad=up.weight.requires_grad
        )


def add_lora(model: nn.Module, spec: LoraSpec, seed: int) -> int:
    """Inject and initialise the LoRA of ``spec`` (float32, step 0 = the base); returns its parameter count."""
    if not inject_lora(model, spec):
        raise ValueError(f"{spec.describe()}: no module of {type(model).__name__} matched")
    init_lora(model, seed)
    return sum(p.numel() for n, p in model.named_parameters() if is_lora_name(n))


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Scale the LoRA's contribution by ``scale`` (1 = as trained, 0 = the base): peft's per-layer `set_scale`."""
    for layer in lora_layers(model).values():
        layer.set_scale(ADAPTER_NAME, scale)


def lora_in(shapes: Mapping[str, Sequence[int]], recorded: Mapping[str, object]) -> tuple[LoraSpec | None, list[str]]:
    """The LoRA a set of trained tensors holds (peft names -> shapes), with notes: rank and targets from the
    tensors, alpha and dropout from ``recorded`` (a checkpoint's recorded `model` config section) where it has them,
    else alpha = rank (scale 1), said in a note. (None, []) when there is no LoRA."""
    downs = {name: shape for name, shape in shapes.items() if ".lora_A." in name}
    if not downs:
        return None, []
    ranks = {int(shape[0]) for shape in downs.values()}
    if len(ranks) != 1:
        raise ValueError(f"the LoRA tensors have several ranks {sorted(ranks)}: not one LoRA ftalk trained")
    rank = ranks.pop()
    targets = sorted({_BLOCK_PREFIX.sub("", name.split(".lora_A.")[0]) for name in downs})
    notes = []
    alpha = recorded.get("lora_alpha")
    if recorded.get("lora_rank") == rank and alpha is None:
        alpha = float(rank)  # trained with the default alpha: the rank
    elif recorded.get("lora_rank") != rank or not isinstance(alpha, (int, float)):
        alpha = float(rank)
        notes.append(f"the LoRA's alpha is not recorded with it: taken as its rank {rank} (scale 1)")
    dropout = recorded.get("lora_dropout")
    spec = LoraSpec(rank, float(alpha), float(dropout) if isinstance(dropout, (int, float)) else 0.0, tuple(targets))
    return spec, notes
