"""`ftalk sample` on the tiny world: the mp4's frames, fps, size and audio; the same seed gives the same frames;
the adapter has an effect; a training checkpoint loads as the adapter; bad input fails before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.config.flags import expand_multi_value_flags
from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.sample import run as sample_run
from fantasytalk_cli.sample.denoise import Guidance
from fantasytalk_cli.sample.inputs import SampleRequest
from fantasytalk_cli.sample.run import SampleOptions, sample_videos
from fantasytalk_cli.sample.video_io import read_mp4
from tests.tiny_world import world_argv

TINY = {"image_size": 64, "max_num_frames": 9, "fps": 23.0}
FAST = Guidance(num_inference_steps=2)


def _model(world: dict[str, Path], adapter: bool = True) -> ModelConfig:
    return ModelConfig(
        pretrained_model_name_or_path=world["model"],
        transformer_path=world["model"] / "fantasytalking_model.ckpt" if adapter else None,
    )


def _sample(world: dict[str, Path], sample_inputs: dict[str, Path], out: Path, **kwargs: object) -> np.ndarray:
    request = SampleRequest(image=sample_inputs["image"], audio=sample_inputs["audio"], prompt="A man talks.", out=out)
    options = SampleOptions(guidance=FAST, **TINY)  # type: ignore[arg-type]
    adapter = kwargs.pop("adapter_path", None)
    model = kwargs.pop("model", None) or _model(world)
    (result,) = sample_videos(model, [request], options, adapter_path=adapter, say=lambda _: None)  # type: ignore[arg-type]
    return result.frames


def test_cli_writes_the_expected_mp4(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path
) -> None:
    out, strip = tmp_path / "talk.mp4", tmp_path / "strip.png"
    argv = [
        "sample", "--pretrained_model_name_or_path", str(tiny_world["model"]),
        "--transformer_path", str(tiny_world["model"] / "fantasytalking_model.ckpt"),
        "--image", str(sample_inputs["image"]), "--audio", str(sample_inputs["audio"]), "--out", str(out),
        "--image_size", "64", "--max_num_frames", "9", "--num_inference_steps", "2", "--strip", str(strip),
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    frames, info = read_mp4(out)
    # 4.25 s of audio at 23 fps asks for 101 frames: capped at 9; 96x160 scaled to a longer side of 64 -> 38x64,
    # rounded up to multiples of 16 -> 48x64
    assert (info.frames, info.fps, info.width, info.height) == (9, 23.0, 48, 64) and frames.shape == (9, 64, 48, 3)
    assert info.audio_seconds is not None and abs(info.audio_seconds - 9 / 23) <= 1 / 23
    assert f"wrote {out}" in result.output and Image.open(strip).size[1] == 128


def test_same_seed_same_frames_and_the_adapter_acts(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path
) -> None:
    first = _sample(tiny_world, sample_inputs, tmp_path / "a.mp4")
    again = _sample(tiny_world, sample_inputs, tmp_path / "b.mp4")
    fresh = _sample(tiny_world, sample_inputs, tmp_path / "c.mp4", model=_model(tiny_world, adapter=False))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, fresh)


def test_training_checkpoint_is_an_adapter_source(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    argv = expand_multi_value_flags(["train", *world_argv(tiny_world, run, max_train_steps=1, checkpointing_steps=1)])
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    from_run = _sample(tiny_world, sample_inputs, tmp_path / "run.mp4", adapter_path=run)  # the run folder: its newest
    from_ckpt = _sample(tiny_world, sample_inputs, tmp_path / "ckpt.mp4", adapter_path=run / "checkpoint-1")
    ckpt = run / "checkpoint-1"
    from_file = _sample(tiny_world, sample_inputs, tmp_path / "f.mp4", adapter_path=ckpt / "trainable.safetensors")
    released = _sample(tiny_world, sample_inputs, tmp_path / "r.mp4", adapter_path=ckpt / "fantasytalking_model.ckpt")
    assert np.array_equal(from_run, from_ckpt) and np.array_equal(from_ckpt, from_file)
    # the released-form copy is stored in bf16: close, not equal
    assert np.abs(released.astype(int) - from_ckpt.astype(int)).mean() < 2


def _no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the inputs were checked")

    for name in ("load_text_encoder", "load_vae", "load_image_encoder", "load_transformer"):
        monkeypatch.setattr(sample_run, name, refuse)


def test_bad_inputs_fail_before_any_model_loads(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_models(monkeypatch)
    short = tmp_path / "short.wav"
    import soundfile

    soundfile.write(short, np.zeros(800, dtype=np.float32), 16000)  # 0.05 s: less than one latent frame
    requests = [
        SampleRequest(image=tmp_path / "missing.png", audio=sample_inputs["audio"], prompt="p", out=tmp_path / "1.mp4"),
        SampleRequest(image=sample_inputs["image"], audio=short, prompt="p", out=tmp_path / "2.mp4"),
    ]
    with pytest.raises(Exception) as caught:
        sample_videos(_model(tiny_world), requests, SampleOptions(guidance=FAST, **TINY), say=lambda _: None)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "missing.png" in message and "short.wav" in message


def test_adapter_of_the_wrong_shape_is_named_before_loading(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_models(monkeypatch)
    bad = tmp_path / "bad_adapter.safetensors"
    save_file({"proj_model.proj.weight": torch.zeros(7, 5), "proj_model.norm.weight": torch.zeros(7)}, bad)
    result = CliRunner().invoke(
        app,
        ["sample", "--pretrained_model_name_or_path", str(tiny_world["model"]), "--adapter", str(bad),
         "--image", str(sample_inputs["image"]), "--audio", str(sample_inputs["audio"]),
         "--out", str(tmp_path / "x.mp4")],
    )  # fmt: skip
    assert result.exit_code != 0
    assert "bad_adapter.safetensors" in result.output and "proj_model" in result.output
    assert not (tmp_path / "x.mp4").exists()


def test_batch_file_makes_every_video(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--batch` (JSONL, paths relative to it): one video per line, the transformer loaded once."""
    loads = []
    real = sample_run.load_transformer
    monkeypatch.setattr(sample_run, "load_transformer", lambda *a, **k: loads.append(1) or real(*a, **k))
    batch = tmp_path / "batch.jsonl"
    lines = [
        {"image": str(sample_inputs["image"]), "audio": str(sample_inputs["audio"]), "out": "one.mp4"},
        {"image": str(sample_inputs["image"]), "audio": str(sample_inputs["audio"]), "out": "two.mp4", "prompt": "x"},
    ]
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = CliRunner().invoke(
        app,
        ["sample", "--pretrained_model_name_or_path", str(tiny_world["model"]), "--batch", str(batch),
         "--image_size", "64", "--max_num_frames", "5", "--num_inference_steps", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert loads == [1]
    for name in ("one.mp4", "two.mp4"):
        assert read_mp4(tmp_path / name)[1].frames == 5
