"""`--blocks_to_offload N`: the frozen weights of the last N DiT blocks live in pinned host memory and are copied to
the device for each forward of the block (the first one, and the recompute of gradient checkpointing in the
backward), then dropped; the next offloaded block is prefetched on a side CUDA stream while one computes.

Written here rather than with diffusers' group offloading, which moves every parameter of a block: these blocks
hold the trainable audio k/v, whose weights, gradients and AdamW state must stay where the optimizer has them.
Autograd keeps its own reference to the device copy a forward used, so the backward is exact whatever happens to
the block's parameters afterwards; with gradient checkpointing that copy lives only during the block's backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Offloaded:
    """One block's frozen parameters and their pinned host copies."""

    params: list[nn.Parameter]
    host: list[torch.Tensor]
    ready: torch.cuda.Event | None = None
    staged: list[torch.Tensor] = field(default_factory=list)


class BlockOffload:
    """Offload the frozen parameters of ``blocks`` (see the module docstring); `onloads` counts the copies in."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.onloads = 0
        self.blocks: list[_Offloaded] = []
        for index, block in enumerate(blocks):
            frozen = [p for p in block.parameters() if not p.requires_grad]
            host = [p.detach().to("cpu").pin_memory() if self.cuda else p.detach().to("cpu") for p in frozen]
            for param, copy in zip(frozen, host, strict=True):
                param.data = copy
            self.blocks.append(_Offloaded(frozen, host))
            block.register_forward_pre_hook(lambda module, args, i=index: self._onload(i))
            block.register_forward_hook(lambda module, args, output, i=index: self._offload(i))

    def _stage(self, index: int) -> None:
        """Start copying block ``index``'s weights to the device (on the side stream where CUDA exists)."""
        entry = self.blocks[index]
        if entry.staged:
            return
        if self.stream is None:
            entry.staged = [h.to(self.device) for h in entry.host]
            return
        with torch.cuda.stream(self.stream):
            entry.staged = [h.to(self.device, non_blocking=True) for h in entry.host]
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def _onload(self, index: int) -> None:
        self._stage(index)
        entry = self.blocks[index]
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            for tensor in entry.staged:
                tensor.record_stream(torch.cuda.current_stream(self.device))
        for param, tensor in zip(entry.params, entry.staged, strict=True):
            param.data = tensor
        entry.staged, entry.ready = [], None
        self.onloads += 1
        if index + 1 < len(self.blocks):
            self._stage(index + 1)  # prefetch the next offloaded block while this one computes

    def _offload(self, index: int) -> None:
        entry = self.blocks[index]
        for param, host in zip(entry.params, entry.host, strict=True):
            param.data = host  # the device copy stays alive only where autograd holds it


def offload_blocks(model: nn.Module, count: int, device: torch.device) -> BlockOffload | None:
    """Offload the last ``count`` of ``model.blocks`` (None when ``count`` is 0)."""
    if count <= 0:
        return None
    blocks = list(model.blocks)  # type: ignore[attr-defined]
    if count > len(blocks):
        raise ValueError(f"--blocks_to_offload {count}: the transformer has {len(blocks)} blocks")
    return BlockOffload(blocks[len(blocks) - count :], device)
