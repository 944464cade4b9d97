"""TEST-ONLY: let accelerate run DeepSpeed / FSDP / DDP over gloo on CPU processes.

accelerate picks a CPU backend only for plain DDP; these tests make its backend choice return
`gloo` with the device on the CPU, so `torchrun --nproc_per_node 2` exercises the real ZeRO-2/3
and FSDP code paths on a laptop. Never imported by the product.
"""

from __future__ import annotations

import os


def apply() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    # accelerate only turns FSDP on over a "multi-GPU" distributed type; the device stays the CPU
    # through ACCELERATE_TORCH_DEVICE. DDP keeps accelerate's own CPU type (no device_ids).
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    kind = DistributedType.MULTI_GPU if fsdp else DistributedType.MULTI_CPU

    original = PartialState._prepare_backend

    def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):  # noqa: ANN001
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # one process: accelerate's own choice
            return original(self, cpu, sagemaker_dp, backend)
        return "gloo", kind

    PartialState._prepare_backend = _prepare_backend
