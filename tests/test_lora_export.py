"""A LoRA run's files where users load them: convert-zero's diffusers-layout LoRA loads through diffusers' own
loader into a plain `WanTransformer3DModel` and reproduces ftalk's LoRA'd model; the merged transformer reproduces
it too; the ComfyUI and kohya files are written beside the adapter; `ftalk sample --adapter` applies the LoRA of a
checkpoint or a convert folder, and `--lora_scale 0` is the adapter alone, bitwise."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import WanPipeline, WanTransformer3DModel
from rich.console import Console
from safetensors import safe_open

from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.convert.zero import ConvertOptions, convert_checkpoint
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.lora import add_lora, lora_layers
from fantasytalk_cli.models.tiny import TINY_AUDIO_DIMS
from fantasytalk_cli.models.trainable import is_adapter_name
from fantasytalk_cli.sample.adapter_source import AdapterSourceError, load_adapter, resolve_adapter
from fantasytalk_cli.sample.denoise import Guidance
from fantasytalk_cli.sample.inputs import SampleRequest
from fantasytalk_cli.sample.run import SampleOptions, sample_videos
from fantasytalk_cli.train.loop import run_training
from tests.test_lora_formats import load_warnings
from tests.tiny_world import world_config

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (kept for the session)


@pytest.fixture(scope="module")
def run(tiny_world: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step run training the adapter and a rank-4 LoRA (alpha 8: scale 2, so a lost alpha shows)."""
    folder = tmp_path_factory.mktemp("lora_run") / "run"
    cfg = world_config(
        tiny_world, folder, max_train_steps=3, checkpointing_steps=3, learning_rate=3e-2, lora_rank=4, lora_alpha=8.0
    )
    run_training(cfg, QUIET)
    return folder


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "hidden_states": torch.randn(1, 36, 2, 4, 4, generator=g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 4, 32, generator=g),
    }


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _lora_model(world: dict, adapter: Path) -> torch.nn.Module:
    """ftalk's LoRA'd model as `ftalk sample --adapter` builds it."""
    source = resolve_adapter(adapter)
    assert source.lora is not None and source.lora.alpha == 8.0 and source.lora.rank == 4
    model = load_transformer(world["model"], **TINY_AUDIO_DIMS)
    add_lora(model, source.lora, seed=0)
    load_adapter(source, model)
    return model.eval()


def test_the_diffusers_lora_loads_into_a_wan_transformer_and_reproduces_the_lora(
    run: Path, tiny_world: dict, tmp_path: Path
) -> None:
    report = convert_checkpoint(run, tmp_path / "out", ConvertOptions(format="diffusers", dtype="fp32"))
    assert "pytorch_lora_weights.safetensors" in report.files and "diffusion_pytorch_model.safetensors" in report.files
    assert any("LoRA rank 4, alpha 8" in n for n in report.notes)
    ours = _lora_model(tiny_world, run)
    base = load_transformer(tiny_world["model"], **TINY_AUDIO_DIMS)
    config = {k: v for k, v in base.config.items() if not k.startswith("_") and k not in TINY_AUDIO_DIMS}
    wan = WanTransformer3DModel(**config)
    wan.load_state_dict({k: v for k, v in base.state_dict().items() if not is_adapter_name(k)}, strict=True)
    state, metadata = WanPipeline.lora_state_dict(
        str(tmp_path / "out" / "pytorch_lora_weights.safetensors"), return_lora_metadata=True
    )
    with load_warnings() as messages:
        WanPipeline.load_lora_into_transformer(state, transformer=wan, metadata=metadata)
    assert not messages, messages  # no missing or unexpected LoRA key, no config at odds with the tensors
    assert sorted(lora_layers(wan)) == sorted(lora_layers(ours))
    with torch.no_grad():
        want = ours(**_inputs(), audio_scale=0.0)[0]  # audio off: the LoRA'd Wan DiT
        got = wan(**_inputs(), return_dict=False)[0]
        plain = base(**_inputs(), audio_scale=0.0)[0]
    assert _relative(got, want) < 1e-5
    assert _relative(plain, want) > 1e-3  # the LoRA matters: the comparison can fail


def test_the_merged_transformer_is_the_lora_model(run: Path, tiny_world: dict, tmp_path: Path) -> None:
    options = ConvertOptions(what="transformer", format="original", dtype="fp32")
    report = convert_checkpoint(run, tmp_path / "merged", options)
    assert any("merged into" in n for n in report.notes)
    merged = load_transformer(tmp_path / "merged", **TINY_AUDIO_DIMS).eval()
    ours = _lora_model(tiny_world, run)
    g = torch.Generator().manual_seed(5)
    audio = torch.randn(1, 10, TINY_AUDIO_DIMS["audio_in_dim"], generator=g)
    with torch.no_grad():
        want = ours(**_inputs(), audio_features=audio)[0]
        got = merged(**_inputs(), audio_features=audio)[0]
    assert _relative(got, want) < 1e-5


