"""The seed's four training recipes, verbatim but for the script and the sizes, on the seed's raw
`metadata_control.json` (probe facts read on the main rank and shared), run end to end on the
CPU through `accelerate launch -m fantasytalk_cli train` (ZeRO/FSDP with 2 processes over gloo, made
possible by a test-only sitecustomize)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from fantasytalk_cli.checkpoints.folder import CheckpointMeta, newest_checkpoint
from tests.dist.launch import check_run
from tests.test_config import SEED_LAUNCHERS, SEED_SCRIPT_ARGS

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")

# What the recipes need changed to fit a laptop: the tiny world's paths and small numbers. Every other
# script flag of the seed stays as written (bf16, gradient checkpointing, low_vram, token-length buckets).
SMALL = {
    "--video_sample_size=512": "--video_sample_size=48",
    "--token_sample_size=512": "--token_sample_size=48",
    "--video_sample_n_frames=81": "--video_sample_n_frames=9",
    "--dataloader_num_workers=8": "--dataloader_num_workers=1",
    "--num_train_epochs=100": "--num_train_epochs=1",
    "--checkpointing_steps=50": "--checkpointing_steps=1",
    "--lr_warmup_steps=100": "--lr_warmup_steps=1",
}


def recipe_command(recipe: str, world: dict, output_dir: Path) -> list[str]:
    launcher = SEED_LAUNCHERS[recipe].replace("scripts/fantasytalking/train.py", "-m fantasytalk_cli train")
    launcher = launcher.replace("config/zero_stage", "examples/zero_stage")
    launcher = launcher.replace(
        "accelerate launch", f"{ACCELERATE} launch --num_processes {1 if recipe == 'ddp' else 2}"
    )
    if recipe == "fsdp":  # accelerate's sync_module_states (its launcher default) needs a GPU-like device
        launcher = launcher.replace("--use_fsdp", "--use_fsdp --fsdp_sync_module_states false")
    script = SEED_SCRIPT_ARGS.replace("\\\n", " ")
    for seed, small in SMALL.items():
        script = script.replace(seed, small)
    script = (
        script.replace("config/wan2.1/wan_civitai.yaml", "examples/wan2.1/wan_civitai.yaml")
        .replace("$MODEL_NAME", str(world["model"]))
        .replace("$DATASET_NAME", str(world["data"]))
        .replace("$DATASET_META_NAME", str(world["data"] / "metadata_control.json"))  # the raw file, as users run it
        .replace('"output_dir"', str(output_dir))
        .replace("models/FantasyTalking/fantasytalking_model.ckpt", str(world["model"] / "fantasytalking_model.ckpt"))
    )
    return shlex.split(launcher) + shlex.split(script) + ["--max_train_steps", "2", "--report_to", "none"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["ddp", "zero2", "zero3", "fsdp"])
def test_seed_recipe_runs_end_to_end(recipe: str, tiny_world: dict, tmp_path: Path) -> None:
    run = tmp_path / "output_dir"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(
        FTALK_TEST_GLOO="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "tests" / "dist"), str(REPO)]),
        ACCELERATE_TORCH_DEVICE="cpu",
    )
    cmd = recipe_command(recipe, tiny_world, run)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    check_run(proc, run / "checkpoint-2" / "meta.json", shlex.join(cmd))
    latest = newest_checkpoint(run)
    assert latest is not None and latest.name == "checkpoint-2"
    meta = CheckpointMeta.read(latest)
    assert meta.world_size == (1 if recipe == "ddp" else 2)
    assert meta.strategy.startswith({"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "fsdp": "fsdp"}[recipe])
    assert meta.config["train"]["mixed_precision"] == "bf16"
    assert meta.config["model"]["trainable_modules"] == ["processor.", "proj_model."]
