"""Benchmark of the feature cache (`ftalk cache`, `train --cache_dir`): step time and peak memory of training
with and without the cache, and the 14B memory estimate with and without it.

Measured runs, per world: the tests' tiny world (tiny DiT, 48x48x9 samples), and the same clips with a mid-size
random-weight DiT (`--mid-dim`, `--mid-layers`, `--mid-ffn`, default width 768, 8 blocks, FFN 3072, 96x96x17
samples: about 1-2 s a step here; `bench._world.write_wide_model`, the original Wan layout, loaded by the real
loaders). Both worlds use the tiny world's encoders (umT5, wav2vec2, VAE, CLIP at tiny widths): what the cache saves
here is their cost at tiny width, a floor; the real encoders' share is what the 14B estimate below shows. Per
world: `build_cache` over the data (its report printed), then `run_training` for `--steps` steps without
(`online`) and with `--cache_dir` (`cached`), same config and seed, `--repeats` times each, alternating which goes
first, each run in a fresh process (`python -m bench.cache --child SPEC`) so its peak RSS is its own (the kernel's
high-water mark `VmHWM`: models loaded, data, steps and the final checkpoint). A step is the time between two
consecutive `training_step` calls (`bench.train_overhead.loop_run`'s clock-only wrapper: it covers the encoders,
forward, backward, update, logging and the next batch's loading, from the media or from the cache); the first
`--warmup` steps of each run are dropped, the rest pooled, medians shown. The encoders a run loaded are read from
its set-up (`Run.models`), its cache misses from the loop, its cache lines from its log. The cache is exact: every
run must give the same losses and bitwise the same trained weights, and the bench checks and prints that (the cache
is built with the runs' torch thread count: on a CPU another count rounds the encoders' sums differently).

Estimate: Wan2.1-I2V-14B + FantasyTalking (the built-in config that `tests/test_manifests.py` checks against the
released checkpoints' manifests) on the seed recipe (`examples/fantasytalking_512.yaml`: bf16, gradient
checkpointing, low_vram) at its largest bucket, 512x512x81, DDP on one GPU: `make_plan_report` (what `ftalk
plan-buckets` shows) without a cache, and `run_estimate` (what plan-buckets calls per bucket) with the coverage
complete (text, audio, video cached: umT5-XXL, wav2vec2, CLIP and the VAE encode left out), with low_vram as the
recipe has it and off. One more row runs plan-buckets itself with `--cache_dir` at the tiny world's cache (its
coverage counted, not assumed), on the 14B config at that world's buckets and precision.

Expectation: the cached runs load no encoder, miss nothing and train to the online weights; they are faster by the
encoders' share of a step (nearly all of it in the tiny world, where the DiT is tiny too; less with the mid-size
DiT) and peak lower by the encoders' weights, activations and the code they load; on 14B the GPU estimate drops by
the encoders' resident weights (low_vram off) or by their encode phase (low_vram on: they wait in host memory,
which the cache frees). Timing noise: torch runs on one thread per run (`--threads`); on a shared 2-core
machine compare the ratios, not the absolute times.

Run from the repository root: ``.venv/bin/python -m bench.cache`` (about 2.5 minutes on 2 CPU cores), or
``.venv/bin/python -m bench.cache --steps 3 --repeats 1 --skip-mid`` for a quick look.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("online", "cached")
ALL_KINDS = frozenset({"text", "audio", "video"})
SEED_RECIPE = REPO / "examples" / "fantasytalking_512.yaml"
SEED_SHAPE = (512, 512, 81)


# --- the child: one training run ------------------------------------------------------------------------------


def loaded_encoders(models: Any) -> dict[str, int]:
    """Name -> parameters of the frozen encoders a run's set-up loaded (`TrainingModels`)."""
    wav2vec = None if models.wav2vec is None else models.wav2vec.model
    found = {"umT5": models.encoders.text, "wav2vec2": wav2vec, "VAE": models.encoders.vae,
             "CLIP": models.encoders.image}  # fmt: skip
    return {name: sum(p.numel() for p in module.parameters()) for name, module in found.items() if module is not None}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """`run_training` of `spec` in this process: step times, losses, what it loaded, its log's cache lines, peak RSS."""
    import torch
    import transformers
    from rich.console import Console

    import fantasytalk_cli.train.loop as loop_module
    from bench._memory import peak_rss_mb
    from bench._world import world_config
    from bench.train_overhead import loop_run

    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    world = {key: Path(value) for key, value in spec["world"].items()}
    cfg = world_config(world, Path(spec["output_dir"]), **spec["flags"])
    log, seen = io.StringIO(), {}
    real_set_up = loop_module.set_up

    def recorded_set_up(cfg: Any, console: Any) -> Any:  # the run's log to a buffer, its set-up kept
        seen["run"] = real_set_up(cfg, Console(file=log, width=240))
        return seen["run"]

    loop_module.set_up = recorded_set_up
    try:
        gaps, losses = loop_run(cfg)
    finally:
        loop_module.set_up = real_set_up
    run = seen["run"]
    return {
        "step_s": [wall for wall, _ in gaps],
        "losses": losses,
        "encoders": loaded_encoders(run.models),
        "misses": dict(run.cache_misses) if cfg.data.cache_dir is not None else None,
        "cache_log": [line for line in log.getvalue().splitlines() if line.startswith("cache:")],
        "weights": str(cfg.checkpoint.output_dir / f"checkpoint-{run.state.step}" / "trainable.safetensors"),
        "peak_rss_mb": peak_rss_mb(),
    }


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    """`child(spec)` in a fresh interpreter: its JSON answer is its last line of output."""
    cmd = [sys.executable, "-m", "bench.cache", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed ({spec['output_dir']}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the parent: worlds, caches, runs, table ------------------------------------------------------------------


@dataclass
class Side:
    """The pooled runs of one setting in one world."""

    steps: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def step_s(self) -> float:
        return statistics.median(self.steps)

    @property
    def peak_mb(self) -> float:
        return statistics.median(self.rss_mb)


@dataclass
class WorldResult:
    name: str
    cache_cfg: Any
    """The config the cache was built with (`cache_dir` set): what the runs and plan-buckets use."""
    cache_summary: list[str]
    sides: dict[str, Side]
    same_losses: bool
    max_weight_diff: float


def same_weights(paths: list[str]) -> float:
    """Largest absolute difference between the first file's tensors and every other's (0.0: bitwise equal)."""
    from safetensors.torch import load_file

    first = load_file(paths[0])
    worst = 0.0
    for path in paths[1:]:
        other = load_file(path)
        if other.keys() != first.keys():
            return math.inf
        for name, want in first.items():
            if not want.equal(other[name]):
                worst = max(worst, (other[name].double() - want.double()).abs().max().item())
    return worst


def bench_world(
    name: str, world: dict[str, Path], samples: dict[str, Any], tmp: Path, args: argparse.Namespace
) -> WorldResult:
    """Cache the world's data, then the online and cached runs, alternating; see the module docstring."""
    import torch

    from bench._world import world_config
    from fantasytalk_cli.cache.build import build_cache
    from fantasytalk_cli.data.metadata import load_entries

    torch.set_num_threads(args.threads)  # as the runs: other thread counts round the encoders' sums differently
    cache = tmp / f"{name}-cache"
    clips = len(load_entries(world["clean"]))
    flags: dict[str, Any] = {**samples, "max_train_steps": args.steps, "checkpointing_steps": 10 * args.steps,
                             "cache_epochs": math.ceil(args.steps / clips)}  # fmt: skip
    cache_cfg = world_config(world, tmp / "unused", cache_dir=cache, **flags)
    report = build_cache(cache_cfg)
    if report.failed:
        raise SystemExit(f"{name}: the cache run failed: {report.failed}")
    sides = {setting: Side() for setting in SETTINGS}
    for repeat in range(args.repeats):
        for setting in SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]:
            extra = {"cache_dir": str(cache)} if setting == "cached" else {}
            spec = {"world": {k: str(v) for k, v in world.items()}, "flags": flags | extra, "threads": args.threads,
                    "output_dir": str(tmp / f"{name}-{setting}-{repeat}")}  # fmt: skip
            got = spawn(spec)
            side = sides[setting]
            side.steps += got["step_s"][args.warmup :]
            side.rss_mb.append(got["peak_rss_mb"])
            side.runs.append(got)
    runs = [run for side in sides.values() for run in side.runs]
    same_losses = all(run["losses"] == runs[0]["losses"] for run in runs)
    return WorldResult(
        name, cache_cfg, report.summary(), sides, same_losses, same_weights([run["weights"] for run in runs])
    )


def render_runs(results: list[WorldResult], args: argparse.Namespace) -> None:
    print(
        f"\ntraining with and without the feature cache: {args.steps} steps per run, first {args.warmup} dropped, "
        f"{args.repeats} run(s) per setting (alternating), torch threads {args.threads}; medians"
    )
    print(f"{'world':<8} {'setting':<8} {'steps':>5} {'s/step':>8} {'peak RSS MB':>12}  {'misses':<8} encoders loaded")
    for res in results:
        for setting, side in res.sides.items():
            encoders = side.runs[0]["encoders"]
            loaded = ", ".join(f"{n} ({p / 1e6:.2f}M)" for n, p in encoders.items()) or "none"
            misses = side.runs[0]["misses"]
            shown = "-" if misses is None else (", ".join(f"{k} {v}" for k, v in misses.items() if v) or "none")
            print(f"{res.name:<8} {setting:<8} {len(side.steps):>5} {side.step_s:>8.3f} {side.peak_mb:>12.0f}  "
                  f"{shown:<8} {loaded}")  # fmt: skip
    for res in results:
        online, cached = res.sides["online"], res.sides["cached"]
        exact = "yes" if res.max_weight_diff == 0.0 else f"NO (max |diff| {res.max_weight_diff:.3g})"
        saved_ms, saved_mb = (online.step_s - cached.step_s) * 1e3, online.peak_mb - cached.peak_mb
        print(
            f"{res.name}: cached / online: time {cached.step_s / online.step_s:.3f}x ({saved_ms:+.0f} ms/step saved), "
            f"peak RSS {cached.peak_mb / online.peak_mb:.3f}x ({saved_mb:+.0f} MB saved); identical losses: "
            f"{'yes' if res.same_losses else 'NO'}; bitwise-equal trained weights: {exact}"
        )
        for line in [*res.cache_summary, *cached.runs[0]["cache_log"]]:
            print(f"  {line}")


# --- the 14B estimate -----------------------------------------------------------------------------------------


@dataclass
class EstimateRow:
    label: str
    cfg: Any
    """The run config estimated (`FtalkConfig`)."""
    without: Any
    with_cache: Any
    notes: list[str] = field(default_factory=list)
    """plan-buckets' own notes on the cache (the row computed from a real cache)."""


def estimate_14b(tmp: Path) -> list[EstimateRow]:
    """The seed recipe's largest bucket on the 14B config, without a cache (`make_plan_report`, as plan-buckets) and
    with a complete one (`run_estimate` with every kind cached, as plan-buckets does per bucket), low_vram on/off."""
    from fantasytalk_cli.config import load_config
    from fantasytalk_cli.data.metadata_write import write_entries_atomic
    from fantasytalk_cli.planning.fit import chosen_options, run_estimate
    from fantasytalk_cli.planning.model_dims import default_transformer_config
    from fantasytalk_cli.planning.report import make_plan_report

    meta = tmp / "seed-clips.json"
    height, width, frames = SEED_SHAPE
    probe = {"width": width, "height": height, "num_frames": 120, "fps": 25.0, "audio_duration": 4.8,
             "sample_rate": 16000, "channels": 1}  # fmt: skip
    clips = [{"file_path": f"train/{i}.mp4", "audio_path": f"wav/{i}.wav", "text": "A person talks.", "type": "video",
              "probe": probe} for i in range(4)]  # fmt: skip
    write_entries_atomic(meta, clips)
    config = default_transformer_config()
    rows = []
    for low_vram in (True, False):
        cfg = load_config(SEED_RECIPE, {"train_data_meta": meta, "train_data_dir": tmp, "low_vram": low_vram,
                                        "strategy": "ddp"})  # fmt: skip
        without = make_plan_report(cfg, world_size=1, transformer_config=config).memory
        assert without is not None
        options = chosen_options(cfg.model)
        with_cache = run_estimate(
            cfg.train, cfg.model, config, without.shape, options, strategy="ddp", devices=1, cached=ALL_KINDS
        )
        again = run_estimate(cfg.train, cfg.model, config, without.shape, options, strategy="ddp", devices=1)
        assert again.total_bytes == without.total_bytes, "plan-buckets' estimate is not run_estimate's"
        rows.append(EstimateRow("seed recipe" if low_vram else "seed recipe, low_vram off", cfg, without, with_cache))
    return rows


def estimate_with_real_cache(world: WorldResult) -> EstimateRow:
    """plan-buckets (`make_plan_report`) on the 14B config at a world's own buckets, with --cache_dir pointing at the
    world's complete cache and without it: the coverage is counted from the cache, not assumed."""
    from fantasytalk_cli.planning.model_dims import default_transformer_config
    from fantasytalk_cli.planning.report import make_plan_report

    cfg = world.cache_cfg.model_copy(update={"dist": world.cache_cfg.dist.model_copy(update={"strategy": "ddp"})})
    no_cache = cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": None})})
    config = default_transformer_config()
    cached = make_plan_report(cfg, world_size=1, transformer_config=config)
    without = make_plan_report(no_cache, world_size=1, transformer_config=config).memory
    assert without is not None and cached.memory is not None
    notes = [n for n in cached.notes if "cache" in n]
    return EstimateRow(f"{world.name} world + its cache", cfg, without, cached.memory, notes)


def render_estimate(rows: list[EstimateRow]) -> None:
    from fantasytalk_cli.planning.memory import GB, encoder_bytes
    from fantasytalk_cli.planning.model_dims import BUILTIN_MODEL
    from fantasytalk_cli.planning.model_size import encoder_params

    print(f"\n14B estimate per GPU ({BUILTIN_MODEL}), ddp on 1 GPU: without a feature cache, "
          "and with a complete one (umT5-XXL, wav2vec2, CLIP, VAE encode left out)")  # fmt: skip
    print(
        f"{'run':<26} {'shape':<10} {'config':<26} {'no cache GB':>11} {'cached GB':>10} {'diff GB':>8}  "
        "terms that changed"
    )
    for row in rows:
        before = {t.name: t.bytes for t in row.without.terms}
        after = {t.name: t.bytes for t in row.with_cache.terms}
        changed = "; ".join(f"{n} {before[n] / GB:.2f} -> {after.get(n, 0) / GB:.2f}" for n in before
                            if before[n] != after.get(n, 0)) or "none"  # fmt: skip
        total_before, total_after = row.without.total_bytes / GB, row.with_cache.total_bytes / GB
        shape = "x".join(str(v) for v in row.without.shape)
        train, model = row.cfg.train, row.cfg.model
        dtype = "fp32" if train.mixed_precision == "no" else train.mixed_precision
        config = ", ".join([dtype, *(["grad. ckpt"] if model.gradient_checkpointing else []),
                            *(["low_vram"] if model.low_vram else [])])  # fmt: skip
        print(f"{row.label:<26} {shape:<10} {config:<26} {total_before:>11.2f} {total_after:>10.2f} "
              f"{total_after - total_before:>+8.2f}  {changed}")  # fmt: skip
        for note in row.notes:
            print(f"  plan-buckets: {note}")
    host = sum(encoder_bytes(name, count, 2) for name, count in encoder_params().items())
    print(
        f"with low_vram the encoders wait in host memory: a complete cache leaves {host / GB:.1f} GB (bf16) of them "
        "unloaded there, per training process"
    )


# --- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="first steps of each run not counted")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, alternating which goes first")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--skip-mid", action="store_true", help="the tiny world only")
    parser.add_argument("--mid-dim", type=int, default=768, help="mid-size DiT width")
    parser.add_argument("--mid-layers", type=int, default=8, help="mid-size DiT blocks")
    parser.add_argument("--mid-ffn", type=int, default=3072, help="mid-size DiT FFN width")
    parser.add_argument("--mid-size", type=int, default=96, help="mid-size world's sample side in pixels")
    parser.add_argument("--mid-frames", type=int, default=17, help="mid-size world's frames per sample (4k+1)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.steps < args.warmup + 2:
        parser.error("--steps must leave at least one timed step after --warmup (the last step is not timed)")

    from bench._world import build_world, wide_dit_config, write_wide_model
    from fantasytalk_cli.data.metadata import load_entries
    from fantasytalk_cli.models.tiny import TINY_DIT

    with tempfile.TemporaryDirectory(prefix="ftalk-bench-cache-") as tmp_name:
        tmp = Path(tmp_name)
        tiny = build_world(tmp / "world")
        worlds = {"tiny": (tiny, {}, TINY_DIT, "48x48x9")}
        if not args.skip_mid:
            kwargs = wide_dit_config(args.mid_dim, args.mid_layers, args.mid_ffn)
            write_wide_model(tiny["model"], tmp / "world" / "wide_model", kwargs)
            samples = {"video_sample_size": args.mid_size, "video_sample_n_frames": args.mid_frames, "max_upscale": 4.0}
            shape = f"{args.mid_size}x{args.mid_size}x{args.mid_frames}"
            worlds["mid"] = ({**tiny, "model": tmp / "world" / "wide_model"}, samples, kwargs, shape)
        for name, (_, _, dit, shape) in worlds.items():
            width = dit["num_attention_heads"] * dit["attention_head_dim"]
            print(f"{name} world: DiT width {width}, {dit['num_layers']} blocks, FFN {dit['ffn_dim']}; samples "
                  f"{shape}; the tiny world's encoders, {len(load_entries(tiny['clean']))} clips")  # fmt: skip
        results = [bench_world(name, world, samples, tmp, args) for name, (world, samples, _, _) in worlds.items()]
        render_runs(results, args)
        render_estimate([*estimate_14b(tmp), estimate_with_real_cache(results[0])])


if __name__ == "__main__":
    main()