@pytest.mark.parametrize(
    ("fmt", "lora_file", "adapter_file", "key"),
    [
        ("comfyui", "lora_comfyui.safetensors", "fantasytalking_comfyui.safetensors", "diffusion_model.blocks.0"),
        ("kohya", "lora_kohya.safetensors", "fantasytalking_model.ckpt", "lora_unet_blocks_0_"),
        ("fantasytalking", "lora_wan.safetensors", "fantasytalking_model.ckpt", "diffusion_model.blocks.0"),
    ],
)
def test_each_format_writes_its_lora_beside_the_adapter(
    run: Path, tmp_path: Path, fmt: str, lora_file: str, adapter_file: str, key: str
) -> None:
    report = convert_checkpoint(run, tmp_path / fmt, ConvertOptions(format=fmt))  # type: ignore[arg-type]
    assert lora_file in report.files and adapter_file in report.files, report.files
    with safe_open(str(tmp_path / fmt / lora_file), framework="pt") as handle:
        keys = list(handle.keys())
        alphas = {handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    modules = 10 * 2  # ten targets in each of the two blocks
    assert len(keys) == 3 * modules and all(k.startswith(key[:16]) for k in keys) and alphas == {8.0}


TINY = {"image_size": 64, "max_num_frames": 9, "fps": 23.0}


def _sample(world: dict, inputs: dict, out: Path, adapter: Path, scale: float = 1.0) -> np.ndarray:
    request = SampleRequest(image=inputs["image"], audio=inputs["audio"], prompt="A man talks.", out=out)
    options = SampleOptions(guidance=Guidance(num_inference_steps=2), lora_scale=scale, **TINY)  # type: ignore[arg-type]
    model = ModelConfig(pretrained_model_name_or_path=world["model"])
    (result,) = sample_videos(model, [request], options, adapter_path=adapter, say=lambda _: None)
    return result.frames


@pytest.mark.slow
def test_sample_applies_the_lora_and_scale_zero_is_the_adapter_alone(
    run: Path, tiny_world: dict, sample_inputs: dict, tmp_path: Path
) -> None:
    converted = tmp_path / "converted"
    convert_checkpoint(run, converted, ConvertOptions(format="diffusers", dtype="fp32"))
    from_checkpoint = _sample(tiny_world, sample_inputs, tmp_path / "a.mp4", run)
    from_converted = _sample(tiny_world, sample_inputs, tmp_path / "b.mp4", converted)
    assert np.array_equal(from_checkpoint, from_converted)
    off = _sample(tiny_world, sample_inputs, tmp_path / "c.mp4", run, scale=0.0)
    adapter_only = _sample(
        tiny_world, sample_inputs, tmp_path / "d.mp4", converted / "diffusion_pytorch_model.safetensors"
    )
    assert np.array_equal(off, adapter_only)
    assert not np.array_equal(off, from_checkpoint)
    with pytest.raises(AdapterSourceError, match="holds no LoRA"):
        _sample(tiny_world, sample_inputs, tmp_path / "e.mp4", converted / "diffusion_pytorch_model.safetensors", 0.5)


@pytest.mark.slow
def test_sample_applies_the_lora_over_a_float8_base(
    run: Path, tiny_world: dict, sample_inputs: dict, tmp_path: Path
) -> None:
    """--base_weights_dtype fp8 in ftalk sample: the LoRA wraps the float8 linears (float32 beside them)."""
    request = SampleRequest(image=sample_inputs["image"], audio=sample_inputs["audio"], prompt="A man talks.",
                            out=tmp_path / "fp8.mp4")  # fmt: skip
    options = SampleOptions(guidance=Guidance(num_inference_steps=2), **TINY)  # type: ignore[arg-type]
    model = ModelConfig(pretrained_model_name_or_path=tiny_world["model"], base_weights_dtype="fp8")
    lines: list[str] = []
    (fp8,) = sample_videos(model, [request], options, adapter_path=run, say=lines.append)
    assert any("applied at --lora_scale 1" in line for line in lines)
    plain = _sample(tiny_world, sample_inputs, tmp_path / "plain.mp4", run)
    assert np.abs(fp8.frames.astype(int) - plain.astype(int)).mean() < 3  # float8 rounding, the LoRA applied


@pytest.mark.slow
def test_a_lora_trained_alone_merges_and_samples_with_the_frozen_adapter(
    tiny_world: dict, tmp_path: Path, sample_inputs: dict
) -> None:
    """--trainable_modules none: the run keeps the --transformer_path adapter frozen; the merged transformer and
    `ftalk sample --adapter RUN` take it from there, beside the trained LoRA."""
    run = tmp_path / "alone"
    cfg = world_config(tiny_world, run, max_train_steps=2, checkpointing_steps=2, learning_rate=3e-2,
                       trainable_modules=["none"], lora_rank=4, lora_alpha=8.0)  # fmt: skip
    run_training(cfg, QUIET)
    source = resolve_adapter(run)
    assert source.frozen_adapter == tiny_world["model"] / "fantasytalking_model.ckpt"
    convert_checkpoint(run, tmp_path / "merged", ConvertOptions(what="transformer", format="original", dtype="fp32"))
    merged = load_transformer(tmp_path / "merged", **TINY_AUDIO_DIMS).eval()
    ours = _lora_model(tiny_world, run)
    audio = torch.randn(1, 10, TINY_AUDIO_DIMS["audio_in_dim"], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = ours(**_inputs(), audio_features=audio)[0], merged(**_inputs(), audio_features=audio)[0]
        fresh = load_transformer(tiny_world["model"], **TINY_AUDIO_DIMS)(**_inputs(), audio_features=audio)[0]
    assert _relative(got, want) < 1e-5 and _relative(fresh, want) > 1e-3
    assert _sample(tiny_world, sample_inputs, tmp_path / "a.mp4", run).std() > 0
