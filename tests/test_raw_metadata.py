"""What a new user does first: train, plan and validate straight from the seed's raw `metadata_control.json`
(no probe facts in it), with relative media paths, with the output piped to a file, and with launchers
that start more processes than accelerate can hold."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import decord
import pytest
from PIL import Image
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.data import probing
from fantasytalk_cli.data.synthetic import make_demo_dataset
from tests.tiny_world import SMALL_BUCKETS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def raw_dataset(root: Path, num_clips: int = 6) -> Path:
    """A fresh seed-layout dataset (train/, wav/, metadata_control.json with relative paths, no probe
    facts and no probe cache yet); returns the metadata file."""
    make_demo_dataset(root, seed=1, num_clips=num_clips)
    meta = root / "metadata_control.json"
    assert '"probe"' not in meta.read_text() and not (root / probing.CACHE_NAME).exists()
    return meta


def small_flags(world: dict, output_dir: Path, **extra: object) -> list[str]:
    flags = {
        "pretrained_model_name_or_path": world["model"],
        "mixed_precision": "no",
        "report_to": "none",
        "output_dir": output_dir,
        **SMALL_BUCKETS,
        **extra,
    }
    return [f"--{k}={v}" for k, v in flags.items() if not isinstance(v, bool)] + [
        f"--{k}" if v else f"--no-{k}" for k, v in flags.items() if isinstance(v, bool)
    ]


class ProbeCounter:
    """Counts chunks of probe jobs run (inline; a worker pool would fail to pickle the wrapper, which fails
    the test as loudly) and decoder opens in this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from fantasytalk_cli.data import probe

        self.chunks = self.opens = 0
        real_chunk, real_open = probing.probe_chunk, probe.open_decoder

        def chunk(jobs):  # noqa: ANN001, ANN202
            self.chunks += 1
            return real_chunk(jobs)

        def open_decoder(kind, path):  # noqa: ANN001, ANN202
            self.opens += 1
            return real_open(kind, path)

        monkeypatch.setattr(probing, "probe_chunk", chunk)
        monkeypatch.setattr(probe, "open_decoder", open_decoder)


def train(argv: list[str]) -> str:
    result = CliRunner().invoke(app, ["train", *argv])  # output captured: not a terminal, as in `> train.log`
    assert result.exit_code == 0, result.output
    return result.output


def test_raw_metadata_trains_and_probes_once(tiny_world: dict, tmp_path: Path, monkeypatch) -> None:
    meta = raw_dataset(tmp_path / "data")
    counter = ProbeCounter(monkeypatch)
    flags = ["--train_data_meta", str(meta), "--max_train_steps=5", "--logging_steps=2", "--checkpointing_steps=5"]
    first = train([*flags, *small_flags(tiny_world, tmp_path / "run1")])
    assert (tmp_path / "run1" / "checkpoint-5" / "meta.json").is_file()
    assert f"relative media paths are joined to {meta.parent}" in first  # no --train_data_dir: the metadata's folder
    assert "6 entries carry no probe facts: 12 files probed" in first
    assert (meta.parent / probing.CACHE_NAME).is_file()
    # Piped: one plain line at step 1 and every --logging_steps, and the last; no progress bar.
    logged = re.findall(
        r"(?m)^step (\d+)/5  loss \d+\.\d+  lr \S+  \S+ samples/s  \d+ tok/s  data wait \d+%  eta", first
    )
    assert logged == ["1", "2", "4", "5"], first
    assert "━" not in first

    counter.chunks = counter.opens = 0
    second = train([*flags, *small_flags(tiny_world, tmp_path / "run2")])
    assert counter.chunks == 0 and counter.opens == 0, "the second run opened media to plan"
    assert "all read from the probe cache" in second and "nothing probed" in second


