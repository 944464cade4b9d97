"""Training's memory options in sampling, on the tiny world: `ftalk sample --base_weights_dtype fp8` stays within a
stated tolerance of the plain sample; `--blocks_to_offload N` gives bitwise the same frames, the offloaded blocks'
weights waiting in host memory between their forwards; `--activation_offload` is said to do nothing; validation
during training samples the live module with the options on. Also the offload's prefetch in the order the blocks
run: up in every forward (sampling's only kind), down in the backward's recomputes, nothing left on the device
after the backward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.models.dims import TINY_CONFIG
from fantasytalk_cli.models.trainable import set_trainable
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.runtime.block_offload import BlockOffload, offload_blocks
from fantasytalk_cli.sample import run as sample_run
from fantasytalk_cli.sample.denoise import Guidance
from fantasytalk_cli.sample.inputs import SampleRequest
from fantasytalk_cli.sample.run import SampleOptions, sample_videos
from fantasytalk_cli.train import validation
from tests.tiny_world import train_in_own_state, world_config

FP8_FRAME_TOLERANCE = 2.0
"""Largest mean |frame(fp8) - frame(plain)| allowed, in uint8 levels, over the tiny world's 9 frames x 64x48
(measured: 0.81 mean, 9 at most, on frames of std 54; on the CPU the plain sample computes in float32, the fp8 one
upcasts its float8 weights to float32 layer by layer: on a GPU both compute in bf16, not measured here)."""
PASSES = 6
"""Transformer passes of a 2-step sample: 3 per audio-guided step."""


def _sample(world: dict[str, Path], inputs: dict[str, Path], out: Path, **options: object) -> np.ndarray:
    model = ModelConfig(
        pretrained_model_name_or_path=world["model"],
        transformer_path=world["model"] / "fantasytalking_model.ckpt",
        **options,  # type: ignore[arg-type]
    )
    request = SampleRequest(image=inputs["image"], audio=inputs["audio"], prompt="A man talks.", out=out)
    sampling = SampleOptions(guidance=Guidance(num_inference_steps=2), image_size=64, max_num_frames=9)
    (result,) = sample_videos(model, [request], sampling, say=lambda _: None)
    return result.frames


@pytest.fixture(scope="module")
def plain(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> np.ndarray:
    """The sample without memory options."""
    return _sample(tiny_world, sample_inputs, tmp_path_factory.mktemp("plain") / "plain.mp4")


def test_fp8_sample_is_within_tolerance_and_offload_adds_nothing(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path, plain: np.ndarray
) -> None:
    fp8 = _sample(tiny_world, sample_inputs, tmp_path / "fp8.mp4", base_weights_dtype="fp8")
    both = _sample(tiny_world, sample_inputs, tmp_path / "both.mp4", base_weights_dtype="fp8", blocks_to_offload=1)
    error = np.abs(fp8.astype(float) - plain.astype(float)).mean()
    assert 0 < error <= FP8_FRAME_TOLERANCE, error
    assert np.array_equal(both, fp8)


def _watch(offloads: list[BlockOffload], log: list[str]) -> object:
    """`offload_blocks` that also checks, at every transformer pass and around every offloaded block's forward,
    where the offloaded weights are: their host copies, except inside the block's own forward."""

    def at_host(offload: BlockOffload, index: int) -> bool:
        entry = offload.blocks[index]
        same = [p.data_ptr() == h.data_ptr() for p, h in zip(entry.params, entry.host, strict=True)]
        return all(same) and all(h.device.type == "cpu" for h in entry.host)

    def watched(model: torch.nn.Module, count: int, device: torch.device) -> BlockOffload | None:
        offload = offload_blocks(model, count, device)
        assert offload is not None
        offloads.append(offload)
        first = len(model.blocks) - count  # type: ignore[arg-type]
        indices = range(len(offload.blocks))
        for i in indices:  # nothing trains in sampling: every weight of an offloaded block waits on the host
            assert len(offload.blocks[i].params) == len(list(model.blocks[first + i].parameters()))  # type: ignore[index]

        def pass_starts(module: object, args: object) -> None:
            log.append("pass: all at host" if all(at_host(offload, i) for i in indices) else "pass: NOT at host")

        model.register_forward_pre_hook(pass_starts)
        for i in indices:  # registered after the offload's hooks: they see the weights after it moved them
            block = model.blocks[first + i]  # type: ignore[index]
            block.register_forward_pre_hook(
                lambda m, a, i=i: log.append(f"in {i}: {'host' if at_host(offload, i) else 'brought in'}")
            )
            block.register_forward_hook(
                lambda m, a, o, i=i: log.append(f"out {i}: {'host' if at_host(offload, i) else 'still in'}")
            )
        return offload

    return watched


