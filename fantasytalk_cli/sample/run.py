"""`ftalk sample`: check every input, then load each model only while it is needed (umT5 for the prompts, then
CLIP, the VAE encoder side and wav2vec2 for the images and audio, then the transformer for all videos, then the VAE
to decode), so the 14B weights load once for a whole batch and the encoders never sit beside them.

Training's memory options that mean something without a backward pass apply to the transformer the same way:
`--base_weights_dtype fp8` (`store_in_fp8` on the meta model, so the block linears stream straight into float8)
and `--blocks_to_offload N` (`offload_blocks`; nothing trains, so all of an offloaded block's weights live in host
memory; the transformer then loads on the host and only what stays resident moves to the device).
`--activation_offload` keeps what a backward pass needs: sampling has none, so it is accepted (a training run's
config serves sampling unchanged) and said to do nothing.

`generate` is the part shared with validation during training: conditions, denoising and decoding on models the
caller already holds.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fantasytalk_cli.checkpoints.sources import open_checkpoint
from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.fileio import format_size
from fantasytalk_cli.locks import beside, hold
from fantasytalk_cli.models.audio import Wav2Vec2Features
from fantasytalk_cli.models.dit_config import adapter_dims, find_wav2vec
from fantasytalk_cli.models.dit_loading import load_transformer, meta_transformer
from fantasytalk_cli.models.encoders import ImageEncoder, TextEncoder, VaeEncoder
from fantasytalk_cli.models.frozen_loading import load_image_encoder, load_text_encoder, load_tokenizer, load_vae
from fantasytalk_cli.models.layout import ModelLoadError
from fantasytalk_cli.models.lora import add_lora, inject_lora, set_lora_scale
from fantasytalk_cli.runtime.block_offload import check_block_count, offload_blocks, place_resident
from fantasytalk_cli.runtime.dtypes import DTYPES
from fantasytalk_cli.runtime.memory_options import store_in_fp8
from fantasytalk_cli.sample.adapter_source import (
    AdapterSource,
    AdapterSourceError,
    check_adapter,
    load_adapter,
    resolve_adapter,
)
from fantasytalk_cli.sample.conditions import audio_condition, encode_prompts, image_conditions, to_uint8_frames
from fantasytalk_cli.sample.denoise import NEGATIVE_PROMPT, Conditions, Guidance, denoise, steps_count
from fantasytalk_cli.sample.inputs import CheckedRequest, SampleRequest, check_requests, load_image
from fantasytalk_cli.sample.video_io import Mp4Info, frame_strip, write_mp4


@dataclass(frozen=True)
class SampleOptions:
    """Upstream inference's settings (`docs/inference.md#flag-defaults`) and ftalk's additions."""

    guidance: Guidance = field(default_factory=Guidance)
    image_size: int = 512
    max_num_frames: int = 81
    fps: float = 23.0
    seed: int = 1111
    negative_prompt: str = NEGATIVE_PROMPT
    overwrite: bool = False
    strip: Path | None = None
    """Also write a still-frame strip (PNG) of the first video here."""
    lora_scale: float = 1.0
    """Weight of the adapter's LoRA on the DiT (1 = as trained, 0 = the base DiT)."""


@dataclass(frozen=True)
class SampleResult:
    """One written video."""

    request: CheckedRequest
    info: Mp4Info
    frames: np.ndarray


Progress = Callable[[str, int], Callable[[int], None]]
"""``progress(label, total) -> advance(step)``: a progress bar per video (total = transformer passes)."""


def _no_progress(label: str, total: int) -> Callable[[int], None]:  # noqa: ARG001
    return lambda step: None


