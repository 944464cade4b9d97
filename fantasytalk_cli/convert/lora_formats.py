"""ftalk's trained LoRA (peft names on the diffusers DiT) in the three layouts inference tools read, and merged.

- `to_diffusers`: ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight`` plus the safetensors metadata entry
  ``lora_adapter_metadata`` that diffusers' ``save_lora_weights`` writes (the `LoraConfig` kwargs, each key prefixed
  ``transformer.``), so the alpha survives. Read by diffusers' ``WanPipeline`` / ``WanImageToVideoPipeline``
  ``load_lora_weights`` and ``WanTransformer3DModel.load_lora_adapter(path, prefix="transformer")``.
- `to_comfyui`: original Wan names, ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` / ``.lora_B.weight`` /
  ``.alpha``. Read by ComfyUI's LoRA loaders (``comfy/lora.py``: any ``diffusion_model.<weight>`` minus
  ``.weight`` is a LoRA key) and by diffusers' Wan loader, which converts this form.
- `to_kohya`: musubi-tuner's Wan network, ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` / ``.lora_up.weight``
  / ``.alpha``. Read by musubi-tuner, by ComfyUI (its ``lora_unet_`` rule) and by diffusers' Wan loader.
- `merge_lora`: the LoRA folded into the base weights (``W + scale * alpha / rank * B @ A``), for any tool at all.

Pure tensor and name logic; the caller writes the files. The audio adapter is never part of a LoRA export.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.models.lora import ADAPTER_NAME
from fantasytalk_cli.models.state_dict_adapters import dit_name_to_original
from fantasytalk_cli.models.trainable import is_adapter_name

DIFFUSERS_PREFIX = "transformer"
"""The pipeline component a diffusers LoRA file addresses (``WanLoraLoaderMixin.transformer_name``)."""
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
"""diffusers' ``LORA_ADAPTER_METADATA_KEY`` (``loaders/lora_base.py``): the safetensors metadata entry holding the
JSON of the adapter's `LoraConfig` kwargs."""
COMFYUI_PREFIX = "diffusion_model."
"""ComfyUI's prefix of the diffusion model's weights (``model_lora_keys_unet`` in ``comfy/lora.py``)."""
KOHYA_PREFIX = "lora_unet"
"""musubi-tuner's prefix of the DiT's LoRA modules (``networks/lora_wan.py``)."""

_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<side>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_EXPECTED = f"<module>.lora_A.{ADAPTER_NAME}.weight and <module>.lora_B.{ADAPTER_NAME}.weight (or without .default)"


class LoraFormatError(FtalkError):
    """A LoRA state dict that is not the plain peft LoRA ftalk trains, or that does not fit its base weights."""


