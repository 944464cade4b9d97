"""`ftalk train` with 2 CPU processes (torchrun over gloo, test-only patch) for DDP, ZeRO-2, ZeRO-3 and
FSDP1/2: 3 uninterrupted steps with a checkpoint at step 2, then a resume of that checkpoint for the last
step, which must end on the same weights; the wrapping and the checkpoint's contents are checked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fantasytalk_cli.checkpoints.folder import CheckpointMeta, newest_checkpoint
from fantasytalk_cli.checkpoints.sources import open_checkpoint
from fantasytalk_cli.sample.video_io import read_mp4
from tests.dist.launch import check_run
from tests.test_distributed import STRATEGIES
from tests.tiny_world import world_argv

REPO = Path(__file__).resolve().parents[1]
ZERO3_TEST_JSON = {
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    # threshold 0: every tiny parameter is partitioned (the shipped 1e5 keeps small ones whole)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}


def launch(argv: list[str], env_extra: dict[str, str], probe: Path, done: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(env_extra)
    env["FTALK_TEST_PROBE_DIR"] = str(probe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "tests.dist.train_entry", "train", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return check_run(proc, done)


LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "lora"),
    [(s, False) for s in ("ddp", "zero2", "zero3", "fsdp1", "fsdp2")]
    + [(s, True) for s in ("ddp", "zero2", "zero3", "fsdp1", "fsdp2")],
    ids=lambda v: "lora" if v is True else "" if v is False else v,
)
def test_two_process_train_checkpoint_resume(name: str, lora: bool, tiny_world: dict, tmp_path: Path) -> None:
    env = dict(STRATEGIES[name])
    if name == "zero3":
        ds = tmp_path / "zero3.json"
        ds.write_text(json.dumps(ZERO3_TEST_JSON))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds)
    # one config for both runs (max_train_steps=3 everywhere: the schedule is the same), so the
    # uninterrupted run doubles as the run that wrote the checkpoint being resumed
    common = {"checkpointing_steps": 2, "train_batch_size": 1, "max_train_steps": 3, **(LORA if lora else {})}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    launch(world_argv(tiny_world, whole, **common), env, tmp_path / "probe1", whole / "checkpoint-3")
    meta = CheckpointMeta.read(whole / "checkpoint-2")
    assert meta.world_size == 2 and meta.step == 2
    shutil.copytree(whole / "checkpoint-2", resumed / "checkpoint-2")
    (resumed / "latest").write_text("checkpoint-2\n")
    out = launch(
        world_argv(tiny_world, resumed, resume_from_checkpoint="latest", **common),
        env,
        tmp_path / "probe2",
        resumed / "checkpoint-3",
    )
    assert "resumed from" in out and "at step 2" in out
    assert newest_checkpoint(resumed) == resumed / "checkpoint-3"
    # 2 steps + resume 1 == 3 steps, bitwise: same data order, noise and RNG after the restore, and every
    # strategy restores the exact fp32 trainable weights and optimizer state (ZeRO: its fp32 partitions;
    # FSDP: the trainable shards; DDP: trainable.safetensors); all arithmetic is deterministic on the CPU
    want = load_file(whole / "checkpoint-3" / "trainable.safetensors")
    got = load_file(resumed / "checkpoint-3" / "trainable.safetensors")
    assert sorted(got) == sorted(want)
    differ = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differ, f"resumed weights differ from the uninterrupted run: {differ[:5]}"
    assert any(".lora_B.default." in k for k in want) == lora  # the LoRA trains with the adapter
    before = load_file(whole / "checkpoint-2" / "trainable.safetensors")
    assert any(not torch.equal(before[k], want[k]) for k in want), "step 3 changed the weights"
    if name != "ddp":  # the frozen base is not in the checkpoint (DDP: no model state beyond trainable.safetensors)
        source = open_checkpoint(whole / "checkpoint-2")
        assert source.frozen_count == 0, source.description
        assert sorted(source.trainable) == sorted(want)
        source.close()
    probes = [json.loads((tmp_path / "probe1" / f"rank{r}.json").read_text()) for r in (0, 1)]
    blocks = 2  # the tiny transformer's layers
    if name == "fsdp1":
        assert [p["fsdp1_units"] for p in probes] == [blocks, blocks]
    if name == "fsdp2":
        assert [p["fsdp2_units"] for p in probes] == [blocks, blocks]
    if name == "zero3":
        for p in probes:  # built partitioned, filled one gathered parameter at a time, released after each
            assert p["writes"] > 0, p
            assert p["local_numel"] < 0.6 * p["full_numel"], p
            assert p["max_local_numel_between_writes"] < 0.6 * p["full_numel"], p


@pytest.mark.slow
@pytest.mark.parametrize(("name", "lora"), [("zero3", False), ("fsdp2", False), ("zero3", True)])
def test_validation_samples_without_changing_the_weights(
    name: str, lora: bool, tiny_world: dict, tmp_path: Path, sample_inputs: dict[str, Path]
) -> None:
    """2 processes, sharded weights: validation at steps 1 and 2 (gathered on every rank, sampled on the main one)
    writes samples/step-N/*.mp4, and the run ends on the same weights, bit for bit, as the run without it."""
    env = dict(STRATEGIES[name])
    if name == "zero3":
        ds = tmp_path / "zero3.json"
        ds.write_text(json.dumps(ZERO3_TEST_JSON))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds)
    common = {"checkpointing_steps": 2, "train_batch_size": 1, "max_train_steps": 2, **(LORA if lora else {})}
    plain, sampled = tmp_path / "plain", tmp_path / "sampled"
    launch(world_argv(tiny_world, plain, **common), env, tmp_path / "probe1", plain / "checkpoint-2")
    validation = {
        "validation_image_paths": [sample_inputs["image"]],
        "validation_audio_paths": [sample_inputs["audio"]],
        "validation_steps": 1,
        "validation_num_inference_steps": 2,
        "validation_image_size": 64,
        "validation_max_num_frames": 9,
    }
    out = launch(
        world_argv(tiny_world, sampled, **common, **validation), env, tmp_path / "p2", sampled / "checkpoint-2"
    )
    assert "validation: step 1" in out and "validation: step 2" in out
    for step in (1, 2):
        (video,) = (sampled / "samples" / f"step-{step}").glob("*.mp4")
        frames, info = read_mp4(video)
        assert (info.frames, info.width, info.height) == (9, 48, 64) and frames.std() > 0
    want = load_file(plain / "checkpoint-2" / "trainable.safetensors")
    got = load_file(sampled / "checkpoint-2" / "trainable.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_memory_options_compose_with_two_process_ddp(tiny_world: dict, tmp_path: Path) -> None:
    """DDP over 2 processes with activation offload and an offloaded block trains to bitwise the same weights as
    plain DDP; with fp8 weights (read straight into float8, left out of DDP's initial broadcast: gloo has no float8
    collective) it trains and saves."""
    env = dict(STRATEGIES["ddp"])
    common = {"checkpointing_steps": 2, "train_batch_size": 1, "max_train_steps": 2, "gradient_checkpointing": True}
    plain, offload, fp8 = tmp_path / "plain", tmp_path / "offload", tmp_path / "fp8"
    launch(world_argv(tiny_world, plain, **common), env, tmp_path / "p1", plain / "checkpoint-2")
    options = {"activation_offload": True, "blocks_to_offload": 1}
    out = launch(world_argv(tiny_world, offload, **common, **options), env, tmp_path / "p2", offload / "checkpoint-2")
    assert "the frozen weights of the last 1 blocks live in host memory" in out
    want = load_file(plain / "checkpoint-2" / "trainable.safetensors")
    got = load_file(offload / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)
    out = launch(
        world_argv(tiny_world, fp8, **common, base_weights_dtype="fp8"), env, tmp_path / "p3", fp8 / "checkpoint-2"
    )
    assert "stored in float8_e4m3fn" in out
    trained = load_file(fp8 / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in trained.values())


@pytest.mark.slow
def test_activation_offload_composes_with_fsdp(tiny_world: dict, tmp_path: Path) -> None:
    """FSDP2 over 2 processes with activation offload trains to bitwise the same weights as without (fp8 and block
    offload are refused under FSDP: tests/test_memory_options.py)."""
    env = dict(STRATEGIES["fsdp2"])
    common = {"checkpointing_steps": 2, "train_batch_size": 1, "max_train_steps": 2, "gradient_checkpointing": True}
    plain, offload = tmp_path / "plain", tmp_path / "offload"
    launch(world_argv(tiny_world, plain, **common), env, tmp_path / "p1", plain / "checkpoint-2")
    launch(
        world_argv(tiny_world, offload, **common, activation_offload=True),
        env,
        tmp_path / "p2",
        offload / "checkpoint-2",
    )
    want = load_file(plain / "checkpoint-2" / "trainable.safetensors")
    got = load_file(offload / "checkpoint-2" / "trainable.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_block_offload_composes_with_zero2(tiny_world: dict, tmp_path: Path) -> None:
    """ZeRO-2 over 2 processes with an offloaded block trains to bitwise the same weights as without: ZeRO-2
    partitions the optimizer state and gradients of the trainable weights; the frozen ones stay module parameters."""
    env = dict(STRATEGIES["zero2"])
    common = {"checkpointing_steps": 2, "train_batch_size": 1, "max_train_steps": 2, "gradient_checkpointing": True}
    plain, offload = tmp_path / "plain", tmp_path / "offload"
    launch(world_argv(tiny_world, plain, **common), env, tmp_path / "p1", plain / "checkpoint-2")
    argv = world_argv(tiny_world, offload, **common, blocks_to_offload=1)
    out = launch(argv, env, tmp_path / "p2", offload / "checkpoint-2")
    assert "the frozen weights of the last 1 blocks live in host memory" in out
    want = load_file(plain / "checkpoint-2" / "trainable.safetensors")
    got = load_file(offload / "checkpoint-2" / "trainable.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