def _free(*models: object) -> None:
    del models
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sample_device() -> torch.device:
    """The first CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _audio_dims(model: ModelConfig, adapter: AdapterSource) -> dict[str, int]:
    wav2vec = find_wav2vec(model)
    if adapter.kind == "file":
        return adapter_dims(wav2vec, adapter.path)
    dims = adapter_dims(wav2vec, adapter.frozen_adapter)  # a LoRA-only run's adapter is its --transformer_path
    if adapter.kind == "checkpoint":
        assert adapter.path is not None
        checkpoint = open_checkpoint(adapter.path)
        try:
            proj = checkpoint.trainable.get("proj_model.proj.weight")
        finally:
            checkpoint.close()
        if proj is not None:
            dims["audio_proj_dim"] = int(proj[0])
    return dims


def prepare(
    model: ModelConfig, requests: Sequence[SampleRequest], options: SampleOptions, adapter_path: Path | None
) -> tuple[list[CheckedRequest], AdapterSource, dict[str, int], list[str]]:
    """Everything checked before any model loads: the inputs, the base model folder and the adapter's names and
    shapes against the transformer built on the meta device. Returns (requests, adapter, audio dims, notes)."""
    checked = check_requests(
        list(requests),
        image_size=options.image_size,
        fps=options.fps,
        max_num_frames=options.max_num_frames,
        overwrite=options.overwrite,
    )
    if model.pretrained_model_name_or_path is None:
        raise ModelLoadError("--pretrained_model_name_or_path is required: the Wan2.1-I2V base model folder")
    adapter = resolve_adapter(adapter_path if adapter_path is not None else model.transformer_path)
    dims = _audio_dims(model, adapter)
    meta = meta_transformer(model.pretrained_model_name_or_path, wan_yaml=load_wan_yaml(model.config_path), **dims)
    check_block_count(model.blocks_to_offload, len(meta.blocks))
    if adapter.lora is None and options.lora_scale != 1.0:
        raise AdapterSourceError(
            f"--lora_scale {options.lora_scale:g}: {adapter.describe()} holds no LoRA on the DiT; give --adapter a "
            "checkpoint, run or convert-zero folder of a run trained with --lora_rank, or drop --lora_scale"
        )
    if adapter.lora is not None:
        inject_lora(meta, adapter.lora)
    notes = [check_adapter(adapter, meta), *adapter.lora_notes] + [note for req in checked for note in req.notes]
    if adapter.lora is not None:
        notes.append(f"{adapter.lora.describe()}, applied at --lora_scale {options.lora_scale:g}")
    if model.activation_offload:
        notes.append(
            "--activation_offload does nothing here: it keeps what the backward pass of training needs in host "
            "memory, and sampling has no backward pass"
        )
    return checked, adapter, dims, notes


def sample_videos(
    model: ModelConfig,
    requests: Sequence[SampleRequest],
    options: SampleOptions,
    *,
    adapter_path: Path | None = None,
    mixed_precision: str = "bf16",
    progress: Progress = _no_progress,
    say: Callable[[str], None] = print,
) -> list[SampleResult]:
    """Check, then generate every request in turn (see the module docstring); each mp4 is written atomically."""
    checked, adapter, dims, notes = prepare(model, requests, options, adapter_path)
    for note in notes:
        say(note)
    with contextlib.ExitStack() as held:  # one writer per output video, for the whole batch
        fix = "wait for the other `ftalk sample` writing it, or pick another --out"
        for out in sorted({Path(c.request.out).absolute() for c in checked}):
            out.parent.mkdir(parents=True, exist_ok=True)
            held.enter_context(hold(beside(out), f"the output {out}", fix))
        return _generate(model, checked, adapter, dims, options, mixed_precision, progress, say)


def _generate(
    model: ModelConfig,
    checked: Sequence[CheckedRequest],
    adapter: AdapterSource,
    dims: dict[str, int],
    options: SampleOptions,
    mixed_precision: str,
    progress: Progress,
    say: Callable[[str], None],
) -> list[SampleResult]:
    """`sample_videos` once every output's lock is held."""
    base = model.pretrained_model_name_or_path
    assert base is not None
    device = sample_device()
    dtype = DTYPES[mixed_precision] if device.type == "cuda" else torch.float32
    wan_yaml = load_wan_yaml(model.config_path)

    say(f"encoding {len(checked)} prompt(s) with umT5")
    text = TextEncoder(
        load_text_encoder(base, dtype=dtype, wan_yaml=wan_yaml, device=device),
        load_tokenizer(base, wan_yaml=wan_yaml),
        wan_yaml.text_encoder_kwargs.text_length,
    )
    prompts = encode_prompts(text, [req.request.prompt for req in checked] + [options.negative_prompt], device)
    _free(text)
    text = None  # type: ignore[assignment]

    say("encoding the images (CLIP, VAE) and the audio (wav2vec2)")
    vae = VaeEncoder(load_vae(base, dtype=torch.float32, wan_yaml=wan_yaml, device=device))
    clip = ImageEncoder(load_image_encoder(base, dtype=dtype, wan_yaml=wan_yaml, device=device))
    wav2vec = Wav2Vec2Features.from_pretrained(find_wav2vec(model), device=device)
    conditions = [
        request_conditions(vae, clip, wav2vec, req, prompts[i], prompts[-1], options, device)
        for i, req in enumerate(checked)
    ]
    _free(clip, wav2vec)
    clip = wav2vec = None  # type: ignore[assignment]

    say(f"loading the transformer; {steps_count(options.guidance)} passes per video")
    transformer = load_transformer(
        base,
        dtype=dtype,
        wan_yaml=wan_yaml,
        device="cpu" if model.blocks_to_offload else device,  # offloaded weights never visit the device whole
        on_meta=functools.partial(frozen_in_fp8, dtype=dtype) if model.base_weights_dtype == "fp8" else None,
        **dims,
    )
    if adapter.lora is not None:  # the LoRA's layers, then its trained weights with the adapter's
        add_lora(transformer, adapter.lora, seed=0)
    say(load_adapter(adapter, transformer))
    if adapter.lora is not None:
        set_lora_scale(transformer, options.lora_scale)
    for line in apply_memory_options(transformer, model, device):
        say(line)
    latents = [
        generate_latents(
            transformer,
            cond,
            options,
            dtype=dtype,
            advance=progress(req.request.out.name, steps_count(options.guidance)),
        )
        for req, cond in zip(checked, conditions, strict=True)
    ]
    _free(transformer)
    transformer = None  # type: ignore[assignment]

    vae.vae.enable_tiling()
    say(f"decoding {len(latents)} video(s) with the VAE, in tiles")
    results = []
    for req, video in zip(checked, latents, strict=True):
        frames = to_uint8_frames(vae.decode(video.to(device)))
        info = write_mp4(frames, options.fps, req.request.out, audio_path=req.request.audio)
        results.append(SampleResult(req, info, frames))
    if options.strip is not None and results:
        frame_strip(results[0].frames, options.strip)
    return results