@dataclass(frozen=True, eq=False)
class LoraPair:
    """One wrapped linear's LoRA: ``down`` (peft's lora_A, kohya's lora_down) [r, in] and ``up`` (lora_B,
    lora_up) [out, r]; the linear's weight changes by ``alpha / r * up @ down``."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, factor: float) -> torch.Tensor:
        """``factor * up @ down`` in float32, shaped like the wrapped weight [out, in]."""
        return factor * (self.up.to(torch.float32) @ self.down.to(torch.float32))


def _own(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy: an export shares no storage with the training state (diffusers' Wan converter scales the
    tensors of a dict it is given in place)."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def _looks_like_lora(key: str) -> bool:
    return "lora" in key.lower() or key.endswith(".alpha") or "dora_scale" in key


def _peft_entry(key: str) -> tuple[str, str] | None:
    """(module, "A" | "B") of a peft LoRA key; None for keys that are no LoRA; an error for foreign LoRA forms."""
    if not _looks_like_lora(key):
        return None
    match = _PEFT_KEY.match(key)
    if match is None:
        raise LoraFormatError(
            f"{key}: looks like a LoRA tensor but is not peft's {_EXPECTED}; ftalk reads only the plain LoRA its "
            "training writes (no LoRA bias, no DoRA, no kohya or ComfyUI names): pass a checkpoint of `ftalk train`"
        )
    adapter = match["adapter"]
    if adapter is not None and adapter != ADAPTER_NAME:
        raise LoraFormatError(
            f"{key}: LoRA of peft adapter {adapter!r}; ftalk trains and exports only the adapter {ADAPTER_NAME!r}"
        )
    module = match["module"]
    if is_adapter_name(module + ".weight"):
        raise LoraFormatError(
            f"{key}: a LoRA on the audio adapter ({module}); the adapter trains as full weights and is exported as "
            "its own file, so a LoRA export cannot hold it"
        )
    return module, match["side"]


def lora_pairs(weights: Mapping[str, torch.Tensor]) -> dict[str, LoraPair]:
    """The LoRA pairs among ``weights`` (peft names, with or without the ``default`` adapter infix), by diffusers
    module name (``blocks.0.attn1.to_q``), sorted. Tensors that are no LoRA (base weights, the audio adapter) are
    left out; a half pair, a rank mismatch or a LoRA key of another form is a `LoraFormatError`."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in weights.items():
        entry = _peft_entry(key)
        if entry is None:
            continue
        module, side = entry
        sides = found.setdefault(module, {})
        if side in sides:
            raise LoraFormatError(
                f"{key}: lora_{side} of {module} is stored twice (also as {sides[side][0]}); keep one of the two names"
            )
        if tensor.ndim != 2:
            raise LoraFormatError(
                f"{key}: shape {list(tensor.shape)}, a linear's LoRA matrix is 2-D ([rank, in] for lora_A, "
                "[out, rank] for lora_B); ftalk's LoRA wraps linears only"
            )
        sides[side] = (key, tensor)
    pairs: dict[str, LoraPair] = {}
    for module in sorted(found):
        sides = found[module]
        for side, other in (("A", "B"), ("B", "A")):
            if other not in sides:
                raise LoraFormatError(
                    f"{sides[side][0]}: lora_{side} of {module} has no lora_{other}; the state dict is incomplete "
                    "(a LoRA needs both matrices): export from a whole checkpoint"
                )
        (key_a, down), (key_b, up) = sides["A"], sides["B"]
        if up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                f"{module}: rank mismatch, {key_a} {list(down.shape)} has rank {down.shape[0]} but {key_b} "
                f"{list(up.shape)} has rank {up.shape[1]} (lora_A is [rank, in], lora_B is [out, rank])"
            )
        pairs[module] = LoraPair(down=down, up=up)
    return pairs


def _check(pairs: Mapping[str, LoraPair], alpha: float, rank: int | None = None) -> None:
    if not pairs:
        raise LoraFormatError("no LoRA tensors to export: the checkpoint was trained without --lora_rank")
    if alpha <= 0:
        raise LoraFormatError(f"LoRA alpha {alpha:g}: must be > 0 (kohya tools would read 0 as 'alpha = rank')")
    if rank is not None:
        wrong = sorted(m for m, p in pairs.items() if p.rank != rank)
        if wrong:
            more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
            raise LoraFormatError(
                f"LoRA on {wrong[0]}{more} has rank {pairs[wrong[0]].rank}, not the recorded rank {rank}: the "
                "checkpoint's LoRA settings do not match its tensors"
            )


def original_module_name(module: str) -> str:
    """diffusers module name -> original Wan module name (``blocks.0.attn1.to_out.0`` -> ``blocks.0.self_attn.o``)."""
    return dit_name_to_original(module + ".weight").removesuffix(".weight")