def test_plan_buckets_takes_the_raw_metadata_as_an_argument(tiny_world: dict, tmp_path: Path, monkeypatch) -> None:
    meta = raw_dataset(tmp_path / "data")
    plan = tmp_path / "plan.json"
    small = [f"--{k}={v}" for k, v in SMALL_BUCKETS.items() if not isinstance(v, bool)]
    result = CliRunner().invoke(app, ["plan-buckets", str(meta), "--write", str(plan), *small])
    assert result.exit_code == 0, result.output
    assert "12 files probed" in result.output and plan.is_file()
    # train reads that plan and the cache plan-buckets filled: nothing is probed again
    counter = ProbeCounter(monkeypatch)
    out = train(
        [
            f"--train_data_meta={meta}",
            f"--bucket_plan={plan}",
            "--max_train_steps=1",
            "--checkpointing_steps=1",
            *small_flags(tiny_world, tmp_path / "run"),
        ]  # fmt: skip
    )
    assert counter.chunks == counter.opens == 0 and "no plan file given" not in out and "stale" not in out
    assert (tmp_path / "run" / "checkpoint-1").is_dir()


def test_metadata_argument_and_flag_must_agree(tmp_path: Path) -> None:
    meta = raw_dataset(tmp_path / "data", num_clips=2)
    small = [f"--{k}={v}" for k, v in SMALL_BUCKETS.items() if not isinstance(v, bool)]
    for command, own in (("validate-metadata", ["--workers=1", *small]), ("plan-buckets", small)):
        same = CliRunner().invoke(app, [command, str(meta), "--train_data_meta", str(meta), *own])
        assert same.exit_code == 0, same.output
        other = CliRunner().invoke(app, [command, str(meta), "--train_data_meta", str(tmp_path / "other.json")])
        assert other.exit_code == 2 and "differ" in other.output


def test_validate_resolves_relative_paths_against_the_metadata_folder(tmp_path: Path, monkeypatch) -> None:
    meta = raw_dataset(tmp_path / "data", num_clips=2)
    monkeypatch.chdir(tmp_path)  # not the metadata's folder: paths must not be joined to the current directory
    small = [f"--{k}={v}" for k, v in SMALL_BUCKETS.items() if not isinstance(v, bool)]
    result = CliRunner().invoke(app, ["validate-metadata", "data/metadata_control.json", "--workers=1", *small])
    assert result.exit_code == 0, result.output
    assert "E301" not in result.output and meta.exists()


def _launch_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "FTALK_TEST"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), **extra)
    return env


