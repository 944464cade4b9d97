"""Where `ftalk sample` takes the audio adapter from, checked against the model's shapes before any weight loads.

``--adapter`` may be a training checkpoint (``checkpoint-N/`` of any strategy, or a run folder: its newest
checkpoint, read by the same readers as ``convert-zero``), a folder ``convert-zero`` wrote, or one file: the
released ``fantasytalking_model.ckpt``, flat or ComfyUI safetensors, or a whole transformer. Without it the
configured ``--transformer_path`` is used, else the adapter is the fresh one (zero k/v: the base model's output).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import nn

from fantasytalk_cli.checkpoints.folder import (
    CONVERTED_FILES,
    LATEST_NAME,
    converted_file,
    list_checkpoints,
    looks_like_checkpoint,
    recorded_model_config,
)
from fantasytalk_cli.checkpoints.sources import CheckpointSource, open_checkpoint
from fantasytalk_cli.convert.choices import LORA_FILES
from fantasytalk_cli.convert.lora_formats import diffusers_lora_config, from_diffusers_name
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.models.adapter_file import load_adapter_or_transformer, plan_adapter_file
from fantasytalk_cli.models.layout import ModelLoadError
from fantasytalk_cli.models.lora import LoraSpec, lora_in
from fantasytalk_cli.models.trainable import is_adapter_name, is_lora_name
from fantasytalk_cli.models.weights import model_shapes

Kind = Literal["none", "file", "checkpoint"]


class AdapterSourceError(FtalkUsageError):
    """``--adapter`` names nothing an adapter can be read from."""


@dataclass(frozen=True)
class AdapterSource:
    """Where the adapter comes from: nothing (the fresh adapter), a file, or a training checkpoint folder; and the
    LoRA on the DiT that comes with it (in the checkpoint, or a convert-zero folder's diffusers-layout LoRA file)."""

    kind: Kind
    path: Path | None = None
    lora: LoraSpec | None = None
    lora_file: Path | None = None
    """A LoRA in diffusers' layout (convert-zero --format diffusers), loaded beside the adapter."""
    lora_notes: tuple[str, ...] = ()
    frozen_adapter: Path | None = None
    """A checkpoint that trained no adapter (only a LoRA): the `--transformer_path` its run kept frozen."""

    def describe(self) -> str:
        if self.kind == "none":
            return "no adapter given: the fresh adapter (zero audio k/v), i.e. the base model's output"
        return f"adapter from {self.path} ({'training checkpoint' if self.kind == 'checkpoint' else 'file'})"


def resolve_adapter(path: Path | None) -> AdapterSource:
    """Say what ``path`` is (see the module docstring); an `AdapterSourceError` lists what a folder holds."""
    if path is None:
        return AdapterSource("none")
    path = Path(path)
    if path.is_file():
        return AdapterSource("file", path)
    if not path.is_dir():
        raise AdapterSourceError(f"--adapter {path}: no such file or folder")
    if looks_like_checkpoint(path) or (path / LATEST_NAME).is_file() or list_checkpoints(path, lambda _: True):
        with _opened(path) as checkpoint:
            recorded = recorded_model_config(checkpoint.folder)
            try:
                lora, notes = lora_in(checkpoint.trainable, recorded)
            except ValueError as exc:
                raise AdapterSourceError(f"--adapter {checkpoint.folder}: {exc}") from exc
            frozen = recorded.get("transformer_path")
            trained_adapter = any(is_adapter_name(n) for n in checkpoint.trainable)
        kept = Path(frozen) if frozen and not trained_adapter and Path(frozen).is_file() else None
        if kept is not None:
            notes.append(f"the run trained no audio adapter: its frozen one comes from {kept} (its --transformer_path)")
        return AdapterSource("checkpoint", path, lora, lora_notes=tuple(notes), frozen_adapter=kept)
    converted = converted_file(path)
    lora_file = path / LORA_FILES["diffusers"]
    if lora_file.is_file():
        lora, notes = lora_file_spec(lora_file)
        kind: Kind = "file" if converted is not None else "none"
        return AdapterSource(kind, converted, lora, lora_file, tuple(notes))
    if converted is not None:
        return AdapterSource("file", converted)
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise AdapterSourceError(
        f"--adapter {path}: neither a training checkpoint (checkpoint-N/ or a run folder) nor a folder written by "
        f"convert-zero ({', '.join(CONVERTED_FILES[:4])}, ...); it holds: {listing}. Give the adapter file itself."
    )


def lora_file_spec(path: Path) -> tuple[LoraSpec, list[str]]:
    """The LoRA of a diffusers-layout file: rank and targets from its tensors, alpha from the `LoraConfig` diffusers
    records in the file's metadata (else alpha = rank, said in a note)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        shapes = {from_diffusers_name(k): tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        metadata = handle.metadata() or {}
    try:
        recorded = diffusers_lora_config(metadata)
        spec, notes = lora_in(shapes, {"lora_rank": recorded.get("r"), "lora_alpha": recorded.get("lora_alpha")})
    except ValueError as exc:
        raise AdapterSourceError(f"--adapter {path}: {exc}") from exc
    if spec is None:
        raise AdapterSourceError(f"--adapter {path}: holds no LoRA tensors (transformer.<module>.lora_A.weight)")
    return spec, notes


def check_adapter(source: AdapterSource, model: nn.Module) -> str:
    """Check the adapter's names and shapes against ``model`` (built on the meta device is enough; with the LoRA
    injected when there is one) without reading a weight; a `ModelLoadError` names the file and the keys. Returns one
    line saying what will load."""
    if source.lora_file is not None:
        _check_lora_file(source.lora_file, model)
    if source.kind == "none":
        return source.describe() if source.lora_file is None else f"LoRA from {source.lora_file}"
    assert source.path is not None
    if source.kind == "file":
        checked = plan_adapter_file(source.path, model)
        return f"{source.path}: {checked.form} form, {checked.content} ({len(checked.plan.moves)} tensors)"
    if source.frozen_adapter is not None:
        plan_adapter_file(source.frozen_adapter, model)
    with _opened(source.path) as checkpoint:
        _check_checkpoint_shapes(checkpoint, model)
        return f"{checkpoint.folder}: {checkpoint.description} ({len(checkpoint.trainable)} trained tensors)"


def _check_lora_file(path: Path, model: nn.Module) -> dict[str, str]:
    """diffusers key -> our parameter name, for every tensor of ``path``: exactly the model's LoRA, same shapes."""
    shapes, _ = model_shapes(model)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        stored = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    names = {key: from_diffusers_name(key) for key in stored}
    lora = {n for n in shapes if is_lora_name(n)}
    unknown = sorted(k for k, n in names.items() if n not in lora)
    lacking = sorted(lora - set(names.values()))
    wrong = sorted(k for k, n in names.items() if n in shapes and shapes[n] != stored[k])
    if unknown or lacking or wrong:
        raise ModelLoadError(
            f"{path}: the LoRA does not fit the configured base model: unknown {unknown[:5]}, missing {lacking[:5]}, "
            f"other shape {wrong[:5]} (was it trained on another base model or exported from another run?)"
        )
    return names


