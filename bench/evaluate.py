"""Does the tiny world learn to use its audio? Audio reliance (`ftalk evaluate`'s numbers) against the step.

The tests' tiny world (random-weight tiny DiT, encoders and wav2vec2) trained from the **fresh adapter** (zero audio
k/v: the baseline, whose gaps are exactly 0, measured in the same run) on `--clips` synthetic talking clips whose
drawn mouth opens with the audio's loudness (`make-demo-data`), with `--validation_metrics` scoring `--held-out`
clips of another seed every `--every` steps: the loss with each clip's own audio, the mismatch gap (another held-out
clip's audio minus its own: positive = the model follows its audio) and the off gap (no audio minus own), each
with its 95% bootstrap interval over the clips, over the latent and over the mouth cells.

Run from the repository root: ``.venv/bin/python -m bench.evaluate`` (about 10 minutes on 2 CPU cores), or
``--steps 40 --every 20`` for a quick look. The figures go in bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from fantasytalk_cli.checkpoints.metrics import read_rows
from fantasytalk_cli.data.synthetic import make_demo_dataset
from fantasytalk_cli.evaluate.plots import plot_metrics
from fantasytalk_cli.evaluate.run import eval_context
from fantasytalk_cli.sample.adapter_source import load_adapter, resolve_adapter
from fantasytalk_cli.train.audio_reliance import clip_losses, held_out_clips, reliance_report
from fantasytalk_cli.train.loop import run_training
from fantasytalk_cli.train.model_setup import load_training_models
from tests.tiny_world import build_world, world_config

METRICS = ("loss", "audio_gap", "audio_off_gap", "mouth_audio_gap", "mouth_audio_off_gap")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=150)
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--lip-weight", type=float, default=0.0, help="Train with --lip_loss_weight (0: off).")
    parser.add_argument("--plot", type=Path, default=None, help="Also write the run's metrics.png here.")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        world = build_world(root / "world", num_clips=args.clips)
        make_demo_dataset(root / "held_out", seed=5, num_clips=args.held_out)
        held = root / "held_out" / "metadata_control.json"
        flags = {
            "transformer_path": None,
            "video_sample_size": args.size,
            "video_sample_n_frames": args.frames,
            "learning_rate": args.lr,
            "lr_scheduler": "constant",
            "max_train_steps": args.steps,
            "checkpointing_steps": args.every,
            "validation_steps": args.every,
            "validation_metrics": True,
            "eval_meta": held,
            "uniform_sampling": True,
            "report_to": "tensorboard",
            "lip_loss_weight": args.lip_weight,
        }
        cfg = world_config(world, root / "run", **flags)
        started = time.perf_counter()
        fresh = _reliance(cfg, held)
        baseline_s = time.perf_counter() - started
        started = time.perf_counter()
        run_training(cfg, Console(file=open(os.devnull, "w")))  # noqa: SIM115
        train_s = time.perf_counter() - started
        rows = [r for r in read_rows(root / "run") if r.source == "validation"]
        last_checkpoint = root / "run" / f"checkpoint-{args.steps}"
        memorised = _reliance(cfg, world["clean"], last_checkpoint)
        if args.plot is not None:
            plot_metrics(root / "run", rows, out=args.plot)
    table = {0: fresh} | {r.step: {} for r in rows}
    for r in rows:
        table[r.step][r.metric] = (r.value, r.low, r.high)
    print(f"tiny world, {args.clips} training clips, {args.held_out} held-out clips, {args.size}px x {args.frames} "
          f"frames, lr {args.lr:g}, lip weight {args.lip_weight:g}; fresh adapter scored in {baseline_s:.0f} s, "
          f"{args.steps} steps (with the metrics) in {train_s:.0f} s")  # fmt: skip
    print("| step | " + " | ".join(METRICS) + " |")
    print("|---:|" + "---|" * len(METRICS))
    for step, found in sorted(table.items()):
        cells = []
        for name in METRICS:
            value, low, high = found[name]
            outside = " **>0**" if name != "loss" and low > 0 else (" **<0**" if name != "loss" and high < 0 else "")
            cells.append(f"{value:+.4f} [{low:+.4f}, {high:+.4f}]{outside}")
        print(f"| {step} | " + " | ".join(cells) + " |")
    cells = [f"{memorised[name][0]:+.4f} [{memorised[name][1]:+.4f}, {memorised[name][2]:+.4f}]" for name in METRICS]
    print(f"| {args.steps}, on the {args.clips} training clips | " + " | ".join(cells) + " |")
    last = table[max(table)]
    gap, base = last["audio_gap"], fresh["audio_gap"]
    print(f"mismatch gap at step {max(table)}: {gap[0]:+.5f} (baseline, fresh adapter, same run: {base[0]:+.5f}); "
          f"interval {'excludes' if gap[1] > 0 or gap[2] < 0 else 'includes'} 0")  # fmt: skip


def _reliance(cfg, meta: Path, checkpoint: Path | None = None) -> dict[str, tuple[float, float, float]]:  # noqa: ANN001
    """The audio reliance of the clips in `meta`: the fresh adapter, or `checkpoint`'s weights."""
    models = load_training_models(cfg.model, cfg.train, device=torch.device("cpu"), uniform_dtype=False)
    if checkpoint is not None:
        load_adapter(resolve_adapter(checkpoint), models.transformer)
    clips = held_out_clips(meta, cfg.data, cfg.buckets, cfg.train)
    ctx = eval_context(cfg.train, cfg.model, torch.device("cpu"))
    positions = range(len(clips.batches))
    results = clip_losses(models.transformer.eval(), models.encoders, models.wav2vec, clips, positions, ctx)
    report = reliance_report(results, clips.left_out)
    return {name: (e.value, e.low, e.high) for name, e in report.metrics.items()}


if __name__ == "__main__":
    main()