LAUNCH_2 = [str(BIN / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
            "no", "--dynamo_backend", "no"]  # fmt: skip
REFUSED_LAUNCHES = {
    # accelerate was told a device (the CPU) but not to use its CPU mode: it sets up one process in each of
    # the two the launcher started (before, both trained alone and raced in one run folder)
    "one-process-each": ([*LAUNCH_2, "--multi_gpu"], {"ACCELERATE_TORCH_DEVICE": "cpu"}),
    # DeepSpeed on a machine without GPUs (before: DeepSpeed/accelerate tracebacks or a hang)
    "deepspeed-without-gpu": (
        [*LAUNCH_2, "--use_deepspeed", "--deepspeed_config_file", str(REPO / "examples/zero_stage2_config.json")],
        {},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("launch", sorted(REFUSED_LAUNCHES))
def test_a_launch_accelerate_cannot_hold_is_refused(launch: str, tiny_world: dict, tmp_path: Path) -> None:
    """Two processes launched, each refusing with the reason and the command that works, before the run
    folder exists."""
    meta = raw_dataset(tmp_path / "data", num_clips=2)
    run = tmp_path / "run"
    launcher, env = REFUSED_LAUNCHES[launch]
    cmd = [*launcher, "-m", "fantasytalk_cli", "train", f"--train_data_meta={meta}", "--max_train_steps=1",
           *small_flags(tiny_world, run)]  # fmt: skip
    proc = subprocess.run(cmd, env=_launch_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    refusals = re.findall(r"(?m)^error: .*2 processes.*Nothing was written.*$", proc.stderr)
    assert len(refusals) == 2, proc.stderr[-4000:]  # each rank says why, on one line
    assert all("--multi_gpu --num_processes N" in line for line in refusals)  # the command that does work
    assert not re.search(r'File ".*fantasytalk_cli/', proc.stderr)  # no traceback of ours (the launcher prints its own)
    assert not run.exists()


def test_world_check_names_both_counts() -> None:
    from fantasytalk_cli.train.distributed import DistributedSetupError, check_world

    check_world(2, 2, "ddp")
    with pytest.raises(DistributedSetupError, match=r"started 2 processes .* set up 1 for ddp"):
        check_world(2, 1, "ddp")


@pytest.mark.slow
def test_two_process_ddp_on_cpu_with_the_documented_command(tiny_world: dict, tmp_path: Path) -> None:
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: real DDP over gloo (no
    test patch), on the raw metadata."""
    meta = raw_dataset(tmp_path / "data")
    run = tmp_path / "run"
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "fantasytalk_cli", "train",
           f"--train_data_meta={meta}", "--max_train_steps=2", "--checkpointing_steps=2",
           *small_flags(tiny_world, run)]  # fmt: skip
    proc = subprocess.run(cmd, env=_launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cpu" in proc.stdout and "DDP on the CPU over gloo" in proc.stdout
    assert (run / "checkpoint-2" / "meta.json").is_file()
    assert proc.stdout.count("training summary") == 1  # printed by the main process only
    assert '"world_size": 2' in (run / "checkpoint-2" / "meta.json").read_text()


# ------------------------------------------------------------------------------------------ the README


def readme_blocks() -> list[str]:
    """Every ```sh block of README.md, as written."""
    return re.findall(r"```sh\n(.+?)\n```", (REPO / "README.md").read_text(), flags=re.S)


def readme_block(starts: str) -> str:
    found = [b for b in readme_blocks() if b.lstrip().startswith(starts)]
    assert len(found) == 1, f"README has {len(found)} sh blocks starting with {starts!r}"
    return found[0]


# What a laptop needs changed: small samples and few steps. Appended to the README's own FTALK_ARGS.
SCALE_DOWN = [
    "--video_sample_size=48", "--token_sample_size=48", "--video_sample_n_frames=9", "--dataloader_num_workers=1",
    "--max_train_steps=2", "--checkpointing_steps=2", "--lr_warmup_steps=1", "--report_to=none",
]  # fmt: skip


def user_folder(world: dict, root: Path) -> Path:
    """The layout the README's recipe names, relative to where the user runs it: the model, the released
    adapter, the seed's raw dataset, and ftalk's examples/."""
    model = root / "models/Diffusion_Transformer/Wan2.1-I2V-14B-720P"
    shutil.copytree(world["model"], model)
    (root / "models/FantasyTalking").mkdir(parents=True)
    shutil.copy(world["model"] / "fantasytalking_model.ckpt", root / "models/FantasyTalking/fantasytalking_model.ckpt")
    raw_dataset(root / "datasets/internal_datasets")
    shutil.copytree(REPO / "examples", root / "examples")
    return root


def run_bash(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=_launch_env(),
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, f"$ {script}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.slow
def test_readme_recipe_blocks_run_on_the_raw_metadata(tiny_world: dict, tmp_path: Path) -> None:
    """The README's variables, its FTALK_ARGS and its one-process launch line, run by bash as written, on the
    seed's raw metadata_control.json; then its pre-flight block (validate, plan) with the same arguments."""
    user = user_folder(tiny_world, tmp_path / "user")
    args = readme_block("export MODEL_NAME")
    scale = f"FTALK_ARGS+=({shlex.join(SCALE_DOWN)})"
    launch = readme_block('accelerate launch --mixed_precision="bf16" -m fantasytalk_cli train')
    proc = run_bash("\n".join([args, scale, launch]), user)
    assert "carry no probe facts" in proc.stdout
    assert (user / "output_dir/checkpoint-2/fantasytalking_model.ckpt").is_file()
    preflight = readme_block("ftalk validate-metadata")
    proc = run_bash("\n".join([args, scale, preflight]), user)
    assert (user / "datasets/internal_datasets/metadata_clean.json").is_file()
    assert "bucket" in proc.stdout
    # the README's sample command on what the recipe trained, scaled down the same way
    first = sorted((user / "datasets/internal_datasets/train").iterdir())[0]
    Image.fromarray(decord.VideoReader(str(first))[0].asnumpy()).save(user / "face.png")
    shutil.copy(sorted((user / "datasets/internal_datasets/wav").iterdir())[0], user / "speech.wav")
    sample = readme_block("ftalk sample") + " --image_size 64 --max_num_frames 9 --num_inference_steps 2"
    proc = run_bash("\n".join([args, sample]), user)
    assert "output_dir/checkpoint-2" in proc.stdout and (user / "talk.mp4").is_file()
    # the README's feature-cache block: cache, then train from it (into a second run folder)
    cache = readme_block('ftalk cache "${FTALK_ARGS[@]}"')
    proc = run_bash("\n".join([args, scale, "FTALK_ARGS+=(--output_dir=output_cached)", cache]), user)
    assert "not loading the encoders of audio, text, video" in proc.stdout
    assert (user / "output_cached/checkpoint-2/trainable.safetensors").is_file()


@pytest.mark.slow
def test_readme_lora_recipe_runs_on_the_raw_metadata(tiny_world: dict, tmp_path: Path) -> None:
    """The README's LoRA block as written (train with a LoRA, convert for ComfyUI, sample at a LoRA scale) on the
    recipe's arguments and the seed's raw metadata_control.json, scaled down like the other recipes."""
    user = user_folder(tiny_world, tmp_path / "user")
    first = sorted((user / "datasets/internal_datasets/train").iterdir())[0]
    Image.fromarray(decord.VideoReader(str(first))[0].asnumpy()).save(user / "face.png")
    shutil.copy(sorted((user / "datasets/internal_datasets/wav").iterdir())[0], user / "speech.wav")
    block = readme_block("# LoRA rank 16").replace(
        "--out talk_lora.mp4", "--out talk_lora.mp4 --image_size 64 --max_num_frames 9 --num_inference_steps 2"
    )
    scale = f"FTALK_ARGS+=({shlex.join(SCALE_DOWN)})"
    proc = run_bash("\n".join([readme_block("export MODEL_NAME"), scale, block]), user)
    assert "LoRA rank 16, alpha 16" in proc.stdout, proc.stdout[-3000:]
    meta = json.loads((user / "output_lora/checkpoint-2/meta.json").read_text())
    assert meta["config"]["model"]["lora_rank"] == 16 and meta["config"]["train"]["audio_dropout"] == 0.1
    assert (user / "output_lora_comfyui/lora_comfyui.safetensors").is_file()
    assert (user / "output_lora_comfyui/fantasytalking_comfyui.safetensors").is_file()
    assert "applied at --lora_scale 0.8" in proc.stdout and (user / "talk_lora.mp4").is_file()


@pytest.mark.slow
def test_readme_two_stage_recipe_and_its_example_configs_run_on_the_raw_metadata(
    tiny_world: dict, tmp_path: Path
) -> None:
    """The README's two-stage block as written on the seed-layout raw metadata (whose entries carry the tracks
    `make-demo-data` drew): stage 2 starts at step 0 from stage 1's checkpoint and weighs every clip's mouth; then
    the same two runs from `examples/two_stage/`, scaled down by flags."""
    user = user_folder(tiny_world, tmp_path / "user")
    scale = f"FTALK_ARGS+=({shlex.join(SCALE_DOWN)})"
    proc = run_bash("\n".join([readme_block("export MODEL_NAME"), scale, readme_block("# stage 1: clip-level")]), user)
    assert "initialised from output_stage1/checkpoint-2: plain" in proc.stdout, proc.stdout[-3000:]
    assert "face cells x1.5, mouth cells +2; 6 of 6 entries have a track, 0 train with weight 1" in proc.stdout
    meta = json.loads((user / "output_stage2/checkpoint-2/meta.json").read_text())
    assert meta["config"]["train"]["lip_loss_weight"] == 2.0 and meta["config"]["train"]["learning_rate"] == 1e-5
    # the same two runs from the example configs as written (scaled down), in a user folder of their own
    other = user_folder(tiny_world, tmp_path / "other")
    run_bash(shlex.join(["ftalk", "train", "--config", "examples/two_stage/stage1_alignment.yaml", *SCALE_DOWN]), other)
    proc = run_bash(
        shlex.join(["ftalk", "train", "--config", "examples/two_stage/stage2_lips.yaml", *SCALE_DOWN]), other
    )
    assert "initialised from output_stage1/checkpoint-2: plain" in proc.stdout
    assert "mouth cells +2; 6 of 6 entries have a track, 0 train with weight 1" in proc.stdout
    assert (other / "output_stage2/checkpoint-2/trainable.safetensors").is_file()


@pytest.mark.slow
def test_readme_evaluate_block_runs_on_a_trained_recipe(tiny_world: dict, tmp_path: Path) -> None:
    """The README's `ftalk evaluate` block as written (scaled-down samples appended) on what the README's recipe
    trained from the raw metadata, with raw held-out clips of another seed: metrics.jsonl, the plot, best, and
    `ftalk sample --checkpoint best`."""
    user = user_folder(tiny_world, tmp_path / "user")
    make_demo_dataset(user / "datasets/held_out", seed=5, num_clips=3)
    args = readme_block("export MODEL_NAME")
    scale = f"FTALK_ARGS+=({shlex.join(SCALE_DOWN)})"
    run_bash("\n".join([args, scale, readme_block('accelerate launch --mixed_precision="bf16" -m fantasytalk_cli')]),
             user)  # fmt: skip
    first = sorted((user / "datasets/internal_datasets/train").iterdir())[0]
    Image.fromarray(decord.VideoReader(str(first))[0].asnumpy()).save(user / "face.png")
    shutil.copy(sorted((user / "datasets/internal_datasets/wav").iterdir())[0], user / "speech.wav")
    block = readme_block("ftalk evaluate output_dir")
    lines = block.split("\n")
    assert lines[0].startswith("ftalk evaluate") and lines[0].endswith("--select audio_gap"), lines[0]
    lines[0] += " --sample_size 64 --sample_frames 9 --sample_steps 1"
    lines[-1] += " --image_size 64 --max_num_frames 9 --num_inference_steps 1"
    proc = run_bash("\n".join([args, *lines]), user)
    assert "best by audio_gap: " in proc.stdout and (user / "output_dir/best").read_text().strip() == "checkpoint-2"
    rows = [json.loads(line) for line in (user / "output_dir/metrics.jsonl").read_text().splitlines()]
    assert {r["metric"] for r in rows} >= {"loss", "audio_gap", "audio_off_gap"} and {r["step"] for r in rows} == {2}
    (gap,) = [r for r in rows if r["metric"] == "audio_gap"]
    assert ("includes 0: no checkpoint follows its audio measurably yet" in proc.stdout) == (gap["low"] <= 0.0)
    assert (user / "output_dir/metrics.png").is_file() and (user / "output_dir/eval/checkpoint-2/sheet.png").is_file()
    assert "--checkpoint best" in proc.stdout and (user / "talk_best.mp4").is_file()


@pytest.mark.slow
def test_example_config_trains_scaled_down_by_flags(tiny_world: dict, tmp_path: Path) -> None:
    user = user_folder(tiny_world, tmp_path / "user")
    cmd = ["ftalk", "train", "--config", "examples/fantasytalking_512.yaml", *SCALE_DOWN]
    run_bash(shlex.join(cmd), user)
    assert (user / "output_dir/checkpoint-2/meta.json").is_file()


def test_clean_file_in_another_folder_names_the_data_folder(tmp_path: Path) -> None:
    """Without --train_data_dir, paths are read against the metadata's folder: a clean file written elsewhere
    keeps them as written, the report says which --train_data_dir to give, and with it every clip is found."""
    meta = raw_dataset(tmp_path / "data", num_clips=2)
    clean = tmp_path / "elsewhere" / "clean.json"
    clean.parent.mkdir()
    small = [f"--{k}={v}" for k, v in SMALL_BUCKETS.items() if not isinstance(v, bool)]
    first = CliRunner().invoke(
        app, ["validate-metadata", str(meta), "--write-clean", str(clean), "--workers=1", *small]
    )
    assert first.exit_code == 0, first.output
    assert f"--train_data_dir {meta.parent}" in first.output.replace("\n", "")
    again = CliRunner().invoke(
        app, ["validate-metadata", str(clean), "--train_data_dir", str(meta.parent), "--workers=1", *small]
    )
    assert again.exit_code == 0 and "E30" not in again.output, again.output
