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
from torch import nn

from fantasytalk_cli.checkpoints.folder import (
    CONVERTED_FILES,
    LATEST_NAME,
    converted_file,
    list_checkpoints,
    looks_like_checkpoint,
)
from fantasytalk_cli.checkpoints.sources import CheckpointSource, open_checkpoint
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.models.adapter_file import load_adapter_or_transformer, plan_adapter_file
from fantasytalk_cli.models.layout import ModelLoadError
from fantasytalk_cli.models.weights import model_shapes

Kind = Literal["none", "file", "checkpoint"]


class AdapterSourceError(FtalkUsageError):
    """``--adapter`` names nothing an adapter can be read from."""


@dataclass(frozen=True)
class AdapterSource:
    """Where the adapter comes from: nothing (the fresh adapter), a file, or a training checkpoint folder."""

    kind: Kind
    path: Path | None = None

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
        return AdapterSource("checkpoint", path)
    converted = converted_file(path)
    if converted is not None:
        return AdapterSource("file", converted)
    listing = sorted(p.name for p in path.iterdir())[:20]
    raise AdapterSourceError(
        f"--adapter {path}: neither a training checkpoint (checkpoint-N/ or a run folder) nor a folder written by "
        f"convert-zero ({', '.join(CONVERTED_FILES[:4])}, ...); it holds: {listing}. Give the adapter file itself."
    )


def check_adapter(source: AdapterSource, model: nn.Module) -> str:
    """Check the adapter's names and shapes against ``model`` (built on the meta device is enough) without
    reading a weight; a `ModelLoadError` names the file and the keys. Returns one line saying what will load."""
    if source.kind == "none":
        return source.describe()
    assert source.path is not None
    if source.kind == "file":
        checked = plan_adapter_file(source.path, model)
        return f"{source.path}: {checked.form} form, {checked.content} ({len(checked.plan.moves)} tensors)"
    with _opened(source.path) as checkpoint:
        _check_checkpoint_shapes(checkpoint, model)
        return f"{checkpoint.folder}: {checkpoint.description} ({len(checkpoint.trainable)} trained tensors)"


def load_adapter(source: AdapterSource, model: nn.Module) -> str:
    """Load the adapter into ``model`` (weights in place, dtype and device kept); returns one line for the log."""
    if source.kind == "none":
        return source.describe()
    assert source.path is not None
    if source.kind == "file":
        return load_adapter_or_transformer(source.path, model).summary()
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
