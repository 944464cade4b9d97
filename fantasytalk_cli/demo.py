"""`ftalk demo`: the whole pipeline on the embedded tiny world, on the CPU (about 15 s on a 2-core machine).

Each step is the same library call its command makes: a tiny random-weight Wan2.1 folder in the real
original layout, synthetic talking clips, `validate-metadata --write-clean`, `plan-buckets --write`,
`train` (~20 steps with checkpoints, the loss of a fixed evaluation batch measured before and after), the
lip-focused stage 2 (`train --init_from` stage 1's last checkpoint with `--lip_loss_weight`, on the mouth tracks
`make-demo-data` writes), `convert-zero` of stage 2's last checkpoint, `sample`.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import decord
import numpy as np
from PIL import Image
from rich.console import Console
from safetensors.torch import load_file

from fantasytalk_cli.config import FtalkConfig, load_config
from fantasytalk_cli.convert.zero import ConvertOptions, convert_checkpoint
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.plan import plan_from_metadata
from fantasytalk_cli.data.synthetic import make_demo_dataset
from fantasytalk_cli.data.validate import ValidateOptions, validate_metadata
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.models.tiny import make_tiny_model
from fantasytalk_cli.sample.denoise import Guidance
from fantasytalk_cli.sample.inputs import SampleRequest
from fantasytalk_cli.sample.run import SampleOptions, sample_videos
from fantasytalk_cli.train.evaluate import fixed_batch_loss
from fantasytalk_cli.train.loop import run_training

DEMO_FLAGS: dict[str, Any] = {
    "video_sample_size": 48,
    "video_sample_n_frames": 9,
    "train_batch_size": 1,
    "max_train_steps": 20,
    "checkpointing_steps": 10,
    "learning_rate": 1e-3,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 2,
    "mixed_precision": "no",
    "uniform_sampling": True,
    "report_to": "tensorboard",
}
"""The demo's run: the seed's recipe shrunk to the tiny world (fp32, because CPUs lack fast bf16)."""

STAGE2_FLAGS: dict[str, Any] = {
    "max_train_steps": 10,
    "checkpointing_steps": 10,
    "learning_rate": 5e-4,
    "lip_loss_weight": 2.0,
    "face_loss_weight": 0.5,
    "require_tracks": True,
}
"""The demo's stage 2 (`examples/two_stage/` at the tiny world's scale): from stage 1's weights, the mouth cells
weighing 1 + 0.5 + 2 and the rest of the face 1.5."""


class DemoError(FtalkUsageError):
    """A demo step failed; the message names it."""


MARKER = ".ftalk-demo-folder"
"""Written into the work folder the demo creates: the only kind of folder `--overwrite` may replace."""


@dataclass
class DemoResult:
    """What the demo did and how long each step took."""

    work_dir: Path
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    loss_stage2: float = float("nan")
    checkpoint: Path | None = None
    stage2: Path | None = None
    adapter: Path | None = None
    sample: Path | None = None
    strip: Path | None = None
    adapter_effect: float = float("nan")
    """Mean absolute difference (grey levels) between the trained adapter's frames and the fresh adapter's."""

    def run(self, name: str, action: Callable[[], str]) -> None:
        started = time.perf_counter()
        detail = action()
        self.steps.append((name, time.perf_counter() - started, detail))

    @property
    def seconds(self) -> float:
        return sum(s for _, s, _ in self.steps)

    def report(self) -> list[str]:
        """What happened, where everything is, and what to try next: one line per fact, paths whole."""
        w = self.work_dir
        return [
            f"demo finished in {self.seconds:.0f} s; everything is in {w}",
            f"loss on a fixed evaluation batch (same clips, noise, timesteps): {self.loss_before:.4f} before "
            f"training -> {self.loss_after:.4f} after stage 1 -> {self.loss_stage2:.4f} after stage 2",
            f"checkpoint:         {self.checkpoint}",
            f"stage 2 checkpoint: {self.stage2}",
            f"converted adapter:  {self.adapter}",
            f"sample video:       {self.sample}",
            f"its frames:         {self.strip}",
            f"trained vs fresh adapter: frames differ by {self.adapter_effect:.1f} grey levels on average",
            f"training log:       tensorboard --logdir {w / 'run' / 'logs'}",
            "sample again, with your own portrait and speech:",
            f"  ftalk sample --pretrained_model_name_or_path {w / 'model'} --adapter {self.adapter} "
            f"--image {w / 'inputs' / 'face.png'} --audio {w / 'inputs' / 'speech.wav'} --out my_sample.mp4",
            "next, on your own clips (README, Training recipes):",
            "  ftalk validate-metadata datasets/internal_datasets/metadata_control.json "
            "--write-clean datasets/internal_datasets/metadata_clean.json",
            "  ftalk plan-buckets datasets/internal_datasets/metadata_clean.json --gpu_memory 80",
            "  accelerate launch -m fantasytalk_cli train --pretrained_model_name_or_path MODEL_DIR "
            "--train_data_meta datasets/internal_datasets/metadata_clean.json --output_dir output_dir",
        ]


def prepare_work_dir(work_dir: Path, overwrite: bool) -> None:
    """Create `work_dir` for the demo. An existing folder is replaced only when an earlier demo made it
    (its marker file is there) and `overwrite` is given; any other non-empty folder is refused untouched."""
    if work_dir.exists() and (not work_dir.is_dir() or any(work_dir.iterdir())):
        if not (work_dir / MARKER).is_file():
            raise DemoError(
                f"{work_dir} exists and was not made by `ftalk demo`: nothing was changed. Pick a new or empty "
                "folder with --work-dir"
            )
        if not overwrite:
            raise DemoError(
                f"{work_dir} holds an earlier demo: pass --overwrite to replace it, or pick another --work-dir"
            )
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / MARKER).write_text("made by `ftalk demo`; `ftalk demo --overwrite` may replace this folder\n")


def demo_config(work_dir: Path, **overrides: Any) -> FtalkConfig:
    """The run config of the demo inside `work_dir`."""
    flags = {
        **DEMO_FLAGS,
        "train_data_dir": work_dir / "data",
        "train_data_meta": work_dir / "data" / "clean.json",
        "pretrained_model_name_or_path": work_dir / "model",
        "transformer_path": work_dir / "model" / "fantasytalking_model.ckpt",
        "output_dir": work_dir / "run",
        "bucket_plan": work_dir / "plan.json",
        **overrides,
    }
    return load_config(None, flags)


def run_demo(work_dir: Path, seed: int = 0, console: Console | None = None, *, overwrite: bool = False) -> DemoResult:
    """Run the pipeline in `work_dir` (see `prepare_work_dir` for what may be replaced)."""
    console = console or Console()
    prepare_work_dir(work_dir, overwrite)
    result = DemoResult(work_dir)
    cfg = demo_config(work_dir, seed=seed)

    def model() -> str:
        report = make_tiny_model(work_dir / "model", "original", seed=seed)
        return f"{len(report.files)} files in the original Wan2.1 layout, {work_dir / 'model'}"

    def data() -> str:
        report = make_demo_dataset(work_dir / "data", seed=seed, num_clips=12)
        return f"{len(report.clips)} clips, {report.total_seconds:.0f} s of talking video"

    def validate() -> str:
        raw = cfg.data.model_copy(update={"train_data_meta": work_dir / "data" / "metadata_control.json"})
        report = validate_metadata(raw, cfg.buckets, ValidateOptions(clean_path=cfg.data.train_data_meta, workers=1))
        if not report.ok:
            raise DemoError(f"validation found errors: {report.codes}")
        return f"clean metadata with probe facts: {cfg.data.train_data_meta}"

    def plan() -> str:
        built, _, _ = plan_from_metadata(
            data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=cfg.data.train_data_meta
        )
        assert cfg.data.bucket_plan is not None
        built.save(cfg.data.bucket_plan)
        kept = int((built.assignment(0) >= 0).sum())
        return f"{kept} of {built.num_samples} clips planned into buckets, plan file {cfg.data.bucket_plan}"

    def train() -> str:
        sections = cfg.data, cfg.buckets, cfg.model, cfg.train
        result.loss_before = fixed_batch_loss(*sections)
        summary = run_training(cfg, console)
        result.checkpoint = summary.checkpoints[-1]
        result.loss_after = fixed_batch_loss(*sections, load_file(result.checkpoint / "trainable.safetensors"))
        return f"{summary.steps} steps, checkpoints in {cfg.checkpoint.output_dir}"

    def stage2() -> str:
        assert result.checkpoint is not None
        lips = demo_config(work_dir, seed=seed, output_dir=work_dir / "run-lips", init_from=result.checkpoint,
                           **STAGE2_FLAGS)  # fmt: skip
        summary = run_training(lips, console)
        result.stage2 = summary.checkpoints[-1]
        weights = load_file(result.stage2 / "trainable.safetensors")
        result.loss_stage2 = fixed_batch_loss(cfg.data, cfg.buckets, cfg.model, cfg.train, weights)
        return (
            f"{summary.steps} steps from {result.checkpoint.name}, mouth cells weighing "
            f"{1 + lips.train.face_loss_weight + lips.train.lip_loss_weight:g}, checkpoints in {work_dir / 'run-lips'}"
        )

    def convert() -> str:
        assert result.stage2 is not None
        report = convert_checkpoint(result.stage2.parent, work_dir / "adapter", ConvertOptions())
        result.adapter = report.output / "fantasytalking_model.ckpt"
        return f"{report.kind} checkpoint -> {', '.join(report.files)} in {report.output}"

    def sample() -> str:
        assert result.adapter is not None
        face, speech = _sample_inputs(work_dir)
        request = SampleRequest(image=face, audio=speech, prompt="A man talks.", out=work_dir / "sample.mp4")
        options = SampleOptions(guidance=DEMO_GUIDANCE, strip=work_dir / "sample-strip.png", **DEMO_SAMPLE)
        quiet = lambda line: None  # noqa: E731
        (trained,) = sample_videos(cfg.model, [request], options, adapter_path=result.adapter, say=quiet)
        fresh_cfg = cfg.model.model_copy(update={"transformer_path": None})
        fresh_request = dataclasses.replace(request, out=work_dir / "inputs" / "fresh-adapter.mp4")
        (fresh,) = sample_videos(fresh_cfg, [fresh_request], dataclasses.replace(options, strip=None), say=quiet)
        result.sample, result.strip = trained.info.path, options.strip
        result.adapter_effect = float(np.abs(trained.frames.astype(float) - fresh.frames.astype(float)).mean())
        info = trained.info
        return f"{info.frames} frames at {info.fps:g} fps, {info.width}x{info.height}, with audio: {info.path}"

    result.run("make-tiny-model", model)
    result.run("make-demo-data", data)
    result.run("validate-metadata", validate)
    result.run("plan-buckets", plan)
    result.run("train", train)
    result.run("train stage 2", stage2)
    result.run("convert-zero", convert)
    result.run("sample", sample)
    return result


DEMO_SAMPLE: dict[str, Any] = {"image_size": 96, "max_num_frames": 33, "fps": 23.0, "seed": 1111}
"""The demo's sample: a 64x96 video of 33 frames (1.4 s), small enough for a CPU."""
DEMO_GUIDANCE = Guidance(num_inference_steps=10)


def _sample_inputs(work_dir: Path) -> tuple[Path, Path]:
    """The demo's portrait (frame 0 of its first clip) and that clip's speech, in ``work_dir/inputs/``."""
    clip = load_entries(work_dir / "data" / "metadata_control.json")[0]
    folder = work_dir / "inputs"
    folder.mkdir(exist_ok=True)
    frame = decord.VideoReader(str(work_dir / "data" / clip.file_path))[0].asnumpy()
    Image.fromarray(frame).save(folder / "face.png")
    shutil.copyfile(work_dir / "data" / clip.audio_path, folder / "speech.wav")
    return folder / "face.png", folder / "speech.wav"
