"""torchrun entry for the 2-process training tests: the test-only gloo patch, a probe that records how
the model was wrapped and how much of it each rank holds, then the real `ftalk train` command."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

from tests.dist import gloo_patch

gloo_patch.apply()

import torch  # noqa: E402

from fantasytalk_cli.cli import main  # noqa: E402
from fantasytalk_cli.train import setup as loop  # noqa: E402  (the set-up holds what is patched)


def _record(out: Path, model: torch.nn.Module, rank: int) -> None:
    """Per rank: FSDP units around AudioAttentionBlock and the parameter elements held locally."""
    from fantasytalk_cli.models.transformer import AudioAttentionBlock

    fsdp1 = fsdp2 = 0
    for module in model.modules():
        name = type(module).__name__
        if name == "FullyShardedDataParallel" and isinstance(module.module, AudioAttentionBlock):
            fsdp1 += 1
        if isinstance(module, AudioAttentionBlock) and name.startswith("FSDP"):
            fsdp2 += 1
    local = sum(_held(p) for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    info = {"fsdp1_units": fsdp1, "fsdp2_units": fsdp2, "local_numel": local, "full_numel": full}
    info["max_local_numel_between_writes"] = WRITES["max_local"]
    info["largest_param"] = WRITES["largest"]
    info["writes"] = WRITES["count"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(info))


WRITES = {"max_local": 0, "largest": 0, "count": 0}


def _held(param: torch.nn.Parameter) -> int:
    """Elements a rank holds for one parameter: its data (full when gathered) + its ZeRO-3 partition."""
    partition = getattr(param, "ds_tensor", None)
    return param.data.numel() + (partition.numel() if partition is not None else 0)


real_sharded_build = loop.sharded_build


def sharded_build(*args, **kwargs):  # noqa: ANN002, ANN003
    """Measure what a rank holds after every ZeRO-3 parameter write (gathered ones must be released)."""
    build = real_sharded_build(*args, **kwargs)
    if build is None:
        return None
    seen: dict[int, torch.nn.Parameter] = {}

    def write(param: torch.nn.Parameter, tensor: torch.Tensor | None) -> None:
        build.write(param, tensor)
        seen[id(param)] = param
        WRITES["count"] += 1
        WRITES["largest"] = max(WRITES["largest"], int(param.ds_numel))
        WRITES["max_local"] = max(WRITES["max_local"], sum(_held(p) for p in seen.values()))

    return dataclasses.replace(build, write=write)


loop.sharded_build = sharded_build
real_build = loop.build_accelerator


def build_accelerator(*args, **kwargs):  # noqa: ANN002, ANN003
    accelerator, strategy = real_build(*args, **kwargs)
    real_prepare = accelerator.prepare
    probe_dir = Path(os.environ["FTALK_TEST_PROBE_DIR"])

    def prepare(*objs):  # noqa: ANN002
        result = real_prepare(*objs)
        _record(probe_dir, result[0], accelerator.process_index)
        return result

    accelerator.prepare = prepare
    return accelerator, strategy


loop.build_accelerator = build_accelerator

if __name__ == "__main__":
    from tests.dist.launch import exit_now

    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        exit_now(exc.code)
    exit_now(0)
