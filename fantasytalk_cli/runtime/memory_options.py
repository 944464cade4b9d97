"""The memory options for fitting the 14B on smaller cards: the frozen DiT stored in float8, the activations the
backward pass needs kept in host memory. Both are existing mechanisms: diffusers' layerwise casting (its hooks
upcast each layer's weights to the compute dtype for its forward; autograd keeps that upcast copy for the backward,
so gradients are exactly those of the upcast weights) and `torch.autograd.graph.save_on_cpu`.

Refused with the reason where a combination cannot work: fp8 storage with DeepSpeed or FSDP, which own the
parameters' dtype and layout (ZeRO flattens and casts every parameter to its own precision; FSDP gathers each
unit's weights in its own dtype around the forward), and block offload under ZeRO-3 and FSDP, which shard and gather
the frozen weights themselves (under ZeRO-2 the frozen weights stay plain module parameters: it composes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.models.trainable import ADAPTER_MODULE_PATTERN, DEFAULT_TRAINABLE_MODULES

SHARDING_STRATEGIES = ("zero2", "zero3", "fsdp")
"""Strategies that take over the model's parameters (their dtype, and under ZeRO-3 and FSDP their placement)."""
FP8_REFUSED = SHARDING_STRATEGIES
"""Where `--base_weights_dtype fp8` is refused (the module docstring says why)."""
BLOCK_OFFLOAD_REFUSED = ("zero3", "fsdp")
"""Where `--blocks_to_offload` is refused: the strategies that shard and gather the frozen weights themselves."""


class MemoryOptionError(FtalkUsageError):
    """A memory option the chosen strategy cannot combine with."""


def check_memory_options(model: ModelConfig, strategy: str) -> None:
    """Refuse, before anything loads, the combinations that cannot work (see the module docstring)."""
    if model.blocks_to_offload and strategy in BLOCK_OFFLOAD_REFUSED:
        raise MemoryOptionError(
            f"--blocks_to_offload cannot run under {strategy}: ZeRO-3 and FSDP shard the frozen weights and gather "
            "each block's around its forward themselves. Use DDP, ZeRO-2 (or one process) with block offload, or "
            "ZeRO-3/FSDP's own sharding (more GPUs) instead"
        )
    if model.base_weights_dtype == "fp8" and strategy in FP8_REFUSED:
        raise MemoryOptionError(
            f"--base_weights_dtype fp8 cannot run under {strategy}: DeepSpeed and FSDP own the parameters' storage "
            "(ZeRO casts every parameter to its own precision; FSDP gathers each block's weights in its own dtype "
            "around the forward, where layerwise casting would swap them). Use DDP (or one process) with fp8, or bf16 "
            "weights sharded by ZeRO-3/FSDP"
        )


def store_in_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store the frozen DiT's linear and convolution weights in float8_e4m3fn, computed in ``compute_dtype`` layer by
    layer (diffusers' layerwise casting, with the model's own skip patterns: embeddings, norms; plus the adapter).
    Returns the bytes the frozen weights take now."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    patterns = (
        *DEFAULT_SKIP_MODULES_PATTERN,
        *(model._skip_layerwise_casting_patterns or ()),
        ADAPTER_MODULE_PATTERN,
    )
    model.enable_layerwise_casting(  # type: ignore[operator]
        storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype, skip_modules_pattern=patterns
    )
    cast = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float8_e4m3fn]
    if cast:
        raise MemoryOptionError(
            f"--base_weights_dtype fp8 stores the frozen DiT's linear weights in float8, but --trainable_modules makes "
            f"{len(cast)} of them trainable (e.g. {cast[:3]}): train only the audio adapter "
            f"(--trainable_modules {' '.join(DEFAULT_TRAINABLE_MODULES)}) with fp8, or keep --base_weights_dtype bf16"
        )
    return sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)


@contextlib.contextmanager
def activations_on_host(enabled: bool) -> Iterator[None]:
    """Inside: every tensor autograd saves for the backward goes to host memory (pinned where CUDA exists)."""
    if not enabled:
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
        yield