def load_adapter(source: AdapterSource, model: nn.Module) -> str:
    """Load the adapter (and LoRA) into ``model`` (weights in place, dtype and device kept; the LoRA's layers
    injected already); returns one line for the log."""
    said = []
    if source.lora_file is not None:
        names, params = _check_lora_file(source.lora_file, model), dict(model.named_parameters())
        with safe_open(str(source.lora_file), framework="pt", device="cpu") as handle, torch.no_grad():
            for key, name in names.items():
                params[name].copy_(handle.get_tensor(key).to(device=params[name].device, dtype=params[name].dtype))
        said.append(f"LoRA from {source.lora_file} ({len(names)} tensors)")
    if source.kind == "none":
        return "; ".join(said) or source.describe()
    if source.kind == "file":
        assert source.path is not None
        return "; ".join([load_adapter_or_transformer(source.path, model).summary(), *said])
    return _load_checkpoint(source, model)


def _load_checkpoint(source: AdapterSource, model: nn.Module) -> str:
    assert source.path is not None
    if source.frozen_adapter is not None:
        load_adapter_or_transformer(source.frozen_adapter, model)
    with _opened(source.path) as checkpoint:
        params = _check_checkpoint_shapes(checkpoint, model)
        with torch.no_grad():
            for name, tensor in checkpoint.read(list(checkpoint.trainable)):
                params[name].copy_(tensor.to(device=params[name].device, dtype=params[name].dtype))
        return f"{checkpoint.folder}: {checkpoint.description}; loaded {len(checkpoint.trainable)} trained tensors"


@contextmanager
def _opened(path: Path) -> Iterator[CheckpointSource]:
    checkpoint = open_checkpoint(path)
    try:
        yield checkpoint
    finally:
        checkpoint.close()


def _check_checkpoint_shapes(checkpoint: CheckpointSource, model: nn.Module) -> dict[str, nn.Parameter]:
    shapes, _ = model_shapes(model)
    unknown = sorted(name for name in checkpoint.trainable if name not in shapes)
    wrong = sorted(
        f"{name}: checkpoint {tuple(shape)}, model {shapes[name]}"
        for name, shape in checkpoint.trainable.items()
        if name in shapes and tuple(shape) != shapes[name]
    )
    if unknown or wrong:
        raise ModelLoadError(
            f"{checkpoint.folder}: the checkpoint does not fit the configured base model: "
            + "; ".join(
                ([f"{len(unknown)} unknown tensors, e.g. {unknown[:5]}"] if unknown else [])
                + ([f"{len(wrong)} of another shape, e.g. {wrong[:5]}"] if wrong else [])
            )
            + " (was it trained on another base model or with other audio dims?)"
        )
    return dict(model.named_parameters())
