"""Benchmark of one model-ready training sample against decoding its frames, per sample.

For every sample of epoch 0 (the bucket sampler at batch size 1, so each sample keeps its planned bucket shape),
in one process with torch and decord on one thread:

- `raw decord`: ``decord.VideoReader(path, num_threads=1).get_batch(indices).asnumpy()`` of exactly the frames of
  the sample's planned window (the same `clip_window` the dataset draws), file open included: the floor;
- `loaded`: ``ClipBatchDataset.load_sample``, what a DataLoader worker does per sample (decord decode of the
  window, the audio of the frames' span read, downmixed and resampled to 16 kHz; a source with more than twice
  the pixels of its cover size is also resized here, `loader_frames`: only the large set's);
- its parts timed one by one on the same sample: `read_frames`, `worker resize` (`loader_frames`),
  `read_audio_for_frames`;
- `step pixels`: what the step then does with the frames on its device, timed here on the CPU
  (`to_model_pixels`: resize to cover, centre crop, layout change and [-1, 1] float; the last two the step always
  did). It is not part of the ratio: it runs in the training process on the accelerator, not in the decode-bound
  workers; on a CPU-only run it is the step's cost, shown so that nothing is hidden (`ratio w/ step pixels`).

Raw and loaded alternate (order flipped every repeat); a warm-up pass is not timed; each figure is the median
over repeats of one sample, averaged over samples; the ratio is sum(loaded) / sum(raw). Three data sets: the demo
data (`make_demo_dataset`, clips of 96-176 px where fixed costs dominate) and the realistic, resize-heavy one: 512x512,
480x832 and 832x480 sources (`write_talking_clip`) planned with the seed recipe (512-level aspect-ratio buckets, 81
frames), so two thirds of the samples are resized; and, shown for information, 1080p sources (`--large-clips`), far
larger than their bucket, which the worker resizes so that a sample never travels at more than twice its bucket's
bytes. Target on the resize-heavy mix: ratio <= 1.15 (the ratio of means is the ratio of throughputs).

Run: ``.venv/bin/python -m bench.dataloader [--repeats 7 --mix-clips 6 --large-clips 2 --frames 81]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fantasytalk_cli.config import load_config
from fantasytalk_cli.config.schema import BucketConfig, DataConfig
from fantasytalk_cli.data.buckets import clip_window
from fantasytalk_cli.data.dataset import ClipBatchDataset, loader_frames, read_frames, to_model_pixels
from fantasytalk_cli.data.metadata import load_entries, resolve_media_path
from fantasytalk_cli.data.plan import plan_from_metadata
from fantasytalk_cli.data.sampler import BucketBatchSampler, PlannedBatch
from fantasytalk_cli.data.synthetic import METADATA_NAME, make_demo_dataset, write_talking_clip
from fantasytalk_cli.data.validate import ValidateOptions, validate_metadata
from fantasytalk_cli.models.audio import read_audio_for_frames

TARGET = 1.15
PARTS = ("raw decord", "loaded", "read_frames", "worker resize", "read_audio", "step pixels")


@dataclass
class DataSet:
    name: str
    root: Path
    clean: Path
    buckets: dict[str, Any]
    judged: bool = True
    """Whether the ratio target applies (not to the large set, resized in the worker by design)."""


def clean_metadata(root: Path, buckets: dict[str, Any]) -> Path:
    """`validate-metadata --write-clean` on the folder's metadata: the probe facts the plan and dataset need."""
    clean = root / "clean.json"
    report = validate_metadata(
        DataConfig(train_data_dir=root, train_data_meta=root / METADATA_NAME),
        BucketConfig(**buckets),
        ValidateOptions(clean_path=clean, workers=1),
    )
    assert report.ok, report.codes
    return clean


def demo_set(root: Path, clips: int) -> DataSet:
    buckets = {"video_sample_size": 128, "video_sample_n_frames": 17, "enable_bucket": True}
    make_demo_dataset(root, seed=0, num_clips=clips)
    return DataSet("demo (96-176 px)", root, clean_metadata(root, buckets), buckets)


MIX_SHAPES = ((512, 512), (480, 832), (832, 480))
"""(height, width) of the mixed set's sources, in turn: square, landscape, portrait (all but the square need a
resize into the 512-level buckets)."""


LARGE_SHAPES = ((1080, 1920),)
"""(height, width) of the optional large set: 1080p sources, which `loader_frames` resizes in the worker."""


