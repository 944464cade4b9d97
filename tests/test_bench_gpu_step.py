"""bench/gpu_step.py stays ready for a GPU: it runs at tiny dims on the CPU, every setting, and its FLOPs formula
grows as the module docstring says."""

from __future__ import annotations

import pytest

from bench import gpu_step
from fantasytalk_cli.models.dims import WAN21_I2V_14B_CONFIG


def test_runs_every_setting_at_tiny_dims(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_step.main(["--tiny", "--steps", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("32x32x5")]
    assert [row.split()[1] for row in rows] == ["bf16", "fp8", "offload", "fp8+offload"]
    assert all(float(row.split()[2]) > 0 for row in rows)


def test_flops_formula() -> None:
    """Linear layers grow with the tokens, attention with their square: doubling the tokens more than doubles it,
    less than quadruples it; 14B at 512x512x81 (21,504 tokens): 3 x 40 blocks x ~25 TFLOP, about 3 PFLOP a step."""
    small = gpu_step.step_flops(WAN21_I2V_14B_CONFIG, 21504, 21)
    double = gpu_step.step_flops(WAN21_I2V_14B_CONFIG, 2 * 21504, 21)
    assert 2 < double / small < 4
    assert 2.5e15 < small < 3.5e15
