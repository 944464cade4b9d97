"""The tiny world the training tests share: a tiny original-layout Wan2.1 folder, synthetic talking
clips, their clean metadata (with probe facts), and a run config small enough for a CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from accelerate.state import AcceleratorState
from rich.console import Console

from fantasytalk_cli.config import FtalkConfig, load_config
from fantasytalk_cli.config.flags import config_to_argv
from fantasytalk_cli.config.schema import BucketConfig, DataConfig
from fantasytalk_cli.data.synthetic import make_demo_dataset
from fantasytalk_cli.data.validate import ValidateOptions, validate_metadata
from fantasytalk_cli.models.tiny import make_tiny_model
from fantasytalk_cli.train.loop import run_training

SMALL_BUCKETS: dict[str, Any] = {"video_sample_size": 48, "video_sample_n_frames": 9, "enable_bucket": False}


def build_world(root: Path, *, num_clips: int = 6, seed: int = 0) -> dict[str, Path]:
    """Write model + data under `root`; returns the paths."""
    model = root / "model"
    data = root / "data"
    make_tiny_model(model, "original", seed=seed)
    make_demo_dataset(data, seed=seed, num_clips=num_clips)
    clean = data / "clean.json"
    report = validate_metadata(
        DataConfig(train_data_dir=data, train_data_meta=data / "metadata_control.json"),
        BucketConfig(**SMALL_BUCKETS),
        ValidateOptions(clean_path=clean, workers=1),
    )
    assert report.ok, report.codes
    return {"root": root, "model": model, "data": data, "clean": clean}


def world_config(world: dict[str, Path], output_dir: Path, **overrides: Any) -> FtalkConfig:
    """A run config on the tiny world (fp32 on the CPU, small samples)."""
    flags: dict[str, Any] = {
        "train_data_dir": world["data"],
        "train_data_meta": world["clean"],
        "pretrained_model_name_or_path": world["model"],
        "transformer_path": world["model"] / "fantasytalking_model.ckpt",
        "mixed_precision": "no",
        "output_dir": output_dir,
        "report_to": "none",
        "learning_rate": 1e-3,
        "seed": 7,
        **SMALL_BUCKETS,
    }
    flags.update(overrides)
    return load_config(None, flags)


def world_argv(world: dict[str, Path], output_dir: Path, **overrides: Any) -> list[str]:
    """The same config as `ftalk train` command-line flags."""
    return config_to_argv(world_config(world, output_dir, **overrides))


def train_in_own_state(cfg: FtalkConfig, console: Console) -> Any:
    """`run_training(cfg)` with accelerate's process-wide state reset before and after: that state is set by
    whichever test made an Accelerator first, so a run that chooses another mixed precision (and the next test)
    needs its own."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return run_training(cfg, console)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