def test_block_offload_gives_the_same_frames_with_the_weights_on_the_host(
    tiny_world: dict[str, Path],
    sample_inputs: dict[str, Path],
    tmp_path: Path,
    plain: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both tiny blocks offloaded: at the start of every pass of the denoise both blocks' weights are their host
    copies; inside its forward each block computes with a copy brought in (on the CPU a copy too), dropped after."""
    offloads: list[BlockOffload] = []
    log: list[str] = []
    monkeypatch.setattr(sample_run, "offload_blocks", _watch(offloads, log))
    frames = _sample(tiny_world, sample_inputs, tmp_path / "offload.mp4", blocks_to_offload=2)
    assert np.array_equal(frames, plain)
    (offload,) = offloads
    one_pass = ["pass: all at host", "in 0: brought in", "out 0: host", "in 1: brought in", "out 1: host"]
    assert log == one_pass * PASSES
    assert offload.onloads == 2 * PASSES


def test_cli_takes_the_options_and_says_activation_offload_does_nothing(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path
) -> None:
    argv = [
        "sample", "--pretrained_model_name_or_path", str(tiny_world["model"]), "--out", str(tmp_path / "a.mp4"),
        "--image", str(sample_inputs["image"]), "--audio", str(sample_inputs["audio"]),
        "--image_size", "64", "--max_num_frames", "5", "--num_inference_steps", "1",
        "--base_weights_dtype", "fp8", "--blocks_to_offload", "1", "--activation_offload",
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "stored in float8_e4m3fn" in result.output
    assert "the weights of the last 1 blocks live in host memory" in result.output
    assert "--activation_offload does nothing here" in result.output and (tmp_path / "a.mp4").is_file()
    help_text = CliRunner().invoke(app, ["sample", "--help"]).output
    assert "--blocks_to_offload" in help_text and "--base_weights_dtype" in help_text


def test_too_many_offloaded_blocks_fail_before_any_model_loads(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the options were checked")

    for name in ("load_text_encoder", "load_vae", "load_image_encoder", "load_transformer"):
        monkeypatch.setattr(sample_run, name, refuse)
    argv = [
        "sample", "--pretrained_model_name_or_path", str(tiny_world["model"]), "--blocks_to_offload", "3",
        "--image", str(sample_inputs["image"]), "--audio", str(sample_inputs["audio"]),
        "--out", str(tmp_path / "a.mp4"),
    ]  # fmt: skip
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2 and "--blocks_to_offload 3: the transformer has 2 blocks" in result.output


def _train_and_validate(
    world: dict[str, Path], inputs: dict[str, Path], run: Path, monkeypatch: pytest.MonkeyPatch, **options: object
) -> np.ndarray:
    """One training step, then the validation sample of its weights (its frames, as TensorBoard would get them)."""
    frames: list[np.ndarray] = []
    monkeypatch.setattr(validation, "_log_video", lambda run, tag, video, fps, step: frames.append(video))
    cfg = world_config(
        world, run, max_train_steps=1, checkpointing_steps=1, gradient_checkpointing=True,
        validation_image_paths=[inputs["image"]], validation_audio_paths=[inputs["audio"]],
        validation_num_inference_steps=1, validation_image_size=64, validation_max_num_frames=5, **options,
    )  # fmt: skip
    train_in_own_state(cfg, Console(quiet=True))
    (video,) = frames
    assert (run / "samples" / "step-1").is_dir()
    return video


def test_validation_samples_the_live_module_with_the_options_on(
    tiny_world: dict[str, Path], sample_inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Block offload trains to the same weights, so its validation sample is bitwise the plain one's; with fp8
    weights too it samples (the hooks of both on the live module, in no_grad, after a backward's recomputes) within
    the fp8 tolerance of the plain run's (measured: 0.58 mean, 7 at most)."""
    want = _train_and_validate(tiny_world, sample_inputs, tmp_path / "plain", monkeypatch)
    got = _train_and_validate(tiny_world, sample_inputs, tmp_path / "offload", monkeypatch, blocks_to_offload=2)
    assert np.array_equal(got, want)
    fp8 = _train_and_validate(
        tiny_world, sample_inputs, tmp_path / "fp8", monkeypatch, blocks_to_offload=2, base_weights_dtype="fp8"
    )
    assert fp8.shape == want.shape and np.abs(fp8.astype(float) - want.astype(float)).mean() <= FP8_FRAME_TOLERANCE


def _hits(offload: BlockOffload, log: list[tuple[int, bool]], held: list[int]) -> None:
    """Log, per onload, the block and whether its copy was already staged (prefetched), and how many blocks' copies
    the device holds right after it (brought in or staged)."""
    real = offload._onload

    def onload(index: int) -> None:
        log.append((index, bool(offload.blocks[index].staged)))
        real(index)
        held.append(len(offload.brought_in) + sum(bool(entry.staged) for entry in offload.blocks))

    offload._onload = onload  # type: ignore[method-assign]


def _at_host(offload: BlockOffload) -> bool:
    return all(
        p.data_ptr() == h.data_ptr() for entry in offload.blocks for p, h in zip(entry.params, entry.host, strict=True)
    )


def test_prefetch_follows_the_order_the_blocks_run() -> None:
    """3 offloaded blocks of 4: a forward onloads 0, 1, 2 (1 and 2 prefetched), the backward's recomputes 2, 1, 0
    (1 and 0 prefetched); at most 2 blocks' copies are on the device at once, and none after the backward (torch's
    checkpoint stops a recompute early: the block's forward hook never runs then); no_grad forwards go up again."""
    torch.manual_seed(0)
    model = FantasyTalkingTransformer(**{**TINY_CONFIG, "num_layers": 4})
    set_trainable(model, ["processor.", "proj_model."])
    model.enable_gradient_checkpointing()
    model.train()
    offload = offload_blocks(model, 3, torch.device("cpu"))
    assert offload is not None
    log: list[tuple[int, bool]] = []
    held: list[int] = []
    _hits(offload, log, held)
    cfg = model.config
    args = (torch.randn(1, 36, 2, 4, 4), torch.tensor([500.0]), torch.randn(1, 6, cfg.text_dim),
            torch.randn(1, 5, cfg.image_dim), torch.randn(1, 20, cfg.audio_in_dim), 1.0)  # fmt: skip
    for _ in range(2):
        model(*args)[0].square().mean().backward()
        assert log == [(0, False), (1, True), (2, True), (2, False), (1, True), (0, True)]
        assert max(held) == 2 and _at_host(offload) and not offload.brought_in
        assert not any(entry.staged for entry in offload.blocks)
        log.clear()
    with torch.no_grad():
        for _ in range(2):
            model(*args)
    assert log == [(0, False), (1, True), (2, True)] * 2 and _at_host(offload)