def mix_set(root: Path, clips: int, frames: int, shapes: tuple[tuple[int, int], ...] = MIX_SHAPES) -> DataSet:
    """`clips` talking clips cycling through `shapes`, 4 s at 25 fps, audio alternating 16 kHz mono / 44.1 kHz
    stereo, planned with the seed recipe's buckets (512 level, aspect-ratio buckets, `frames` frames)."""
    entries = []
    for i in range(clips):
        height, width = shapes[i % len(shapes)]
        rate, channels = ((16000, 1), (44100, 2))[i % 2]
        video, audio = f"train/{i:04d}.mp4", f"wav/{i:04d}.wav"
        write_talking_clip(root / video, root / audio, width=width, height=height, fps=25, seconds=4.0,
                           sample_rate=rate, channels=channels, seed=i)  # fmt: skip
        entries.append({"file_path": video, "audio_path": audio, "text": "A person talks.", "type": "video"})
    (root / METADATA_NAME).write_text(json.dumps(entries))
    buckets = {"video_sample_size": 512, "video_sample_n_frames": frames, "enable_bucket": True}
    name = f"{'/'.join(f'{h}x{w}' for h, w in shapes)}, {frames} f"
    return DataSet(name, root, clean_metadata(root, buckets), buckets, judged=shapes != LARGE_SHAPES)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_set(data: DataSet, repeats: int) -> tuple[dict[str, float], int, str]:
    """Mean over samples of each part's per-sample median (seconds), the sample count, the shapes seen."""
    cfg = load_config(None, {"train_data_dir": data.root, "train_data_meta": data.clean, "seed": 0, **data.buckets})
    plan, _, _ = plan_from_metadata(data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=data.clean)
    entries = load_entries(data.clean)
    dataset = ClipBatchDataset(entries, plan, data.root, seed=0)
    batches: list[PlannedBatch] = list(BucketBatchSampler(plan, batch_size=1, seed=0))

    def window(batch: PlannedBatch) -> Any:
        index = batch[0]
        probe = entries[index].probe
        assert probe is not None
        return clip_window(probe.num_frames, probe.fps, batch.frames, int(dataset.stride[index]),
                           seed=0, epoch=batch.epoch, index=index)  # fmt: skip

    def raw(batch: PlannedBatch) -> Any:
        import decord

        path = resolve_media_path(data.root, entries[batch[0]].file_path)
        return decord.VideoReader(str(path), num_threads=1).get_batch(window(batch).frame_indices).asnumpy()

    def parts(batch: PlannedBatch) -> dict[str, float]:
        win = window(batch)
        entry = entries[batch[0]]
        t_read, frames = _timed(lambda: read_frames(resolve_media_path(data.root, entry.file_path), win.frame_indices))
        t_worker, clip = _timed(lambda: loader_frames(frames, batch.height, batch.width))
        t_step, _ = _timed(lambda: to_model_pixels([clip], batch.height, batch.width, torch.device("cpu")))
        audio_path = resolve_media_path(data.root, entry.audio_path)
        t_audio, _ = _timed(
            lambda: read_audio_for_frames(audio_path, win.start_frame, win.num_frames, win.stride, win.fps)
        )
        return {"read_frames": t_read, "worker resize": t_worker, "read_audio": t_audio, "step pixels": t_step}

    times: dict[str, list[list[float]]] = {part: [[] for _ in batches] for part in PARTS}
    for rep in range(repeats + 1):  # repeat 0 warms caches and is not kept
        for i, batch in enumerate(batches):
            runs = [("raw decord", lambda b=batch: raw(b)), ("loaded", lambda b=batch: dataset.load_sample(b[0], b))]
            measured = {name: _timed(fn)[0] for name, fn in (runs if rep % 2 else runs[::-1])}
            measured |= parts(batch)
            if rep:
                for part, seconds in measured.items():
                    times[part][i].append(seconds)
    means = {part: statistics.fmean(statistics.median(s) for s in per_sample) for part, per_sample in times.items()}
    shapes = sorted({f"{b.height}x{b.width}x{b.frames}" for b in batches})
    return means, len(batches), ", ".join(shapes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--demo-clips", type=int, default=12)
    parser.add_argument("--mix-clips", type=int, default=6, help="clips of the resize-heavy set (0: skip it)")
    parser.add_argument("--frames", type=int, default=81, help="frames per sample of the resize-heavy set")
    parser.add_argument("--large-clips", type=int, default=2, help="1080p clips, resized in the worker (0: skip)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ftalk-bench-data-") as tmp:
        start = time.perf_counter()
        sets = [demo_set(Path(tmp) / "demo", args.demo_clips)]
        if args.mix_clips:
            sets.append(mix_set(Path(tmp) / "mix", args.mix_clips, args.frames))
        if args.large_clips:
            sets.append(mix_set(Path(tmp) / "large", args.large_clips, args.frames, LARGE_SHAPES))
        print(f"data written and validated in {time.perf_counter() - start:.0f} s; {args.repeats} repeats per sample")
        widths = [max(len(part), 8) for part in PARTS]
        columns = " ".join(f"{part:>{width}}" for part, width in zip(PARTS, widths, strict=True))
        print(f"{'data set':<28} {'samples':>7} {columns}  ratio  ratio w/ step pixels")
        for data in sets:
            means, count, shapes = bench_set(data, args.repeats)
            ms = " ".join(f"{means[p] * 1e3:>{w}.2f}" for p, w in zip(PARTS, widths, strict=True))
            ratio = means["loaded"] / means["raw decord"]
            with_step = (means["loaded"] + means["step pixels"]) / means["raw decord"]
            verdict = ("met" if ratio <= TARGET else "missed") if data.judged else "info"
            print(f"{data.name:<28} {count:>7} {ms} {ratio:>5.2f}x ({verdict}) {with_step:>6.2f}x")
            print(f"{'':<28} buckets: {shapes}")
    print(
        "ms per sample (mean over samples of the per-sample median); ratio = loaded / raw decord; "
        f"target <= {TARGET:.2f}x (not for the 1080p set: info); read_frames, worker resize and read_audio are the "
        "parts of `loaded` timed one by one; "
        "step pixels is the step's to_model_pixels on its device, timed on the CPU, outside the ratio"
    )


if __name__ == "__main__":
    main()
