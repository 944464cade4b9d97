"""How a run's processes are split. Today every process is one data-parallel rank (DDP, ZeRO and FSDP all shard or
replicate over the data-parallel group); a later sequence-parallel split would add its axis here, and every place
that asks "how many batches per step, which one is mine, how many ranks must agree" already asks this object.

The launcher's environment (`WORLD_SIZE`, `RANK`, `LOCAL_RANK`) is read here and nowhere else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from fantasytalk_cli.errors import FtalkError


class WorldError(FtalkError):
    """The launcher's environment does not say a usable process layout (exit 1, as training's set-up errors)."""


class _Processes(Protocol):
    """What `World.of` reads from an accelerate `Accelerator` (duck-typed: this module imports no accelerate)."""

    process_index: int
    num_processes: int


@dataclass(frozen=True)
class World:
    """This process's place in the run: data-parallel rank `dp_rank` of `dp_size` (one process: 0 of 1)."""

    dp_rank: int = 0
    dp_size: int = 1
    local_rank: int = 0
    """This process's index on its node (which device it takes)."""

    @property
    def processes(self) -> int:
        """Every process of the run (data-parallel only today: `dp_size`)."""
        return self.dp_size

    @property
    def main(self) -> bool:
        """The process that writes shared files and speaks for the run."""
        return self.dp_rank == 0

    @classmethod
    def of(cls, accelerator: _Processes) -> World:
        """The world an accelerate `Accelerator` set up."""
        return cls(dp_rank=accelerator.process_index, dp_size=accelerator.num_processes,
                   local_rank=getattr(accelerator, "local_process_index", 0))  # fmt: skip

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> World:
        """The world a launcher announced (`accelerate launch`, torchrun, DeepSpeed's launcher set `WORLD_SIZE`,
        `RANK`, `LOCAL_RANK`); one process without one. A value that is not a number is a `WorldError`."""
        env = os.environ if environ is None else environ
        values = {}
        for name, default in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
            try:
                values[name] = int(env.get(name, default))
            except ValueError as exc:
                raise WorldError(
                    f"{name}={env[name]!r} is not a number: the launcher's environment is broken; unset it to run "
                    "one process, or start the run with `accelerate launch`"
                ) from exc
        return cls(dp_rank=values["RANK"], dp_size=max(1, values["WORLD_SIZE"]), local_rank=values["LOCAL_RANK"])
