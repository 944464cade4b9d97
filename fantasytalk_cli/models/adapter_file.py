"""The adapter (or a whole transformer) from ``--transformer_path`` in any released form, and back.

Forms (``docs/model.md#adapter-checkpoint-formats``): the released nested ``fantasytalking_model.ckpt``, flat
safetensors, ComfyUI's re-pack, and whole transformers with diffusers or original Wan names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fantasytalk_cli.models.key_mapping import MappingPlan, StateDictAdapter
from fantasytalk_cli.models.layout import ModelLoadError, need
from fantasytalk_cli.models.state_dict_adapters import (
    AdapterFileAdapter,
    DitAdapter,
    adapter_name_to_form,
    dit_name_to_original,
)
from fantasytalk_cli.models.trainable import is_adapter_name
from fantasytalk_cli.models.weights import (
    ShardedBuild,
    TensorSource,
    load_torch_file,
    plan_for,
    safetensors_source,
    stream_into,
    write_sharded,
)

AdapterFormat = Literal["fantasytalking", "flat", "comfyui", "diffusers", "original"]

FORM_DESCRIPTIONS: dict[str, str] = {
    "fantasytalking": "the released fantasytalking_model.ckpt ({'proj_model': ..., 'audio_processor': ...})",
    "flat": "flat adapter safetensors (proj_model.* / audio_processor.*)",
    "comfyui": "ComfyUI adapter re-pack (proj_model.*, blocks.N.cross_attn.k_proj/v_proj)",
    "diffusers": "transformer weights with diffusers names",
    "original": "transformer weights with original Wan names",
}


@dataclass(frozen=True)
class AdapterLoadReport:
    """What `load_adapter_or_transformer` found and loaded."""

    path: Path
    form: AdapterFormat
    content: Literal["adapter", "transformer", "transformer+adapter"]
    tensors: int

    def summary(self) -> str:
        """One line for the console."""
        return f"{self.path.name}: {FORM_DESCRIPTIONS[self.form]}; loaded {self.content} ({self.tensors} tensors)"


_COMFYUI_KEY = re.compile(r"^blocks\.\d+\.cross_attn\.(k_proj|v_proj)\.weight$")


def _classify(keys: list[str], nested: bool, path: Path) -> AdapterFormat:
    if nested:
        return "fantasytalking"
    if any(k.startswith("audio_processor.") for k in keys):
        return "flat"
    if any(_COMFYUI_KEY.match(k) for k in keys):
        return "comfyui"
    diffusers_marks = ("condition_embedder.", ".attn1.", ".attn2.", "proj_out.", "scale_shift_table")
    original_marks = (".self_attn.", ".cross_attn.", "time_embedding.", "head.head.", "modulation")
    if any(m in k for k in keys for m in diffusers_marks):
        return "diffusers"
    if any(m in k for k in keys for m in original_marks):
        return "original"
    if keys and all(k.startswith("proj_model.") for k in keys):
        return "flat"
    raise ModelLoadError(f"{path}: not an adapter or transformer file I know (first keys: {sorted(keys)[:8]})")


def read_adapter_file(path: Path) -> tuple[AdapterFormat, TensorSource]:
    """Open ``path`` (``.safetensors``, or a torch ``.ckpt``/``.pt``/``.pth``/``.bin``) and say which form it is.

    The released nested ckpt is flattened to ``proj_model.<name>`` / ``audio_processor.<name>``.
    """
    path = Path(path)
    need(path, "--transformer_path")
    for suffix in (".safetensors", ".safetensors.index.json"):
        if path.name.endswith(suffix):
            stem = path.name.removesuffix(suffix)
            source = safetensors_source(path.parent, stem, "--transformer_path", single_only=suffix == ".safetensors")
            return _classify(list(source.shapes), False, path), source
    data = load_torch_file(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    nested = set(data) == {"proj_model", "audio_processor"} and all(isinstance(v, dict) for v in data.values())
    if nested:
        data = {f"{part}.{name}": tensor for part, sub in data.items() for name, tensor in sub.items()}
    bad = sorted(k for k, v in data.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ModelLoadError(f"{path}: entries that are not tensors: {bad[:10]}")
    source = TensorSource(path, {path: sorted(data)}, {k: tuple(v.shape) for k, v in data.items()}, data)
    return _classify(list(data), nested, path), source


@dataclass(frozen=True)
class AdapterFilePlan:
    """An adapter or transformer file checked against a model's names and shapes, before any data is read."""

    path: Path
    form: AdapterFormat
    source: TensorSource
    plan: MappingPlan
    content: Literal["adapter", "transformer", "transformer+adapter"]


