"""Mapping stored tensor names onto a model's parameter names, checked on names and shapes before any data is read.

A `StateDictAdapter` says, for one stored format, where each stored key goes (possibly through a shape-level
`Transform`) and why a key may be dropped or a parameter left absent; `plan_mapping` turns it into a `MappingPlan`
that lists every problem at once. The formats themselves are in `state_dict_adapters`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

Shape = tuple[int, ...]


# --------------------------------------------------------------------------------------------------------------------
# Tensor transforms: how one stored tensor becomes (part of) one parameter.


@dataclass(frozen=True)
class Transform:
    """A shape-level change from a stored tensor to a parameter.

    ``identity``; ``squeeze`` keeps the last ``keep`` dims (open-clip stores ``cls_embedding`` as [1, 1, D] and
    ``pos_embedding`` as [1, N, D]); ``transpose`` swaps a 2-D tensor (open-clip's ``visual.head`` is [in, out]);
    ``chunk`` takes part ``index`` of ``parts`` equal slices along dim 0 (open-clip's fused ``to_qkv``).
    """

    kind: Literal["identity", "squeeze", "transpose", "chunk"] = "identity"
    keep: int = 0
    index: int = 0
    parts: int = 1

    def shape(self, shape: Sequence[int]) -> Shape | None:
        """The parameter shape this transform yields from a stored ``shape``; None when it cannot apply."""
        shape = tuple(int(s) for s in shape)
        if self.kind == "identity":
            return shape
        if self.kind == "squeeze":
            lead = shape[: len(shape) - self.keep]
            return shape[-self.keep :] if len(shape) >= self.keep and all(s == 1 for s in lead) else None
        if self.kind == "transpose":
            return (shape[1], shape[0]) if len(shape) == 2 else None
        if not shape or shape[0] % self.parts:
            return None
        return (shape[0] // self.parts, *shape[1:])

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        """Apply to a real tensor (a view where possible: no copy until the caller casts or moves it)."""
        if self.kind == "identity":
            return tensor
        if self.kind == "squeeze":
            return tensor.reshape(tensor.shape[-self.keep :])
        if self.kind == "transpose":
            return tensor.t().contiguous()
        size = tensor.shape[0] // self.parts
        return tensor.narrow(0, self.index * size, size)

    def __str__(self) -> str:
        return {"identity": "", "squeeze": f" (squeezed to {self.keep}-D)", "transpose": " (transposed)"}.get(
            self.kind, f" (part {self.index + 1} of {self.parts} along dim 0)"
        )


IDENTITY = Transform()
Target = tuple[str, Transform]


# --------------------------------------------------------------------------------------------------------------------
# Two-way name templates.


class Templates:
    """Pairs of name templates read in both directions.

    ``{i}`` is a block index, ``{p}`` a name part without dots, ``{kv}`` is ``k_proj`` or ``v_proj``, ``{qkvo}`` one
    of the letters q, k, v, o, ``{rest}`` any dotted tail. ``("blocks.{i}.attn.{qkvo}.weight",
    "encoder.block.{i}.layer.0.SelfAttention.{qkvo}.weight")`` maps a Wan T5 name to transformers' and back.
    """

    _GROUPS = {"i": r"\d+", "p": r"[A-Za-z0-9_]+", "kv": r"k_proj|v_proj", "qkvo": r"[qkvo]", "rest": r".+"}

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._forward = [(self._compile(a), b) for a, b in self.pairs]
        self._backward = [(self._compile(b), a) for a, b in self.pairs]

    @classmethod
    def _compile(cls, template: str) -> re.Pattern[str]:
        pattern = re.escape(template)
        for name, group in cls._GROUPS.items():
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
        return re.compile(f"^{pattern}$")

    @staticmethod
    def _apply(table: list[tuple[re.Pattern[str], str]], name: str) -> str | None:
        for pattern, template in table:
            match = pattern.match(name)
            if match:
                return template.format(**match.groupdict())
        return None

    def forward(self, name: str) -> str | None:
        """Left-hand (stored) name -> right-hand (ours), or None when no template matches."""
        return self._apply(self._forward, name)

    def backward(self, name: str) -> str | None:
        """Right-hand (ours) name -> left-hand (stored), or None when no template matches."""
        return self._apply(self._backward, name)


# --------------------------------------------------------------------------------------------------------------------
# The mapping plan: names and shapes only.


@dataclass
class MappingPlan:
    """What happens to every stored key and every model parameter, worked out before a byte of weights is read."""

    fmt: str
    moves: dict[str, list[Target]] = field(default_factory=dict)
    """Stored key -> the parameter(s) it fills."""
    ignored: dict[str, str] = field(default_factory=dict)
    """Stored key -> why it is dropped on purpose."""
    absent: dict[str, str] = field(default_factory=dict)
    """Model parameter left unfilled -> the allow-list reason."""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    filled_twice: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every stored key has a place and every parameter a source (or an allow-list reason)."""
        return not (self.missing or self.unexpected or self.wrong_shape or self.filled_twice)

    def filled(self) -> set[str]:
        """Model names some stored key fills."""
        return {target for targets in self.moves.values() for target, _ in targets}

    def problems(self, where: str, limit: int = 40) -> str:
        """A readable list of everything wrong, naming ``where`` (the file or folder) and each key."""
        lines = [f"{where} ({self.fmt} layout) does not match the model:"]
        for title, items in (
            ("wrong shape", self.wrong_shape),
            ("unexpected keys in the file (no parameter takes them)", self.unexpected),
            ("model parameters the file does not provide", self.missing),
            ("parameters filled by more than one stored key", self.filled_twice),
        ):
            if items:
                lines.append(f"  {len(items)} {title}:")
                lines += [f"    {item}" for item in sorted(items)[:limit]]
                if len(items) > limit:
                    lines.append(f"    ... and {len(items) - limit} more")
        return "\n".join(lines)


class StateDictAdapter:
    """One stored format: which model names its keys become, what it drops on purpose, what it may lack."""

    name = "identity"

    def prepare(self, keys: Iterable[str]) -> None:
        """See every stored key once before ``targets`` is asked (for renames computed on the whole set)."""

    def targets(self, key: str) -> list[Target] | None:
        """The parameter(s) ``key`` fills; None when the key is not part of this format."""
        return [(key, IDENTITY)]

    def ignore_reason(self, key: str) -> str | None:
        """Why ``key`` is dropped on purpose, or None."""
        return None

    def absent_reason(self, target: str) -> str | None:
        """Why the model parameter ``target`` may stay unfilled by this file (the allow-list), or None."""
        return None

    def surplus_reason(self, target: str) -> str | None:
        """Why a stored tensor may be dropped when the model has no parameter ``target`` (an optional head), or None."""
        return None


def plan_mapping(
    adapter: StateDictAdapter,
    stored: Mapping[str, Sequence[int]],
    model: Mapping[str, Sequence[int]],
    aliases: Mapping[str, str] | None = None,
    origin: Callable[[str], str] | None = None,
) -> MappingPlan:
    """Map every stored key (``{name: shape}``) onto the model's parameters (``{name: shape}``) by names and shapes.

    ``aliases`` maps a model name to the canonical name of the tensor it shares (tied weights): filling either fills
    both. ``origin`` names the file holding a stored key (for sharded sets). The result lists missing, unexpected,
    wrong-shape and doubly-filled names; nothing is raised here.
    """

    def where(key: str) -> str:
        return f" [in {origin(key)}]" if origin else ""

    aliases = dict(aliases or {})
    canonical = {name: aliases.get(name, name) for name in model}
    plan = MappingPlan(adapter.name)
    adapter.prepare(stored)
    filled_from: dict[str, str] = {}
    for key in sorted(stored):
        shape = tuple(int(s) for s in stored[key])
        reason = adapter.ignore_reason(key)
        if reason is not None:
            plan.ignored[key] = reason
            continue
        targets = adapter.targets(key)
        if targets is None:
            plan.unexpected.append(key + where(key))
            continue
        kept: list[Target] = []
        for target, transform in targets:
            if target not in model:
                surplus = adapter.surplus_reason(target)
                if surplus is not None:
                    plan.ignored[key] = surplus
                else:
                    plan.unexpected.append((f"{key} (would be {target})" if target != key else key) + where(key))
                continue
            got, want = transform.shape(shape), tuple(int(s) for s in model[target])
            if got != want:
                plan.wrong_shape.append(
                    f"{key}{transform}: file {list(shape)} -> {target} needs {list(want)}{where(key)}"
                )
                continue
            if target in filled_from:
                plan.filled_twice.append(f"{target} (from {filled_from[target]} and {key})")
                continue
            filled_from[target] = key
            kept.append((target, transform))
        if kept:
            plan.moves[key] = kept
    filled_roots = {canonical[target] for target in filled_from}
    for name in sorted(model):
        if canonical[name] in filled_roots:
            continue
        reason = adapter.absent_reason(name)
        if reason is not None:
            plan.absent[name] = reason
        else:
            plan.missing.append(name)
    return plan
