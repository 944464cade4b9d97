"""torchrun entry for the 2-process training tests: the test-only gloo patch, a probe that records how
the model was wrapped and how much of it each rank holds, then the real `ftalk train` command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tests.dist import gloo_patch

gloo_patch.apply()

import torch  # noqa: E402

from fantasytalk_cli.cli import main  # noqa: E402
from fantasytalk_cli.train import loop  # noqa: E402


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
    local = sum(p.data.numel() for p in model.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    info = {"fsdp1_units": fsdp1, "fsdp2_units": fsdp2, "local_numel": local, "full_numel": full}
    info["peak_local_numel"] = getattr(model, "_ftalk_peak_local_numel", local)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(info))


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
    main(sys.argv[1:])
