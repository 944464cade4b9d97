"""Benchmark of the LoRA on the DiT (`--lora_rank`): step time and peak RSS against the audio adapter alone.

Training the adapter alone (the baseline) against the adapter with a LoRA of each rank in `--ranks`, measured in the
same run, and the 14B memory estimate for the same settings.

Measured runs, per world: the tests' tiny world (tiny DiT, 48x48x9 samples) and the same clips with the mid-size
random-weight DiT of `bench.cache` (width 768, 8 blocks, FFN 3072, 96x96x17 samples, the tiny encoders). Each
setting is a real `run_training` of `--steps` steps in a fresh process, the one `bench.cache` starts (its
`child`: one torch thread, step clock from `bench.train_overhead.loop_run`, peak RSS from `VmHWM`), `--repeats`
times, the order rotated per repeat; the first step of each run is dropped, the rest pooled, medians shown. All
settings train with `--audio_dropout 0.1` (the LoRA's default; the adapter alone defaults to 0) so that the LoRA
is the only difference. The LoRA targets the default block linears (`DEFAULT_LORA_TARGETS`), alpha = rank. The
trainable parameters are counted from each run's final `trainable.safetensors`, which also shows that the LoRA
trained (its lora_B starts at zero).

Estimate: Wan2.1-I2V-14B + FantasyTalking at 512x512x81, DDP on one GPU, bf16, gradient checkpointing
(`estimate_memory`), per setting: the total and the terms the LoRA changes (its weights, gradients and AdamW
moments, and its activations).

Run from the repository root: ``.venv/bin/python -m bench.lora`` (a few minutes on 2 CPU cores), or
``.venv/bin/python -m bench.lora --steps 3 --repeats 1 --skip-mid`` for a quick look.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.cache import Side, spawn

WARMUP = 1
"""First steps of each run not timed (set-up costs land there)."""
THREADS = 1
AUDIO_DROPOUT = 0.1
SHAPE_14B = (512, 512, 81)


@dataclass
class Setting:
    """One setting in one world: its LoRA rank (0: the adapter alone) and its pooled runs."""

    rank: int
    side: Side

    @property
    def label(self) -> str:
        return "adapter only" if self.rank == 0 else f"+ LoRA r{self.rank}"


def trained_counts(weights: str) -> tuple[int, int, float]:
    """(adapter, LoRA) parameters in a run's `trainable.safetensors`, and the largest |lora_B| weight (0: the LoRA
    did not move from its start)."""
    from safetensors import safe_open

    from fantasytalk_cli.models.trainable import is_lora_name

    adapter = lora = 0
    moved = 0.0
    with safe_open(weights, framework="pt") as file:
        for name in file.keys():  # noqa: SIM118 (safe_open is not a mapping)
            tensor = file.get_tensor(name)
            if not is_lora_name(name):
                adapter += tensor.numel()
                continue
            lora += tensor.numel()
            if ".lora_B." in name:
                moved = max(moved, tensor.abs().max().item())
    return adapter, lora, moved


def bench_world(
    name: str, world: dict[str, Path], samples: dict[str, Any], tmp: Path, args: argparse.Namespace
) -> list[Setting]:
    """Every setting's runs in `world`, the order rotated per repeat so no setting always runs first."""
    ranks = [0, *args.ranks]
    settings = {rank: Setting(rank, Side()) for rank in ranks}
    flags = {**samples, "max_train_steps": args.steps, "checkpointing_steps": 10 * args.steps,
             "audio_dropout": AUDIO_DROPOUT}  # fmt: skip
    for repeat in range(args.repeats):
        for rank in ranks[repeat % len(ranks) :] + ranks[: repeat % len(ranks)]:
            spec = {"world": {k: str(v) for k, v in world.items()}, "flags": flags | {"lora_rank": rank},
                    "threads": THREADS, "output_dir": str(tmp / f"{name}-r{rank}-{repeat}")}  # fmt: skip
            print(f"  {name}: {settings[rank].label}, run {repeat + 1}/{args.repeats}", flush=True)
            got = spawn(spec)
            side = settings[rank].side
            side.steps += got["step_s"][WARMUP:]
            side.rss_mb.append(got["peak_rss_mb"])
            side.runs.append(got)
    return list(settings.values())


