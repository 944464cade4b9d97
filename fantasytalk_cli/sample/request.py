"""What `ftalk sample` is asked on its command line, as requests and `SampleOptions`: --batch FILE or
--image/--audio/--out (one or the other), upstream inference's seed and negative prompt where none is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fantasytalk_cli.checkpoints.folder import named_checkpoint
from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.sample.batch_file import read_batch_file
from fantasytalk_cli.sample.denoise import NEGATIVE_PROMPT, Guidance
from fantasytalk_cli.sample.inputs import SampleRequest
from fantasytalk_cli.sample.run import Progress, SampleOptions, SampleResult, sample_videos

__all__ = ["UPSTREAM_SEED", "SampleArgs", "sample_as_asked"]

UPSTREAM_SEED = 1111
"""Upstream `infer.py`'s seed: `ftalk sample`'s default when `--seed` is not given."""


@dataclass(frozen=True, kw_only=True)
class SampleArgs:
    """The command's options as given (the defaults are the command's). Made only when the videos are named one
    way: `FtalkUsageError` (exit 2) for --batch beside any of --image/--audio/--out, or one of the three without
    the others and no --batch. `seed` is None where --seed was not given."""

    image: Path | None
    audio: Path | None
    out: Path | None
    batch: Path | None
    prompt: str
    adapter: Path | None
    image_size: int
    max_num_frames: int
    fps: float
    num_inference_steps: int
    prompt_cfg_scale: float
    audio_cfg_scale: float
    audio_cfg_end: float
    negative_prompt: str | None
    seed: int | None
    strip: Path | None
    overwrite: bool
    lora_scale: float = 1.0
    checkpoint: str | None = None
    """With a run folder as `adapter`: best, latest or checkpoint-N (`checkpoints.folder.named_checkpoint`)."""

    def __post_init__(self) -> None:
        single = (self.image, self.audio, self.out)
        if self.batch is not None and any(v is not None for v in single):
            raise FtalkUsageError("give either --batch FILE or --image/--audio/--out, not both")
        if self.batch is None and any(v is None for v in single):
            raise FtalkUsageError("give --image, --audio and --out (or --batch FILE for several videos)")

    def requests(self) -> list[SampleRequest]:
        """The batch file's requests (its rows without a prompt take --prompt), or the one of the command line."""
        if self.batch is not None:
            return read_batch_file(self.batch, default_prompt=self.prompt)
        return [SampleRequest(image=self.image, audio=self.audio, prompt=self.prompt, out=self.out)]  # type: ignore[arg-type]

    def options(self, audio_scale: float) -> SampleOptions:
        """The sampling settings, with the config's `model.audio_scale`."""
        return SampleOptions(
            guidance=Guidance(
                num_inference_steps=self.num_inference_steps,
                prompt_cfg_scale=self.prompt_cfg_scale,
                audio_cfg_scale=self.audio_cfg_scale,
                audio_scale=audio_scale,
                audio_cfg_end=self.audio_cfg_end,
            ),
            image_size=self.image_size,
            max_num_frames=self.max_num_frames,
            fps=self.fps,
            seed=UPSTREAM_SEED if self.seed is None else int(self.seed),
            negative_prompt=NEGATIVE_PROMPT if self.negative_prompt is None else self.negative_prompt,
            overwrite=self.overwrite,
            strip=self.strip,
            lora_scale=self.lora_scale,
        )


def sample_as_asked(
    args: SampleArgs, model: ModelConfig, *, mixed_precision: str, progress: Progress, say: Callable[[str], None]
) -> list[SampleResult]:
    """Read the requests (a bad batch file fails here, before any model loads) and sample them (`sample_videos`)."""
    adapter = args.adapter
    if args.checkpoint is not None:
        if adapter is None or not adapter.is_dir():
            raise FtalkUsageError("--checkpoint picks a checkpoint of a run folder: give the run with --adapter RUN")
        adapter = named_checkpoint(adapter, args.checkpoint)
        say(f"--checkpoint {args.checkpoint}: {adapter}")
    return sample_videos(
        model,
        args.requests(),
        args.options(model.audio_scale),
        adapter_path=adapter,
        mixed_precision=mixed_precision,
        progress=progress,
        say=say,
    )
