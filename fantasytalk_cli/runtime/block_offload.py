"""`--blocks_to_offload N`: the frozen weights of the last N DiT blocks live in pinned host memory and are copied to
the device for each forward of the block (the first one, and the recompute of gradient checkpointing in the
backward), then dropped; the offloaded block that runs next is prefetched on a side CUDA stream while one computes
(the next one in a forward, the one before in the backward's recomputes, which go from the last block to the first).
The same hooks serve sampling (`no_grad`: forwards only), where `place_resident` moves everything else of a model
loaded on the host, so the offloaded weights never take room on the device.

Written here rather than with diffusers' group offloading, which moves every parameter of a block: these blocks
hold the trainable audio k/v, whose weights, gradients and AdamW state must stay where the optimizer has them.
Autograd keeps its own reference to the device copy a forward used, so the backward is exact whatever happens to
the block's parameters afterwards; with gradient checkpointing that copy lives only during the block's backward.
A recompute stops as soon as it has what the backward needs (torch's checkpoint early stop), so the block's forward
hook never runs then: its copy is dropped when the next block is brought in, or when the backward ends.
On the CPU (the tests) the "device" copy is a real copy too, so a weight brought in is told from its host copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from fantasytalk_cli.runtime.memory_options import MemoryOptionError


@dataclass
class _Offloaded:
    """One block's frozen parameters and their pinned host copies."""

    params: list[nn.Parameter]
    host: list[torch.Tensor]
    ready: torch.cuda.Event | None = None
    staged: list[torch.Tensor] = field(default_factory=list)


NO_BACKWARD = -1
"""`torch._C._current_graph_task_id()` outside a backward pass (torch's checkpoint asks it in its recompute too)."""


class BlockOffload:
    """Offload the frozen parameters of ``blocks`` (see the module docstring); `onloads` counts the copies in."""

    def __init__(self, blocks: Sequence[nn.Module], device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.onloads = 0
        self.brought_in: set[int] = set()
        """Blocks whose parameters are device copies now."""
        self.end_queued_for = NO_BACKWARD
        """The backward pass (its autograd graph task) that calls `_end_of_backward` when it ends."""
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
            entry.staged = [h.to(self.device, copy=True) for h in entry.host]
            return
        with torch.cuda.stream(self.stream):
            entry.staged = [h.to(self.device, non_blocking=True) for h in entry.host]
            entry.ready = torch.cuda.Event()
            entry.ready.record(self.stream)

    def _onload(self, index: int) -> None:
        backward = torch._C._current_graph_task_id()
        recompute = backward != NO_BACKWARD
        for other in sorted(self.brought_in - {index}):
            self._offload(other)  # a recompute that stopped early: its forward hook never ran
        self._stage(index)
        entry = self.blocks[index]
        if entry.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.ready)
            for tensor in entry.staged:
                tensor.record_stream(torch.cuda.current_stream(self.device))
        for param, tensor in zip(entry.params, entry.staged, strict=True):
            param.data = tensor
        entry.staged, entry.ready = [], None
        self.brought_in.add(index)
        self.onloads += 1
        if recompute and backward != self.end_queued_for:  # the last block recomputed has no next one to drop it
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self.end_queued_for = backward
        upcoming = index - 1 if recompute else index + 1  # recomputes go from the last block to the first
        if 0 <= upcoming < len(self.blocks):
            self._stage(upcoming)  # prefetch the block that runs next while this one computes

    def _offload(self, index: int) -> None:
        entry = self.blocks[index]
        for param, host in zip(entry.params, entry.host, strict=True):
            param.data = host  # the device copy stays alive only where autograd holds it
        self.brought_in.discard(index)

    def _end_of_backward(self) -> None:
        for index in sorted(self.brought_in):
            self._offload(index)


def offload_blocks(model: nn.Module, count: int, device: torch.device) -> BlockOffload | None:
    """Offload the last ``count`` of ``model.blocks`` (None when ``count`` is 0)."""
    if count <= 0:
        return None
    blocks = list(model.blocks)  # type: ignore[attr-defined]
    check_block_count(count, len(blocks))
    return BlockOffload(blocks[len(blocks) - count :], device)


def check_block_count(count: int, blocks: int) -> None:
    """Refuse ``--blocks_to_offload count`` for a transformer of ``blocks`` blocks when it has fewer (callers check
    before loading, from the model's config)."""
    if count > blocks:
        raise MemoryOptionError(
            f"--blocks_to_offload {count}: the transformer has {blocks} blocks; give at most {blocks}"
        )


def place_resident(model: nn.Module, offload: BlockOffload | None, device: torch.device) -> None:
    """Move ``model``'s parameters and buffers to ``device``, except the offloaded ones, which stay in host memory:
    for a model loaded on the host (sampling), whose offloaded weights then never take room on the device."""
    on_host = {id(param) for entry in (offload.blocks if offload is not None else ()) for param in entry.params}
    for param in model.parameters():
        if id(param) not in on_host:
            param.data = param.data.to(device)
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))
