"""Validation during training: sample the validation pairs with the live weights every `validation_steps` and at
the end, into ``output_dir/samples/step-N/`` and TensorBoard.

Every rank takes part in gathering the trainable weights where ZeRO-3 or FSDP shard them; only the main rank
samples, on a copy of the base transformer it loads once (on the CPU between validations) with the gathered
adapter in it. Unsharded strategies (DDP, ZeRO-2) sample the live module itself. Sampling draws from generators
of its own inside `torch.random.fork_rng`, in ``no_grad``, and never touches a parameter, so a run with
validation ends on the same weights, bit for bit, as one without (tests/test_train_distributed.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fantasytalk_cli.config.schema import ModelConfig, TrainConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.lora import add_lora, lora_of
from fantasytalk_cli.sample.conditions import encode_prompts, to_uint8_frames
from fantasytalk_cli.sample.denoise import NEGATIVE_PROMPT, Guidance
from fantasytalk_cli.sample.inputs import CheckedRequest, SampleRequest, check_requests
from fantasytalk_cli.sample.run import SampleOptions, generate_latents, request_conditions
from fantasytalk_cli.sample.video_io import write_mp4
from fantasytalk_cli.train.distributed import gather_trainable_state

if TYPE_CHECKING:
    from fantasytalk_cli.train.setup import Run

DEFAULT_PROMPT = "A person is talking."
SAMPLES_DIR = "samples"


@dataclass
class Validation:
    """The checked validation pairs and how to sample them; the main rank's sampling copy, once loaded."""

    requests: list[CheckedRequest]
    options: SampleOptions
    copy: torch.nn.Module | None = field(default=None, repr=False)


def check_validation(train: TrainConfig, output_dir: Path) -> Validation | None:
    """The validation pairs checked before anything slow (`SampleInputError` lists every problem), or None."""
    if not train.validation_image_paths:
        return None
    prompts = train.validation_prompts or [DEFAULT_PROMPT]
    if len(prompts) == 1:
        prompts = prompts * len(train.validation_image_paths)
    pairs = zip(train.validation_image_paths, train.validation_audio_paths, prompts, strict=True)
    requests = [
        SampleRequest(image=image, audio=audio, prompt=prompt, out=output_dir / SAMPLES_DIR / f"{i:02d}.mp4")
        for i, (image, audio, prompt) in enumerate(pairs)
    ]
    options = SampleOptions(
        guidance=Guidance(num_inference_steps=train.validation_num_inference_steps),
        image_size=train.validation_image_size,
        max_num_frames=train.validation_max_num_frames,
        negative_prompt=NEGATIVE_PROMPT,
    )
    checked = check_requests(
        requests,
        image_size=options.image_size,
        fps=options.fps,
        max_num_frames=options.max_num_frames,
        overwrite=True,  # the run's own samples folder: a resumed run may sample a step again
    )
    return Validation(checked, options)


def due(run: Run, step: int) -> bool:
    """Whether to validate after optimizer step ``step``: every `validation_steps`, and at the last step."""
    every = run.train.validation_steps
    return run.validation is not None and (step >= run.max_steps or (every is not None and step % every == 0))


def validate(run: Run, validation: Validation, step: int) -> list[Path]:
    """Sample every validation pair with the weights of ``step`` (collective: every rank calls it)."""
    sharded = run.strategy.shards_weights
    state = gather_trainable_state(run.accelerator, run.transformer, run.strategy) if sharded else None
    written: list[Path] = []
    if run.main:
        model = _sampling_model(run, validation, state)
        devices = [run.accelerator.device] if run.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            written = _sample_all(run, validation, model, step)
        if sharded:
            model.to("cpu")
        run.say(f"validation: step {step}, {len(written)} video(s) in {written[0].parent}")
    run.accelerator.wait_for_everyone()
    return written


def _sampling_model(run: Run, validation: Validation, state: dict[str, torch.Tensor] | None) -> torch.nn.Module:
    """The live module (unsharded strategies), else the main rank's copy of the base with the gathered adapter
    (and LoRA)."""
    if state is None:
        return run.accelerator.unwrap_model(run.transformer)
    if validation.copy is None:
        validation.copy = _base_copy(run.model, run)
    params = dict(validation.copy.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            target = params[_clean(name)]
            target.copy_(tensor.to(target.dtype))
    return validation.copy.to(run.accelerator.device)


def _clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "")
    return name


def _base_copy(model_cfg: ModelConfig, run: Run) -> torch.nn.Module:
    """The base transformer once more, on the CPU, in the dtype training keeps the frozen weights in."""
    assert model_cfg.pretrained_model_name_or_path is not None
    config = run.models.transformer.config
    copy = load_transformer(
        model_cfg.pretrained_model_name_or_path,
        dtype=run.models.frozen_dtype,
        wan_yaml=load_wan_yaml(model_cfg.config_path),
        audio_in_dim=int(config.audio_in_dim),
        audio_proj_dim=int(config.audio_proj_dim),
        adapter_dtype=torch.float32,
    )
    lora = lora_of(model_cfg)
    if lora is not None:  # the same LoRA layers; their weights come with the gathered trainable state
        add_lora(copy, lora, seed=0)
    return copy


def _sample_all(run: Run, validation: Validation, model: torch.nn.Module, step: int) -> list[Path]:
    device, options = run.accelerator.device, validation.options
    folder = run.checkpoint.output_dir / SAMPLES_DIR / f"step-{step}"
    encoders = run.models.encoders
    with encoders.on(device):
        prompts = [req.request.prompt for req in validation.requests] + [options.negative_prompt]
        texts = encode_prompts(encoders.text, prompts, device)
        conditions = [
            request_conditions(
                encoders.vae, encoders.image, run.models.wav2vec, req, texts[i], texts[-1], options, device
            )
            for i, req in enumerate(validation.requests)
        ]
    latents = [generate_latents(model, cond, options, dtype=run.ctx.dtype) for cond in conditions]
    written = []
    with encoders.on(device):
        for i, (req, video) in enumerate(zip(validation.requests, latents, strict=True)):
            frames = to_uint8_frames(encoders.vae.decode(video.to(device)))
            out = folder / f"{i:02d}-{req.request.image.stem}.mp4"
            write_mp4(frames, options.fps, out, audio_path=req.request.audio)
            _log_video(run, f"validation/{i:02d}", frames, options.fps, step)
            written.append(out)
    return written


def _log_video(run: Run, tag: str, frames: np.ndarray, fps: float, step: int) -> None:
    """TensorBoard: the video where tensorboard can encode one (it needs moviepy), else a strip of frames."""
    if run.train.report_to != "tensorboard":
        return
    writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
    if importlib.util.find_spec("moviepy") is not None:
        video = torch.from_numpy(frames).permute(0, 3, 1, 2).unsqueeze(0)  # [1, F, 3, H, W] uint8
        writer.add_video(tag, video, global_step=step, fps=round(fps))
        return
    picks = np.linspace(0, len(frames) - 1, num=min(8, len(frames))).round().astype(int)
    writer.add_image(f"{tag}/frames", np.concatenate(list(frames[picks]), axis=1), step, dataformats="HWC")
