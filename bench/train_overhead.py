"""Benchmark of the training loop's own cost: steady-state step time of `run_training` against a bare
forward + backward + optimizer step of the same model on the same batches, in the same process and run.

- `loop`: `run_training` as `ftalk train` runs it: bucket sampler, `ClipBatchDataset` loading in the training
  process (`dataloader_num_workers` 0, the default; `--workers N` to overlap it), accelerate's prepare,
  accumulate, backward and clipping, the cross-rank reductions, the lr scheduler, TensorBoard logging (the
  default `report_to`) and the rich progress bar, to a console that is not a terminal (as in a batch job).
  A step is the time between two consecutive calls of `training_step` (recorded by a wrapper that only reads
  the clock), so it covers everything the loop does for one step, the next batch's loading included;
  checkpoints are left out (only the final one is saved, after the last timed step).
- `bare`: the models loaded the same way (`load_training_models`), the loop's batches loaded beforehand (same
  sampler, dataset, seed and order), then per step `training_step` -> `loss.backward()` -> `clip_grad_norm_`
  -> `AdamW.step()` -> `zero_grad`. Both sides run the frozen encoders inside `training_step`: they are part of
  every real step (the loop cannot skip them) and precomputing them for one side only would count the encoders
  as loop overhead; what remains between the sides is the loop's machinery. Same step numbers, so the same
  noise, timesteps and dropout: the losses of both sides must be identical, and the bench checks that.

Both sides run `--repeats` times, alternating which goes first; the first `--warmup` steps of each run are
dropped and the rest pooled; the ratio of each repeat's two medians is shown too (its spread is the noise).
Each step is timed on the wall clock and on the process's CPU clock (all its threads, not loader workers): the
loop's extra work is CPU work (decoding, Python), and the CPU clock leaves out the time other jobs on a shared
machine hold the core (not their cache or SMT pressure). torch runs on one thread (threads only add noise).
Target: median loop step / median bare step <= 1.10 (wall clock).

Run from the repository root (it builds the tests' tiny world): ``.venv/bin/python -m bench.train_overhead``
(tiny DiT, 48x48x9 samples), or with a wider DiT and larger samples, e.g.
``.venv/bin/python -m bench.train_overhead --dim 512 --layers 8 --ffn 2048 --size 96``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import transformers
from rich.console import Console

import fantasytalk_cli.train.loop as loop_module
from bench._world import wide_dit_config, wide_world, world_config
from fantasytalk_cli.config.schema import FtalkConfig
from fantasytalk_cli.data.dataset import ClipBatchDataset
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.plan import load_plan_checked
from fantasytalk_cli.data.sampler import BucketBatchSampler
from fantasytalk_cli.train.model_setup import load_training_models
from fantasytalk_cli.train.setup import cpu_step_context
from fantasytalk_cli.train.step import training_step

TARGET = 1.10
CLOCKS = ("wall", "cpu")
"""`wall`: `time.perf_counter`; `cpu`: `time.process_time` (all threads of this process)."""

Stamp = tuple[float, float]


def _now() -> Stamp:
    return time.perf_counter(), time.process_time()


def _gaps(stamps: list[Stamp]) -> list[Stamp]:
    """(wall, cpu) seconds between consecutive stamps."""
    return [(b[0] - a[0], b[1] - a[1]) for a, b in pairwise(stamps)]


def loop_run(cfg: FtalkConfig) -> tuple[list[Stamp], list[float]]:
    """((wall, cpu) seconds between consecutive `training_step` calls, losses) of one `run_training`."""
    stamps: list[Stamp] = []
    real = loop_module.training_step

    def stamped(*args: Any, **kwargs: Any) -> Any:
        stamps.append(_now())
        return real(*args, **kwargs)

    loop_module.training_step = stamped
    try:
        summary = loop_module.run_training(cfg, Console(file=open(os.devnull, "w")))  # noqa: SIM115
    finally:
        loop_module.training_step = real
    return _gaps(stamps), summary.losses


def loop_batches(cfg: FtalkConfig, steps: int) -> list[dict[str, Any]]:
    """The batches the loop trains on in its first `steps` steps (batch size per step, one process)."""
    train = cfg.train
    assert cfg.data.train_data_meta is not None
    plan, _ = load_plan_checked(
        cfg.data.bucket_plan,
        data=cfg.data,
        buckets=cfg.buckets,
        train=cfg.train,
        metadata_path=cfg.data.train_data_meta,
        world_size=1,
    )
    sampler = BucketBatchSampler(plan, batch_size=train.train_batch_size, seed=train.seed)
    entries = load_entries(cfg.data.train_data_meta)
    dataset = ClipBatchDataset(entries, plan, cfg.data.train_data_dir, seed=train.seed)
    batches: list[dict[str, Any]] = []
    epoch = 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        batches += [dataset[planned] for planned in sampler][: steps - len(batches)]
        epoch += 1
    return batches


def bare_run(cfg: FtalkConfig, batches: list[dict[str, Any]]) -> tuple[list[Stamp], list[float]]:
    """((wall, cpu) seconds between consecutive step starts, losses) of the bare steps on `batches` (as for the
    loop, the last step has no next start and is not timed)."""
    train = cfg.train
    cpu = torch.device("cpu")
    models = load_training_models(cfg.model, train, device=cpu, uniform_dtype=False)
    params = [p for p in models.transformer.parameters() if p.requires_grad]
    optimizer = loop_module.build_optimizer(models.transformer, train)
    ctx = cpu_step_context(train, cfg.model, models.frozen_dtype)
    stamps: list[Stamp] = []
    losses: list[float] = []
    for number, batch in enumerate(batches):
        stamps.append(_now())
        out = training_step(models.transformer, models.encoders, models.wav2vec, batch, ctx, number)
        out.loss.backward()
        if train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
    return _gaps(stamps), losses


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="first steps of each run not counted")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, alternating which side goes first")
    parser.add_argument("--dim", type=int, default=0, help="DiT width (0: the tiny world's DiT)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--size", type=int, default=48, help="sample side in pixels")
    parser.add_argument("--frames", type=int, default=9, help="frames per sample (4k+1)")
    parser.add_argument("--workers", type=int, default=0, help="dataloader_num_workers of the loop")
    parser.add_argument("--report-to", default="tensorboard", choices=["tensorboard", "none"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # per-load reports would bury the table
    kwargs = wide_dit_config(args.dim, args.layers, args.ffn) if args.dim else None
    with tempfile.TemporaryDirectory(prefix="ftalk-bench-train-") as tmp:
        world = wide_world(Path(tmp) / "world", kwargs)
        flags = {"video_sample_size": args.size, "video_sample_n_frames": args.frames, "max_upscale": 4.0}
        flags |= {"max_train_steps": args.steps, "checkpointing_steps": 10 * args.steps, "report_to": args.report_to}
        flags["dataloader_num_workers"] = args.workers
        cfg = world_config(world, Path(tmp) / "run", **flags)
        batches = loop_batches(cfg, args.steps)
        shape = "x".join(str(s) for s in batches[0]["shape"])
        dit = f"DiT dim {args.dim}, {args.layers} blocks, FFN {args.ffn}" if args.dim else "tiny DiT"
        print(
            f"{dit}; samples {shape}, batch {cfg.train.train_batch_size}; {args.steps} steps per run, first "
            f"{args.warmup} dropped, {args.repeats} runs per side; loader workers {args.workers}; torch threads 1"
        )
        times: dict[str, list[Stamp]] = {"loop": [], "bare": []}
        same_losses = True
        pair_ratios: list[float] = []
        for repeat in range(args.repeats):
            order = ("loop", "bare") if repeat % 2 == 0 else ("bare", "loop")
            losses: dict[str, list[float]] = {}
            medians: dict[str, float] = {}
            for side in order:
                if side == "loop":
                    run_dir = cfg.checkpoint.model_copy(update={"output_dir": Path(tmp) / f"run{repeat}"})
                    steps, losses[side] = loop_run(cfg.model_copy(update={"checkpoint": run_dir}))
                else:
                    steps, losses[side] = bare_run(cfg, batches)
                times[side] += steps[args.warmup :]
                medians[side] = statistics.median(wall for wall, _ in steps[args.warmup :])
            same_losses &= losses["loop"] == losses["bare"]
            pair_ratios.append(medians["loop"] / medians["bare"])
    print(
        f"{'side':<6} {'steps':>6}" + "".join(f" {c + ' median':>12} {c + ' p90':>9} {c + ' mean':>10}" for c in CLOCKS)
    )
    stats: dict[str, dict[str, tuple[float, float, float]]] = {}
    for side, pairs in times.items():
        stats[side] = {}
        for k, clock in enumerate(CLOCKS):
            values = [pair[k] for pair in pairs]
            stats[side][clock] = (statistics.median(values), p90(values), statistics.fmean(values))
        cells = "".join(
            f" {m * 1e3:>9.1f} ms {p * 1e3:>6.1f} ms {a * 1e3:>7.1f} ms" for m, p, a in stats[side].values()
        )
        print(f"{side:<6} {len(pairs):>6}{cells}")
    for clock in CLOCKS:
        (lm, lp, la), (bm, bp, ba) = stats["loop"][clock], stats["bare"][clock]
        target = f" (target <= {TARGET:.2f}x)" if clock == "wall" else ""
        print(
            f"loop / bare, {clock:<4}: median {lm / bm:.3f}x{target}, p90 {lp / bp:.3f}x, mean {la / ba:.3f}x; "
            f"loop overhead {(lm - bm) * 1e3:.1f} ms/step (medians)"
        )
    shown = " ".join(f"{r:.3f}" for r in pair_ratios)
    print(f"per repeat (wall medians): {shown}; median of these {statistics.median(pair_ratios):.3f}x")
    print(f"identical losses on both sides: {'yes' if same_losses else 'NO (the sides did not run the same steps)'}")


if __name__ == "__main__":
    main()