def frozen_in_fp8(meta: torch.nn.Module, *, dtype: torch.dtype) -> None:
    """`load_transformer`'s ``on_meta`` for `--base_weights_dtype fp8`: nothing trains, the block linears are stored
    in float8 and computed in ``dtype`` (`store_in_fp8`), so they are read straight into float8."""
    meta.requires_grad_(False)
    store_in_fp8(meta, dtype)


def apply_memory_options(transformer: torch.nn.Module, model: ModelConfig, device: torch.device) -> list[str]:
    """Say what fp8 storage did, and offload the last `--blocks_to_offload` blocks of a transformer loaded on the host
    (after the fp8 cast, as in training), the resident rest moved to ``device``. Returns the lines to say."""
    done = []
    if model.base_weights_dtype == "fp8":
        stored = sum(p.numel() * p.element_size() for p in transformer.parameters())
        done.append(f"model: the transformer's block weights stored in float8_e4m3fn: {format_size(stored)} in all")
    if model.blocks_to_offload:
        transformer.requires_grad_(False)  # nothing trains: every weight of an offloaded block waits on the host
        offload = offload_blocks(transformer, model.blocks_to_offload, device)
        place_resident(transformer, offload, device)
        done.append(f"model: the weights of the last {model.blocks_to_offload} blocks live in host memory")
    return done


def request_conditions(
    vae: VaeEncoder,
    clip: ImageEncoder,
    wav2vec: Wav2Vec2Features,
    req: CheckedRequest,
    text: torch.Tensor,
    negative: torch.Tensor,
    options: SampleOptions,
    device: torch.device,
) -> Conditions:
    """One checked request's conditions: its image (CLIP, and the I2V condition through the VAE) and audio encoded,
    with its prompt's and the negative prompt's embeddings (encoded beforehand, all prompts at once)."""
    image = load_image(req.request.image, req.video_wh, image_size=options.image_size)
    clip_embedding, y = image_conditions(vae, clip, image, req.num_frames, device)
    audio = audio_condition(wav2vec, req.request.audio, req.num_frames, options.fps, device)
    return Conditions(text=text, negative_text=negative, image=clip_embedding, y=y, audio=audio)


@torch.no_grad()
def generate_latents(
    transformer: torch.nn.Module,
    cond: Conditions,
    options: SampleOptions,
    *,
    dtype: torch.dtype,
    advance: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Denoised latents of one video, from noise seeded by ``options.seed`` (a generator of its own: the global
    RNG streams are not touched)."""
    device = cond.y.device
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    passes = 0

    def predict(hidden: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, audio_scale: float) -> torch.Tensor:
        nonlocal passes
        with autocast:
            out = transformer(hidden, timestep, text, cond.image.to(dtype), cond.audio.to(dtype), audio_scale)[0]
        passes += 1
        if advance is not None:
            advance(passes)
        return out

    generator = torch.Generator().manual_seed(options.seed)
    return denoise(predict, cond, options.guidance, generator=generator, dtype=dtype).cpu()
