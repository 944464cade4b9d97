"""Benchmark `ftalk validate-metadata` against a full decode of the same clips.

Writes a few talking clips with `write_talking_clip`, hard-links them into a metadata list of `--entries` distinct
paths, then measures validation throughput with 1 and 2 worker processes (cache off) and with a warm cache, and the
cost of a full decode of the same clips (decord `get_batch` of every frame + the whole audio read), one process.
Target: validation costs at most 10% of a full decode.

    .venv/bin/python bench/validate.py                       # demo-sized clips and 512x512 clips
    .venv/bin/python bench/validate.py --profile 512 --entries 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import decord
import soundfile as sf
from rich.console import Console
from rich.table import Table

from fantasytalk_cli.config.schema import BucketConfig, DataConfig
from fantasytalk_cli.data.synthetic import DEMO_AUDIO, DEMO_FPS, DEMO_SIZES, write_talking_clip
from fantasytalk_cli.data.validate import ValidateOptions, validate_metadata


@dataclass(frozen=True)
class Profile:
    name: str
    sizes: tuple[tuple[int, int], ...]
    seconds: tuple[float, ...]
    buckets: BucketConfig


TARGET = 0.10  # validation time as a share of a full decode of the same clips

PROFILES = {
    # the clips `ftalk make-demo-data` writes: 96-176 px, 1-6 s, 23/25/30 fps, mixed audio formats
    "demo": Profile("demo", DEMO_SIZES, (1.5, 3.5, 6.0), BucketConfig(video_sample_size=96, video_sample_n_frames=17)),
    # training resolution: 512x512 (the default video_sample_size), 3-6 s
    "512": Profile("512", ((512, 512),), (3.0, 4.5, 6.0), BucketConfig(video_sample_n_frames=49)),
}


def make_corpus(root: Path, profile: Profile, distinct: int, entries: int) -> Path:
    """`distinct` clips, hard-linked (copied where links fail) into `entries` distinct paths; the metadata path."""
    sources = []
    for i in range(distinct):
        width, height = profile.sizes[i % len(profile.sizes)]
        rate, channels = DEMO_AUDIO[i % len(DEMO_AUDIO)]
        video, audio = root / f"src/{i}.mp4", root / f"src/{i}.wav"
        write_talking_clip(
            video,
            audio,
            width=width,
            height=height,
            fps=DEMO_FPS[i % len(DEMO_FPS)],
            seconds=profile.seconds[i % len(profile.seconds)],
            sample_rate=rate,
            channels=channels,
            seed=i,
        )
        sources.append((video, audio))
    (root / "train").mkdir()
    (root / "wav").mkdir()
    meta = []
    for n in range(entries):
        video, audio = sources[n % distinct]
        for src, dst in ((video, root / f"train/{n:06d}.mp4"), (audio, root / f"wav/{n:06d}.wav")):
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy(src, dst)
        meta.append({"file_path": f"train/{n:06d}.mp4", "audio_path": f"wav/{n:06d}.wav", "text": "A person talks."})
    path = root / "metadata_control.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


def full_decode(root: Path, count: int) -> float:
    """Seconds to decode every frame and read all audio of the first `count` entries, one process."""
    started = time.perf_counter()
    for n in range(count):
        reader = decord.VideoReader(str(root / f"train/{n:06d}.mp4"), ctx=decord.cpu(0), num_threads=1)
        reader.get_batch(list(range(len(reader)))).asnumpy()
        del reader
        sf.read(str(root / f"wav/{n:06d}.wav"), dtype="float32")
    return time.perf_counter() - started


def run_profile(profile: Profile, entries: int, distinct: int, decode_sample: int, console: Console) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"ftalk-bench-{profile.name}-"))
    try:
        meta = make_corpus(root, profile, distinct, entries)
        data = DataConfig(train_data_meta=meta, train_data_dir=root)
        timings: dict[str, float] = {}
        for workers in (1, 2):
            started = time.perf_counter()
            report = validate_metadata(data, profile.buckets, ValidateOptions(workers=workers, use_cache=False))
            timings[f"validate, {workers} worker{'s' if workers > 1 else ''}, no cache"] = time.perf_counter() - started
            assert report.entries == entries and report.errors == 0, report.summary_dict()
        cache = root / "cache.jsonl"
        validate_metadata(data, profile.buckets, ValidateOptions(workers=2, cache_path=cache))
        started = time.perf_counter()
        validate_metadata(data, profile.buckets, ValidateOptions(workers=2, cache_path=cache))
        timings["validate, warm cache"] = time.perf_counter() - started
        sample = min(decode_sample, entries)
        decode_per_clip = full_decode(root, sample) / sample
        table = Table(title=f"profile {profile.name}: {entries} entries ({distinct} distinct clips)")
        for col in ("what", "clips/s", "ms/clip", "vs full decode"):
            table.add_column(col, justify="right" if col != "what" else "left")
        for what, seconds in timings.items():
            per_clip = seconds / entries
            ratio = per_clip / decode_per_clip
            table.add_row(what, f"{1 / per_clip:,.0f}", f"{per_clip * 1000:.2f}", f"{ratio:.1%}")
        table.add_row(f"full decode ({sample} clips, 1 process)", f"{1 / decode_per_clip:,.0f}",
                      f"{decode_per_clip * 1000:.2f}", "100%")  # fmt: skip
        console.print(table)
        # like for like: one validating process against one decoding process, both without a cache
        ratio = timings["validate, 1 worker, no cache"] / entries / decode_per_clip
        verdict = "[green]met[/]" if ratio <= TARGET else "[red]missed[/]"
        console.print(f"target: validation <= {TARGET:.0%} of a full decode (1 process each): {ratio:.1%}, {verdict}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=[*PROFILES, "all"], default="all")
    parser.add_argument("--entries", type=int, default=1000, help="metadata entries (distinct hard-linked paths)")
    parser.add_argument("--distinct", type=int, default=6, help="clips actually generated")
    parser.add_argument("--decode-sample", type=int, default=100, help="entries fully decoded for the reference")
    args = parser.parse_args()
    console = Console()
    names = list(PROFILES) if args.profile == "all" else [args.profile]
    for name in names:
        run_profile(PROFILES[name], args.entries, args.distinct, args.decode_sample, console)


if __name__ == "__main__":
    main()