def plan_adapter_file(path: Path, model: nn.Module) -> AdapterFilePlan:
    """Check ``path`` against ``model`` (which may be on the meta device), strictly; a `ModelLoadError` names the
    file and the keys that are missing, unexpected or of the wrong shape.

    Adapter forms (released nested ckpt, flat safetensors, ComfyUI) must fill every adapter parameter; a
    transformer file (diffusers or original names) must fill the whole base, and the adapter fully or not at all.
    """
    path = Path(path)
    form, source = read_adapter_file(path)
    if form in ("diffusers", "original"):
        adapter: StateDictAdapter = DitAdapter(form, adapter_absent="any")
    else:
        adapter = AdapterFileAdapter(form)
    plan = plan_for(model, source, adapter)
    names = [n for n, _ in model.named_parameters()]
    filled = plan.filled()
    parts = {
        "adapter": [n for n in names if is_adapter_name(n)],
        "transformer": [n for n in names if not is_adapter_name(n)],
    }
    present = {part: sum(n in filled for n in group) for part, group in parts.items()}
    for part, group in parts.items():
        if 0 < present[part] < len(group):
            lost = [n for n in group if n not in filled]
            raise ModelLoadError(f"{path}: holds part of the {part}; missing {len(lost)} keys, e.g. {lost[:10]}")
    if not any(present.values()):
        raise ModelLoadError(f"{path}: holds no tensor of the model")
    content = "+".join(part for part in ("transformer", "adapter") if present[part])
    if form not in ("diffusers", "original") and present["transformer"]:
        raise ModelLoadError(f"{path}: an adapter file cannot hold base weights")
    return AdapterFilePlan(path, form, source, plan, content)  # type: ignore[arg-type]


def load_adapter_or_transformer(path: Path, model: nn.Module, sharded: ShardedBuild | None = None) -> AdapterLoadReport:
    """Load ``--transformer_path`` into an already loaded ``model``, whatever its form, strictly (`plan_adapter_file`).

    Tensors are copied into the model's existing parameters, keeping their dtype and device.
    """
    checked = plan_adapter_file(path, model)
    if sharded is None:
        read = stream_into(model, checked.source, checked.plan, dtype=torch.float32, device="cpu")
    else:
        read = write_sharded(model, checked.source, checked.plan, sharded)
    return AdapterLoadReport(checked.path, checked.form, checked.content, read)


def adapter_to_format(state: Mapping[str, torch.Tensor], fmt: AdapterFormat) -> dict[str, Any]:
    """Our-named tensors (the adapter, or a whole transformer) -> the dict a file of ``fmt`` holds.

    ``fantasytalking`` gives the released nested dict (for ``torch.save``); ``flat`` and ``comfyui`` adapter-only flat
    dicts; ``diffusers`` our names unchanged; ``original`` Wan's names. Each round-trips through
    `load_adapter_or_transformer`.
    """
    if fmt == "diffusers":
        return dict(state)
    if fmt == "original":
        return {dit_name_to_original(name): tensor for name, tensor in state.items()}
    if fmt not in ("fantasytalking", "flat", "comfyui"):
        raise ValueError(f"unknown adapter format {fmt!r}")
    flat = {adapter_name_to_form(name, fmt): tensor for name, tensor in state.items()}
    if fmt != "fantasytalking":
        return flat
    nested: dict[str, dict[str, torch.Tensor]] = {"proj_model": {}, "audio_processor": {}}
    for name, tensor in flat.items():
        part, _, rest = name.partition(".")
        nested[part][rest] = tensor
    return nested
