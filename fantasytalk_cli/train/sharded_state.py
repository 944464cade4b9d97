"""Hooks around accelerate's save and load of a sharded training state, so a checkpoint holds and restores only the
trainable weights: FSDP's state dict without the frozen parameters, ZeRO's non-strict module load verified key by
key, FSDP1's optimizer state created before it is loaded into. `distributed.py` decides which strategy uses which."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from fantasytalk_cli.checkpoints.folder import CheckpointError


def fsdp_clean_name(name: str) -> str:
    """A parameter name under FSDP1 without the wrapper prefixes: the name in the unwrapped model."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


@contextmanager
def recorded_load_keys(module: torch.nn.Module) -> Iterator[list[tuple[list[str], list[str]]]]:
    """Record (missing, unexpected) keys of every `load_state_dict` on `module` inside the block."""
    loads: list[tuple[list[str], list[str]]] = []

    def record(_module: torch.nn.Module, incompatible: Any) -> None:
        loads.append((list(incompatible.missing_keys), list(incompatible.unexpected_keys)))

    handle = module.register_load_state_dict_post_hook(record)
    try:
        yield loads
    finally:
        handle.remove()


def verify_module_state(loads: list[tuple[list[str], list[str]]], trainable: Iterable[str], where: Path) -> None:
    """ZeRO resume: the module state DeepSpeed loaded (non-strict, frozen weights excluded) held every
    trainable parameter and nothing this model lacks; else a CheckpointError naming them."""
    if not loads:
        raise CheckpointError(f"{where}: DeepSpeed restored no module state; the trainable weights were not loaded")
    for missing, unexpected in loads:
        lost = sorted(set(missing) & set(trainable))
        if lost or unexpected:
            raise CheckpointError(
                f"{where}: the checkpoint's module state does not match this run's trainable parameters: "
                f"missing {len(lost)} {lost[:10]}, unknown {len(unexpected)} {sorted(unexpected)[:10]} "
                "(was --trainable_modules or the model changed?)"
            )


class _SkipMissingFrozen(logging.Filter):
    """FSDP1's sharded load warns once per parameter absent from the state dict: expected for frozen ones."""

    def __init__(self, frozen: set[str]) -> None:
        super().__init__()
        self.frozen = frozen

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Did not find param with FQN "):
            return True
        return fsdp_clean_name(message.split()[6].rstrip(",")) not in self.frozen


@contextmanager
def fsdp_trainable_only(model: torch.nn.Module) -> Iterator[None]:
    """FSDP (1 and 2): while accelerate saves or loads the sharded model state, leave the frozen parameters
    out of it. accelerate has no switch for that (DeepSpeed's `exclude_frozen_parameters`; accelerate's
    `adapter_only` is for PEFT models), so hooks on the wrapped model do it: its state dict drops them
    (saving writes, and loading reads, only the trainable shards), and loading accepts their absence
    (they keep the values built from the base model). Checkpoints that do hold them still load."""
    frozen = {fsdp_clean_name(n) for n, p in model.named_parameters() if not p.requires_grad}

    def drop_frozen(_module: torch.nn.Module, state_dict: dict, _prefix: str, _metadata: Any) -> None:
        for key in [k for k in state_dict if fsdp_clean_name(k) in frozen]:
            del state_dict[key]

    def allow_missing_frozen(_module: torch.nn.Module, incompatible: Any) -> None:
        incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if fsdp_clean_name(k) not in frozen]

    fsdp_log = logging.getLogger("torch.distributed.fsdp._state_dict_utils")
    quiet = _SkipMissingFrozen(frozen)
    handles = [
        model.register_state_dict_post_hook(drop_frozen),
        model.register_load_state_dict_post_hook(allow_missing_frozen),
    ]
    fsdp_log.addFilter(quiet)
    try:
        yield
    finally:
        fsdp_log.removeFilter(quiet)
        for handle in handles:
            handle.remove()


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """FSDP1 resume: accelerate loads the optimizer into a template made from the live optimizer's state
    dict, which holds no state before the first step: the saved Adam moments and step counts would be
    dropped without a word (the resumed run then drifts from an uninterrupted one; FSDP2's
    `get_optimizer_state_dict` guards against that itself). Create the state first with a step on zero
    gradients at learning rate 0, which leaves the weights as they are (as torch does for FSDP2)."""
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    if any(p.grad is not None for p in params):
        return
    for param in params:
        param.grad = torch.zeros_like(param)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(0.0) if isinstance(group["lr"], torch.Tensor) else 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
