"""The LoRA of a training checkpoint for `ftalk convert-zero`: written beside the adapter in the layout of the chosen
`--format` (`choices.LORA_FILES`), or merged into the base weights of a whole transformer (`--what transformer`).

The LoRA's rank and targets come from its tensors, its alpha from the run config the checkpoint records
(`models.lora.lora_in`). Its tensors are small (76.7M parameters at rank 16 on the 14B): read whole, once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fantasytalk_cli.checkpoints.folder import ConversionError, recorded_model_config
from fantasytalk_cli.checkpoints.sources import CheckpointSource
from fantasytalk_cli.convert.choices import LORA_FILES
from fantasytalk_cli.convert.lora_formats import (
    LoraFormatError,
    LoraPair,
    lora_pairs,
    merge_lora,
    to_comfyui,
    to_diffusers,
    to_kohya,
)
from fantasytalk_cli.models.lora import LoraSpec, lora_in
from fantasytalk_cli.models.trainable import is_lora_name


@dataclass
class CheckpointLora:
    """A checkpoint's LoRA: its spec, its (down, up) pairs by module, and what was assumed about it."""

    spec: LoraSpec
    pairs: dict[str, LoraPair]
    names: list[str]
    notes: list[str]

    def write(self, folder: Path, fmt: str, dtype: torch.dtype) -> str:
        """Write the LoRA in ``fmt``'s layout into ``folder`` (a staging folder); returns the file name."""
        metadata: dict[str, str] = {"format": "pt"}
        if fmt == "diffusers":
            tensors, metadata = to_diffusers(self.pairs, self.spec.alpha, self.spec.rank)
        elif fmt == "kohya":
            tensors = to_kohya(self.pairs, self.spec.alpha)
        else:
            tensors = to_comfyui(self.pairs, self.spec.alpha)
        name = LORA_FILES[fmt]
        cast = {k: (v if v.ndim == 0 else v.to(dtype)).contiguous() for k, v in tensors.items()}
        save_file(cast, str(folder / name), metadata=metadata)
        return name

    def merger(self, scale: float = 1.0) -> Callable[[str, torch.Tensor], torch.Tensor]:
        """``(name, base tensor) -> tensor`` with the LoRA folded in where it wraps ``name``'s module."""
        by_weight = {f"{module}.weight": (module, pair) for module, pair in self.pairs.items()}

        def merge(name: str, tensor: torch.Tensor) -> torch.Tensor:
            hit = by_weight.get(name)
            if hit is None:
                return tensor
            return merge_lora({name: tensor}, {hit[0]: hit[1]}, self.spec.alpha, self.spec.rank)[name]

        return merge

    def weight_names(self) -> set[str]:
        return {f"{module}.weight" for module in self.pairs}


def checkpoint_lora(source: CheckpointSource) -> CheckpointLora | None:
    """The LoRA among ``source``'s trained tensors, read whole, or None."""
    names = [n for n in source.trainable if is_lora_name(n)]
    if not names:
        return None
    try:
        spec, notes = lora_in({n: source.trainable[n] for n in names}, recorded_model_config(source.folder))
        assert spec is not None
        pairs = lora_pairs(dict(source.read(names)))
    except (ValueError, LoraFormatError) as exc:
        raise ConversionError(f"{source.folder}: {exc}") from exc
    return CheckpointLora(spec, pairs, names, [f"{spec.describe()}: {len(pairs)} modules", *notes])
