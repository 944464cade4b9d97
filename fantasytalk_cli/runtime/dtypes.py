"""The one table from precision names to torch dtypes: `--mixed_precision` (accelerate's `no`, `fp16`, `bf16`)
and `convert-zero --dtype` (`fp32`, `fp16`, `bf16`)."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "no": torch.float32,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
"""Precision name -> dtype; `no` is accelerate's name for full precision (`--mixed_precision no`)."""