def render_runs(results: dict[str, list[Setting]], args: argparse.Namespace) -> None:
    print(f"\nadapter alone against adapter + LoRA: {args.steps} steps per run, first {WARMUP} dropped, "
          f"{args.repeats} run(s) per setting (rotated), torch threads {THREADS}; medians")  # fmt: skip
    head = f"{'world':<6} {'setting':<13} {'trainable (adapter + LoRA)':>37} {'s/step':>7} {'ratio':>6} "
    print(head + f"{'peak RSS MB':>11} {'ratio':>6}  LoRA trained")
    for world, settings in results.items():
        base = settings[0].side
        for setting in settings:
            side = setting.side
            adapter, lora, moved = trained_counts(side.runs[0]["weights"])
            finite = all(math.isfinite(loss) for run in side.runs for loss in run["losses"])
            trained = "-" if not setting.rank else ("yes" if moved > 0 else "NO (lora_B still zero)")
            params = f"{adapter + lora:,} ({adapter:,} + {lora:,})"
            print(f"{world:<6} {setting.label:<13} {params:>37} {side.step_s:>7.3f} {side.step_s / base.step_s:>5.2f}x "
                  f"{side.peak_mb:>11.0f} {side.peak_mb / base.peak_mb:>5.2f}x  {trained}"
                  f"{'' if finite else '; NON-FINITE LOSS'}")  # fmt: skip


def render_estimate(ranks: list[int]) -> None:
    """The planner's 14B estimate per setting: total and the terms that differ from the adapter alone."""
    from fantasytalk_cli.models.dims import WAN21_I2V_14B_CONFIG
    from fantasytalk_cli.models.trainable import DEFAULT_LORA_TARGETS, DEFAULT_TRAINABLE_MODULES
    from fantasytalk_cli.planning.memory import GB, estimate_memory

    def estimate(rank: int) -> Any:
        lora = (rank, DEFAULT_LORA_TARGETS) if rank else None
        return estimate_memory(WAN21_I2V_14B_CONFIG, SHAPE_14B, gradient_checkpointing=True,
                               trainable_modules=DEFAULT_TRAINABLE_MODULES, lora=lora)  # fmt: skip

    base = estimate(0)
    before = {term.name: term.bytes for term in base.terms}
    shape = "x".join(map(str, SHAPE_14B))
    print(f"\n14B estimate per GPU (information): {shape}, DDP on 1 GPU, bf16, gradient checkpointing; LoRA on "
          f"{len(DEFAULT_LORA_TARGETS)} linears per block, alpha = rank")  # fmt: skip
    print(f"{'setting':<13} {'total GB':>9} {'diff GB':>8}  terms the LoRA changes (GB)")
    print(f"{'adapter only':<13} {base.total_gb:>9.2f} {0:>+8.2f}  -")
    for rank in ranks:
        got = estimate(rank)
        changed = "; ".join(f"{t.name} {before.get(t.name, 0) / GB:.2f} -> {t.gb:.2f}" for t in got.terms
                            if t.bytes != before.get(t.name, 0) and not t.name.startswith("encode phase"))  # fmt: skip
        print(f"{'+ LoRA r' + str(rank):<13} {got.total_gb:>9.2f} {got.total_gb - base.total_gb:>+8.2f}  {changed}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, the order rotated")
    parser.add_argument("--skip-mid", action="store_true", help="the tiny world only")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64], help="LoRA ranks against the adapter alone")
    args = parser.parse_args(argv)
    if args.steps < WARMUP + 2:
        parser.error(f"--steps must be at least {WARMUP + 2}: the first is dropped and the last is not timed")
    if min(args.ranks) < 1:
        parser.error("--ranks must be positive (the adapter alone is always measured)")
    args.ranks = sorted(set(args.ranks))

    from bench._world import build_world, wide_dit_config, write_wide_model

    with tempfile.TemporaryDirectory(prefix="ftalk-bench-lora-") as tmp_name:
        tmp = Path(tmp_name)
        tiny = build_world(tmp / "world")
        worlds: dict[str, tuple[dict[str, Path], dict[str, Any]]] = {"tiny": (tiny, {})}
        if not args.skip_mid:
            write_wide_model(tiny["model"], tmp / "world" / "wide_model", wide_dit_config(768, 8, 3072))
            samples = {"video_sample_size": 96, "video_sample_n_frames": 17, "max_upscale": 4.0}
            worlds["mid"] = ({**tiny, "model": tmp / "world" / "wide_model"}, samples)
        print("worlds: tiny (tiny DiT, 48x48x9)" + ("" if args.skip_mid else
              ", mid (DiT width 768, 8 blocks, FFN 3072, 96x96x17)") + "; the tiny world's encoders")  # fmt: skip
        results = {name: bench_world(name, world, samples, tmp, args) for name, (world, samples) in worlds.items()}
        render_runs(results, args)
    render_estimate(args.ranks)


if __name__ == "__main__":
    main()