def to_diffusers(
    pairs: Mapping[str, LoraPair], alpha: float, rank: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of diffusers' Wan LoRA file, as ``WanPipeline.save_lora_weights`` writes it."""
    _check(pairs, alpha, rank)
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in pairs.items():
        tensors[f"{DIFFUSERS_PREFIX}.{module}.lora_A.weight"] = _own(pair.down)
        tensors[f"{DIFFUSERS_PREFIX}.{module}.lora_B.weight"] = _own(pair.up)
    config: dict[str, object] = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(pairs),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
    }
    packed = {f"{DIFFUSERS_PREFIX}.{key}": value for key, value in config.items()}
    metadata = {"format": "pt", DIFFUSERS_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
    return tensors, metadata


def from_diffusers_name(key: str) -> str:
    """A tensor name of `to_diffusers`' file -> the peft parameter name ftalk trains
    (``transformer.blocks.0.attn1.to_q.lora_A.weight`` -> ``blocks.0.attn1.to_q.lora_A.default.weight``)."""
    name = key.removeprefix(f"{DIFFUSERS_PREFIX}.")
    for side in ("lora_A", "lora_B"):
        name = name.replace(f".{side}.weight", f".{side}.{ADAPTER_NAME}.weight")
    return name


def diffusers_lora_config(metadata: Mapping[str, str]) -> dict[str, object]:
    """The `LoraConfig` kwargs `to_diffusers` (as diffusers' `save_lora_weights`) packs into a file's metadata, or
    {} when the file has none."""
    packed = json.loads(metadata.get(DIFFUSERS_METADATA_KEY, "{}"))
    prefix = f"{DIFFUSERS_PREFIX}."
    return {key.removeprefix(prefix): value for key, value in packed.items() if key.startswith(prefix)}


def _alpha_tensor(alpha: float) -> torch.Tensor:
    return torch.tensor(float(alpha), dtype=torch.float32)


def to_comfyui(pairs: Mapping[str, LoraPair], alpha: float) -> dict[str, torch.Tensor]:
    """ComfyUI's form: ``diffusion_model.<original module>.lora_A.weight`` / ``.lora_B.weight`` / ``.alpha`` (0-d)."""
    _check(pairs, alpha)
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in pairs.items():
        base = COMFYUI_PREFIX + original_module_name(module)
        tensors[f"{base}.lora_A.weight"] = _own(pair.down)
        tensors[f"{base}.lora_B.weight"] = _own(pair.up)
        tensors[f"{base}.alpha"] = _alpha_tensor(alpha)
    return tensors


def kohya_module_name(module: str) -> str:
    """diffusers module name -> musubi-tuner's LoRA module name (``lora_unet_blocks_0_self_attn_q``)."""
    return f"{KOHYA_PREFIX}.{original_module_name(module)}".replace(".", "_")


def to_kohya(pairs: Mapping[str, LoraPair], alpha: float) -> dict[str, torch.Tensor]:
    """musubi-tuner's form: ``lora_unet_<original module, dots as _>.lora_down.weight`` / ``.lora_up.weight`` /
    ``.alpha`` (0-d)."""
    _check(pairs, alpha)
    tensors: dict[str, torch.Tensor] = {}
    for module, pair in pairs.items():
        name = kohya_module_name(module)
        tensors[f"{name}.lora_down.weight"] = _own(pair.down)
        tensors[f"{name}.lora_up.weight"] = _own(pair.up)
        tensors[f"{name}.alpha"] = _alpha_tensor(alpha)
    return tensors


def merge_lora(
    base: Mapping[str, torch.Tensor], pairs: Mapping[str, LoraPair], alpha: float, rank: int, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """A new state dict: ``base`` (diffusers names) with ``W + scale * alpha / rank * B @ A`` for every pair, computed
    in float32 and stored in W's dtype; the other tensors are passed through as they are."""
    _check(pairs, alpha, rank)
    merged = dict(base)
    for module, pair in pairs.items():
        name = f"{module}.weight"
        if name not in base:
            raise LoraFormatError(
                f"LoRA on {module}, but the base weights have no {name}: the LoRA was trained on another model "
                "(compare the checkpoint's recorded model with the base folder)"
            )
        weight = base[name]
        expected = (int(pair.up.shape[0]), int(pair.down.shape[1]))
        if tuple(weight.shape) != expected:
            raise LoraFormatError(
                f"LoRA on {module} is {list(expected)} (lora_B out x lora_A in), but the base {name} is "
                f"{list(weight.shape)}: the LoRA was trained on a model of other dimensions"
            )
        update = pair.delta(scale * alpha / rank).to(weight.device)
        merged[name] = (weight.to(torch.float32) + update).to(weight.dtype)
    return merged
