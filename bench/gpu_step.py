"""Benchmark of one training step of the FantasyTalking DiT at the real 14B block dims, per memory setting.

Random weights (nothing to download) built on the device: the Wan2.1-I2V-14B transformer with `--blocks` of its 40
blocks (default: 40 on a GPU with 80 GB or more, else as many as the memory allows and the figures extrapolated to
40, stated in the table), the audio adapter trainable in fp32, gradient checkpointing on, bf16 autocast. Per
sample shape (default 512x512x81 and 720x1280x81) and setting (`bf16`, `fp8` = `--base_weights_dtype fp8`,
`offload` = `--activation_offload`, `blocksN` = `--blocks_to_offload N`, joined with `+`: default `bf16`, `fp8`,
`offload`, `fp8+offload`, `blocks8`, `fp8+offload+blocks8`; `blocks1` at tiny dims), `--steps` timed steps after
one warm-up: forward, loss, backward, AdamW on the adapter. Offloaded blocks are set up as training does
(`offload_blocks` after the fp8 cast); a setting that offloads more blocks than are built is skipped.

FLOPs counted per step (the MFU numerator), with S tokens per sample, C context tokens (512 text + 257 image), W
audio window tokens per latent frame, D width, F FFN width, L blocks:
  forward = L x [2 S (8 D^2 + 2 D F) + 2 C (2 D^2) + 4 S^2 D + 4 S C D + 2 S W 2 D]
  (the block's linear layers on the tokens and on the context, self-attention QK^T and AV, cross-attention to the
  context, the audio cross-attention's keys/values) and step = 3 x forward: the forward, its recompute under
  gradient checkpointing, and the input gradients (the frozen weights get no weight gradient; the adapter's are
  negligible). MFU = step FLOPs / step time / `--peak_tflops` (default 989, an H100's dense bf16).
Peak memory: `torch.cuda.max_memory_allocated` against the plan's estimate for the same shape and options (the
encoders left out: the bench loads none). On a CPU the bench runs at `--tiny` dims (tested) to stay ready; time and
memory there are not GPU figures.

Run: ``.venv/bin/python -m bench.gpu_step`` (GPU) or ``.venv/bin/python -m bench.gpu_step --tiny`` (CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import re
import statistics
import time
from typing import Any

import torch

from fantasytalk_cli.data.buckets import latent_frames, token_count
from fantasytalk_cli.models.dims import TINY_CONFIG, WAN21_I2V_14B_CONFIG
from fantasytalk_cli.models.trainable import set_trainable
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import fp32_rule
from fantasytalk_cli.planning.fit import MemoryOptions
from fantasytalk_cli.planning.memory import AUDIO_WINDOW_TOKENS, CONTEXT_TOKENS, GB, estimate_memory
from fantasytalk_cli.planning.model_size import TransformerDims
from fantasytalk_cli.runtime.block_offload import offload_blocks
from fantasytalk_cli.runtime.memory_options import activations_on_host, store_in_fp8

SETTINGS = "bf16,fp8,offload,fp8+offload,blocks8,fp8+offload+blocks8"
TINY_SETTINGS = SETTINGS.replace("blocks8", "blocks1")
"""The default settings; the tiny DiT has 2 blocks."""
PARTS = {
    "bf16": ("base_weights_dtype", "bf16"),
    "fp8": ("base_weights_dtype", "fp8"),
    "offload": ("activation_offload", True),
}
"""Setting parts and the `MemoryOptions` field each sets (`blocksN` sets `blocks_to_offload`)."""
BLOCKS = re.compile(r"blocks(\d+)")


def parse_setting(setting: str) -> MemoryOptions:
    """`bf16` or `fp8`, `offload`, `blocksN` joined with `+`, each at most once (bf16 when neither is named)."""
    options: dict[str, Any] = {}
    for part in setting.split("+"):
        blocks = BLOCKS.fullmatch(part)
        key, value = ("blocks_to_offload", int(blocks.group(1))) if blocks else PARTS.get(part, (None, None))
        if key is None or key in options:
            raise ValueError(f"setting {setting!r}: join bf16 or fp8, offload and blocksN with '+', each at most once")
        options[key] = value
    return MemoryOptions(**options)


def step_flops(config: dict[str, Any], tokens: int, latent: int) -> float:
    """The formula of the module docstring."""
    d = TransformerDims.from_config(config)
    context, window = sum(CONTEXT_TOKENS), AUDIO_WINDOW_TOKENS
    linear = 2 * tokens * (8 * d.dim**2 + 2 * d.dim * d.ffn) + 2 * context * 2 * d.dim**2
    attention = 4 * tokens**2 * d.dim + 4 * tokens * context * d.dim + 2 * tokens * window * 2 * d.dim
    del latent  # the audio term counts windows per token already
    return 3.0 * d.layers * (linear + attention)


def build(config: dict[str, Any], device: torch.device, fp8: bool) -> FantasyTalkingTransformer:
    with torch.device(device):
        model = FantasyTalkingTransformer(**config)
    set_trainable(model, ["processor.", "proj_model."])
    keep_fp32 = fp32_rule(model, torch.bfloat16)  # as the loaders store a bf16 model: norms, modulation in fp32
    for name, param in model.named_parameters():
        if not param.requires_grad and not keep_fp32(name):
            param.data = param.data.to(torch.bfloat16)
    model.enable_gradient_checkpointing()
    if fp8:
        store_in_fp8(model, torch.bfloat16)
    return model.train()


def inputs(config: dict[str, Any], shape: tuple[int, int, int], device: torch.device) -> dict[str, torch.Tensor]:
    height, width, frames = shape
    t = latent_frames(frames)
    audio_tokens = max(8, int(frames / 23 * 50))
    bf16 = {"device": device, "dtype": torch.bfloat16}
    return {
        "hidden_states": torch.randn(1, config["in_channels"], t, height // 8, width // 8, **bf16),
        "timestep": torch.tensor([500.0], device=device),
        "encoder_hidden_states": torch.randn(1, CONTEXT_TOKENS[0], config["text_dim"], **bf16),
        "encoder_hidden_states_image": torch.randn(1, CONTEXT_TOKENS[1], config["image_dim"], **bf16),
        "audio_features": torch.randn(1, audio_tokens, config["audio_in_dim"], **bf16),
    }


def run_setting(
    config: dict[str, Any], shape: tuple[int, int, int], setting: str, steps: int, device: torch.device
) -> dict[str, float]:
    options = parse_setting(setting)
    weights, offload = options.base_weights_dtype, options.activation_offload
    model = build(config, device, weights == "fp8")
    offload_blocks(model, options.blocks_to_offload, device)  # after the fp8 cast, as training does
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = inputs(config, shape, device)
    cuda = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast, activations_on_host(offload):
            pred = model(**batch)[0]
        pred.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else float("nan")
    del model, optimizer, batch
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    estimate = estimate_memory(
        config, shape, gradient_checkpointing=True, encoders={}, vae_encode=False, runtime_overhead_bytes=0,
        base_weights_dtype=weights, activation_offload=offload, blocks_to_offload=options.blocks_to_offload,
        device="cuda",
    )  # fmt: skip
    return {"seconds": statistics.median(times), "peak": peak, "estimate": estimate.total_bytes}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dims (the default without a GPU)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks built (default: 40 if memory allows)")
    parser.add_argument("--shapes", default=None, help="HxWxF list (default 512x512x81,720x1280x81; tiny 32x32x5)")
    parser.add_argument(
        "--settings", default=None, help=f"bf16|fp8, offload, blocksN joined with + (default {SETTINGS}; tiny: blocks1)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--peak_tflops", type=float, default=989.0)
    args = parser.parse_args(argv)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    tiny = args.tiny or device.type == "cpu"
    base = dict(TINY_CONFIG if tiny else WAN21_I2V_14B_CONFIG)
    full_blocks = base["num_layers"]
    if args.blocks is None and not tiny:
        total_gb = torch.cuda.get_device_properties(device).total_memory / GB
        args.blocks = full_blocks if total_gb >= 80 else max(4, int(full_blocks * total_gb / 100))
    blocks = args.blocks or full_blocks
    config = {**base, "num_layers": blocks}
    scale = full_blocks / blocks
    shapes = args.shapes or ("32x32x5" if tiny else "512x512x81,720x1280x81")
    settings = (args.settings or (TINY_SETTINGS if tiny else SETTINGS)).split(",")
    for setting in settings:
        try:
            parse_setting(setting)  # a typo fails before the first setting runs
        except ValueError as exc:
            parser.error(str(exc))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (tiny dims: not GPU figures)"
    print(f"device: {name}; {'tiny' if tiny else '14B'} dims, {blocks} of {full_blocks} blocks"
          + (f" (time and memory of the blocks extrapolated x{scale:.2f})" if scale != 1 else ""))  # fmt: skip
    head = ("shape", "setting", "s/step", "tok/s", "MFU", "peak GB", "est GB", "peak/est")
    print(f"{head[0]:<14} {head[1]:<20} " + " ".join(f"{h:>8}" for h in head[2:]))
    for text in shapes.split(","):
        height, width, frames = (int(v) for v in text.split("x"))
        tokens = token_count(height, width, frames)
        flops = step_flops(base, tokens, latent_frames(frames))
        for setting in settings:
            if parse_setting(setting).blocks_to_offload > blocks:
                print(f"{text:<14} {setting:<20} skipped: offloads more blocks than the {blocks} built")
                continue
            out_of_memory = torch.cuda.OutOfMemoryError if device.type == "cuda" else ()
            with contextlib.suppress(*((out_of_memory,) if out_of_memory else ())):
                got = run_setting(config, (height, width, frames), setting, args.steps, device)
                seconds = got["seconds"] * scale
                mfu = flops / seconds / (args.peak_tflops * 1e12) if device.type == "cuda" else math.nan
                peak = got["peak"] / GB
                est = got["estimate"] / GB
                print(f"{text:<14} {setting:<20} {seconds:8.3f} {tokens / seconds:10.0f} {mfu:6.1%} {peak:8.2f} "
                      f"{est:8.2f} {peak / est if peak == peak else math.nan:8.2f}")  # fmt: skip
                continue
            print(f"{text:<14} {setting:<20} out of memory")
    print("MFU: step FLOPs (3 x forward, see the module docstring) / time / peak; est: the plan's estimate without "
          "encoders; on a CPU the figures only show the bench runs")  # fmt: skip


if __name__ == "__main__":
    main()
