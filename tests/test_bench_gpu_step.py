"""bench/gpu_step.py stays ready for a GPU: it runs at tiny dims on the CPU, every setting (block offload set up as
training does it, the estimate told the offloaded blocks), and its FLOPs formula grows as the module docstring
says."""

from __future__ import annotations

import pytest
import torch

from bench import gpu_step
from fantasytalk_cli.models.dims import TINY_CONFIG, WAN21_I2V_14B_CONFIG
from fantasytalk_cli.planning.fit import MemoryOptions
from fantasytalk_cli.planning.model_size import TransformerDims, block_params
from fantasytalk_cli.runtime.block_offload import BlockOffload


def test_runs_every_setting_at_tiny_dims(capsys: pytest.CaptureFixture[str]) -> None:
    gpu_step.main(["--tiny", "--steps", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("32x32x5")]
    names = ["bf16", "fp8", "offload", "fp8+offload", "blocks1", "fp8+offload+blocks1"]
    assert [row.split()[1] for row in rows] == names
    assert all(float(row.split()[2]) > 0 for row in rows)


def test_settings_take_the_general_form() -> None:
    assert gpu_step.parse_setting("offload") == MemoryOptions("bf16", True, 0)
    assert gpu_step.parse_setting("bf16+blocks12") == MemoryOptions("bf16", False, 12)
    assert gpu_step.parse_setting("fp8+offload+blocks8") == MemoryOptions("fp8", True, 8)
    for bad in ("fp8+bf16", "blocks2+blocks3", "fp16", "offload+offload", "blocks"):
        with pytest.raises(ValueError, match="each at most once"):
            gpu_step.parse_setting(bad)


def test_block_offload_setting_offloads_and_is_estimated(monkeypatch: pytest.MonkeyPatch) -> None:
    """4 tiny blocks, the last 3 offloaded: the bench's hooks bring each in for the forward and the recompute of
    every step (warm-up + 1), and its estimate is one block's weights below bf16's (3 offloaded, 2 in flight)."""
    made: list[BlockOffload] = []
    real = gpu_step.offload_blocks
    monkeypatch.setattr(gpu_step, "offload_blocks", lambda *a: made.append(real(*a)) or made[-1])
    config, shape, cpu = {**TINY_CONFIG, "num_layers": 4}, (32, 32, 5), torch.device("cpu")
    plain = gpu_step.run_setting(config, shape, "bf16", 1, cpu)
    offloaded = gpu_step.run_setting(config, shape, "bf16+blocks3", 1, cpu)
    assert made[0] is None and made[1] is not None and made[1].onloads == 2 * 3 * 2
    per_block = block_params(TransformerDims.from_config(config)) * 2
    assert plain["estimate"] - offloaded["estimate"] == per_block


def test_flops_formula() -> None:
    """Linear layers grow with the tokens, attention with their square: doubling the tokens more than doubles it,
    less than quadruples it; 14B at 512x512x81 (21,504 tokens): 3 x 40 blocks x ~25 TFLOP, about 3 PFLOP a step."""
    small = gpu_step.step_flops(WAN21_I2V_14B_CONFIG, 21504, 21)
    double = gpu_step.step_flops(WAN21_I2V_14B_CONFIG, 2 * 21504, 21)
    assert 2 < double / small < 4
    assert 2.5e15 < small < 3.5e15
