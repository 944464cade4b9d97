"""The strategy module on real multi-process runs: 2 CPU processes over gloo (test-only patch) for
DDP, ZeRO-2, ZeRO-3, FSDP1 and FSDP2, each training a toy model with frozen and trainable parts in
`AudioAttentionBlock` units; the gathered fp32 trainable weights must equal a single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fantasytalk_cli.config.schema import DistConfig, TrainConfig
from fantasytalk_cli.train.distributed import DistributedSetupError, deepspeed_config, detect_strategy
from tests.dist.launch import check_run

REPO = Path(__file__).resolve().parents[1]
FSDP_SEED_FLAGS = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "AudioAttentionBlock",
    "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_STATE_DICT_TYPE": "SHARDED_STATE_DICT",
    "FSDP_BACKWARD_PREFETCH": "BACKWARD_PRE",
}
STRATEGIES = {
    "ddp": {},
    "zero2": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "examples/zero_stage2_config.json",
    },
    "zero3": {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": "examples/zero_stage3_config.json",
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
    },
    "fsdp1": {**FSDP_SEED_FLAGS, "FSDP_VERSION": "1"},
    "fsdp2": {**FSDP_SEED_FLAGS, "FSDP_VERSION": "2"},
}


def run_toy(out: Path, env_extra: dict[str, str], nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    cmd += ["-m", "tests.dist.toy_run", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    check_run(proc, out / "info.json")
    return json.loads((out / "info.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("single")
    run_toy(out, {}, 1)
    return load_file(out / "trainable.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_trains_saves_and_gathers(name: str, tmp_path: Path, reference: dict) -> None:
    info = run_toy(tmp_path, STRATEGIES[name], 2)
    assert info["world"] == 2
    expected = {"fsdp1": "fsdp", "fsdp2": "fsdp"}.get(name, name)
    assert info["strategy"] == expected
    if name == "fsdp1":
        assert any("use_orig_params" in n for n in info["notes"])
        assert info["model_type"] == "FullyShardedDataParallel"
        assert (tmp_path / "state" / "pytorch_model_fsdp_0" / ".metadata").is_file()  # sharded, not gathered
        # the gather unshards one unit at a time, never the whole model (the root holds no parameters here)
        assert info["summons"] == [{"unit": "AudioAttentionBlock", "recurse": False}] * 2
    if name.startswith("zero"):
        assert (tmp_path / "state" / "pytorch_model").is_dir()
    weights = load_file(tmp_path / "trainable.safetensors")
    assert sorted(weights) == sorted(reference)
    for key, value in reference.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6)


def test_zero_json_gets_clipping_and_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(path))
    ds, notes = deepspeed_config(DistConfig(), TrainConfig(max_grad_norm=0.05, train_batch_size=3), 2)
    assert ds["gradient_clipping"] == 0.05
    assert any("gradient_clipping was missing" in n for n in notes)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2}))
    with pytest.raises(DistributedSetupError, match="train_micro_batch_size_per_gpu=2"):
        deepspeed_config(DistConfig(), TrainConfig(train_batch_size=3), 2)
    path.write_text("{oops")
    with pytest.raises(DistributedSetupError, match="line 1, column 2"):
        deepspeed_config(DistConfig(), TrainConfig(), 2)


def test_detect_strategy_from_launcher_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.delenv(key)
    assert detect_strategy(DistConfig()) == "ddp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "examples/zero_stage3_config.json"))
    assert detect_strategy(DistConfig()) == "zero3"
    assert detect_strategy(DistConfig(strategy="fsdp")) == "fsdp"
