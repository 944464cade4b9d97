"""`ftalk cache` and `train --cache_dir` on the tiny world: a cached run trains to the same weights as an online
one without loading the encoders; a changed caption or audio file re-encodes only what it affects; an interrupted
cache run resumes without recomputing finished entries; a missing or corrupt entry is computed online and counted,
or refused with --cache_required; processes split the work and the cache is their union."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from fantasytalk_cli.cache.build import build_cache
from fantasytalk_cli.cache.store import RANK_LOCK, CacheError, CacheStore
from fantasytalk_cli.cli import app
from fantasytalk_cli.config.flags import expand_multi_value_flags
from fantasytalk_cli.data.metadata import load_entries
from fantasytalk_cli.data.metadata_write import write_entries_atomic
from fantasytalk_cli.data.synthetic import METADATA_NAME
from fantasytalk_cli.data.validate import ValidateOptions, validate_metadata
from fantasytalk_cli.planning.report import make_plan_report
from tests.tiny_world import world_argv, world_config


@pytest.fixture()
def world(tiny_world: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """The tiny world with its own copy of the data (the tests change captions and audio files)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_world["data"], data)
    return {**tiny_world, "data": data, "clean": data / "clean.json"}


def _cache(world: dict[str, Path], cache: Path, **overrides: object):  # noqa: ANN202
    cfg = world_config(world, world["root"] / "unused", cache_dir=cache, **overrides)
    return build_cache(cfg)


def _train(world: dict[str, Path], run: Path, *extra: str, **overrides: object) -> str:
    steps = overrides.pop("max_train_steps", 3)
    argv = ["train", *world_argv(world, run, max_train_steps=steps, checkpointing_steps=steps, **overrides), *extra]
    result = CliRunner().invoke(app, expand_multi_value_flags(argv))
    assert result.exit_code == 0, result.output
    return result.output


def test_cached_run_equals_the_online_run_without_the_encoders(world: dict[str, Path], tmp_path: Path) -> None:
    report = _cache(world, tmp_path / "cache")
    assert report.computed["video"] == report.items > 0 and not report.failed
    out = _train(world, tmp_path / "cached", cache_dir=tmp_path / "cache")
    assert "not loading the encoders of audio, text, video" in out
    assert "cache misses, computed online" in out and "│ none" in out
    _train(world, tmp_path / "online")
    cached = load_file(tmp_path / "cached" / "checkpoint-3" / "trainable.safetensors")
    online = load_file(tmp_path / "online" / "checkpoint-3" / "trainable.safetensors")
    for name, want in online.items():
        torch.testing.assert_close(cached[name], want, rtol=0, atol=1e-6)


def test_changed_caption_or_audio_recomputes_only_what_it_affects(world: dict[str, Path], tmp_path: Path) -> None:
    first = _cache(world, tmp_path / "cache")
    entries = load_entries(world["clean"])
    changed = [entries[0].__class__(**{**entries[0].__dict__, "text": "A new caption."}), *entries[1:]]
    write_entries_atomic(world["clean"], changed)
    again = _cache(world, tmp_path / "cache")
    assert (again.computed["text"], again.computed["audio"], again.computed["video"]) == (1, 0, 0)
    assert again.reused["video"] == first.items
    audio = world["data"] / entries[1].audio_path
    samples, rate = soundfile.read(audio, dtype="float32")
    soundfile.write(audio, np.ascontiguousarray(samples[::-1]), rate)  # same length, other content
    third = _cache(world, tmp_path / "cache")
    windows_of_clip_1 = sum(1 for line in CacheStore(tmp_path / "cache").manifest()
                            if line["kind"] == "video" and line["entry"] == 1)  # fmt: skip
    assert (third.computed["text"], third.computed["audio"], third.computed["video"]) == (0, windows_of_clip_1, 0)


def test_interrupted_cache_run_resumes_and_corrupt_entries_are_recomputed(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, writes = CacheStore.write, []

    def killed_after_five(self: CacheStore, *args: object, **kwargs: object) -> Path:
        if len(writes) == 5:
            raise KeyboardInterrupt  # as a kill between two entries: every written entry is whole
        writes.append(1)
        return real_write(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(CacheStore, "write", killed_after_five)
    with pytest.raises(KeyboardInterrupt):
        _cache(world, tmp_path / "cache")
    monkeypatch.setattr(CacheStore, "write", real_write)
    assert not list((tmp_path / "cache").rglob("*.tmp"))
    resumed = _cache(world, tmp_path / "cache")
    assert sum(resumed.reused.values()) == 5
    total = sum(resumed.computed.values()) + 5
    victim = next((tmp_path / "cache" / "video").rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    repaired = _cache(world, tmp_path / "cache")
    assert sum(repaired.computed.values()) == 1 and sum(repaired.reused.values()) == total - 1
    assert len(repaired.corrupt) == 1 and victim.name in repaired.corrupt[0]


def test_missing_entry_is_computed_online_or_refused(world: dict[str, Path], tmp_path: Path) -> None:
    report = _cache(world, tmp_path / "cache")
    next((tmp_path / "cache" / "video").rglob("*.safetensors")).unlink()
    out = _train(world, tmp_path / "run", cache_dir=tmp_path / "cache", max_train_steps=report.items)  # one epoch
    assert f"video {report.items - 1}/{report.items}" in out  # the coverage, before anything loads
    assert "not loading the encoders of audio, text (" in out  # the VAE and CLIP are needed for the missing one
    assert re.search(r"cache misses, computed online\s*│\s*video 1", out)
    argv = ["train", *world_argv(world, tmp_path / "strict", max_train_steps=3, cache_dir=tmp_path / "cache",
                                 cache_required=True)]  # fmt: skip
    result = CliRunner().invoke(app, expand_multi_value_flags(argv))
    assert result.exit_code != 0 and "--cache_required" in result.output and "video 5/6" in result.output
    assert not (tmp_path / "strict").exists()  # refused before the run folder was made


def test_processes_split_the_work(world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reports = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        reports.append(_cache(world, tmp_path / "cache"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    single = _cache(world, tmp_path / "single")
    assert sum(r.items for r in reports) == single.items
    assert sum(r.computed["video"] for r in reports) == single.computed["video"]
    assert {line["file"] for line in CacheStore(tmp_path / "cache").manifest()} == {
        line["file"] for line in CacheStore(tmp_path / "single").manifest()
    }
    # one merged manifest, written by the process that finished last, equal to the 1-process one
    assert reports[0].merged is None and reports[1].merged == tmp_path / "cache" / "manifest.json"
    assert single.merged is not None
    merged = json.loads(reports[1].merged.read_text())
    assert merged == json.loads(single.merged.read_text()) and sum(merged["counts"].values()) == len(merged["entries"])


def test_plan_shows_coverage_and_leaves_cached_encoders_out_of_the_memory(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cfg = world_config(world, world["root"] / "unused", cache_dir=tmp_path / "cache")
    without = make_plan_report(cfg.model_copy(update={"data": cfg.data.model_copy(update={"cache_dir": None})}))
    assert any("no feature cache" in n for n in make_plan_report(cfg).notes)
    _cache(world, tmp_path / "cache")
    report = make_plan_report(cfg)
    assert any(n.startswith("feature cache: text") and "video 6/6" in n for n in report.notes), report.notes
    assert report.memory is not None and without.memory is not None
    names = {term.name for term in report.memory.terms}
    assert report.memory.total_bytes < without.memory.total_bytes and "frozen encoders" in names
    assert "none" in next(t.formula for t in report.memory.terms if t.name == "frozen encoders")


@pytest.mark.slow
def test_cache_run_killed_mid_way_resumes_without_recomputing(world: dict[str, Path], tmp_path: Path) -> None:
    """A real SIGKILL of `ftalk cache` after some entries are written: no partial file is left, and the next run
    reuses every entry the killed one finished (counted) and computes only the rest."""
    cache = tmp_path / "cache"
    argv = [sys.executable, "-m", "fantasytalk_cli", "cache",
            *world_argv(world, world["root"] / "unused", cache_dir=cache)]  # fmt: skip
    proc = subprocess.Popen(expand_multi_value_flags(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = cache / "manifest-rank0.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_text().count("\n") >= 1:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the cache run ended before it could be killed"
    lock = cache / RANK_LOCK.format(rank=0)  # the killed process's lock file stays: the OS released its lock
    partial = [p for p in cache.rglob("*") if p.is_file() and p.suffix not in (".safetensors", ".jsonl", ".json")]
    assert partial in ([], [lock])
    finished = sum(1 for _ in cache.rglob("*.safetensors"))
    resumed = _cache(world, cache)
    assert sum(resumed.reused.values()) == finished >= 1
    whole = _cache(world, tmp_path / "whole")  # the same run, never killed
    assert sum(resumed.computed.values()) + finished == sum(whole.computed.values())


def test_train_refuses_a_cache_dir_without_a_cache(world: dict[str, Path], tmp_path: Path) -> None:
    argv = ["train", *world_argv(world, tmp_path / "run", max_train_steps=1, cache_dir=tmp_path / "typo")]
    result = CliRunner().invoke(app, expand_multi_value_flags(argv))
    assert result.exit_code != 0 and "no feature cache there" in result.output and "ftalk cache" in result.output
    assert not (tmp_path / "typo").exists() and not (tmp_path / "run").exists()


def test_validation_with_a_complete_cache_keeps_the_encoders(
    world: dict[str, Path], tmp_path: Path, sample_inputs: dict[str, Path]
) -> None:
    _cache(world, tmp_path / "cache")
    validation = {
        "validation_image_paths": [sample_inputs["image"]],
        "validation_audio_paths": [sample_inputs["audio"]],
        "validation_num_inference_steps": 1,
        "validation_image_size": 64,
        "validation_max_num_frames": 5,
    }
    out = _train(world, tmp_path / "run", cache_dir=tmp_path / "cache", max_train_steps=1, **validation)
    assert "the encoders stay loaded for validation (--validation_image_paths" in out
    assert len(list((tmp_path / "run" / "samples" / "step-1").glob("*.mp4"))) == 1


def test_processes_on_raw_metadata_read_the_probe_cache(
    world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several processes on the raw metadata (no probe facts in it) never probe: they read the probe cache that
    `validate-metadata` fills, and refuse, naming that command, when it lacks entries."""
    raw = world["data"] / METADATA_NAME
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CacheError, match=r"lack probe facts.*ftalk validate-metadata"):
        _cache(world, tmp_path / "cache", train_data_meta=raw)  # the copied data's files are not in the probe cache
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    cfg = world_config(world, world["root"] / "unused", train_data_meta=raw)
    assert validate_metadata(cfg.data, cfg.buckets, ValidateOptions(workers=1)).ok  # fills the probe cache
    report = _cache(world, tmp_path / "cache", train_data_meta=raw)
    assert report.items > 0 and any("read from the probe cache" in note for note in report.notes)


def test_whole_clip_features_do_not_slice_into_a_window(world: dict[str, Path]) -> None:
    """Why audio is cached per frame window, not once per clip and sliced: wav2vec2 normalises its input per call
    and attends over all of it, so the whole clip's features cut to a window's time span are not the features of
    that window's audio. At 25 fps a frame is exactly two hops of 320 samples, the best case for slicing: still
    about 24% relative on the tiny model (a slice would have to hold to ~1e-6 for the cached step to equal the
    online one)."""
    from fantasytalk_cli.models.audio import SAMPLE_RATE, Wav2Vec2Features, read_audio_for_frames
    from fantasytalk_cli.models.dit_config import find_wav2vec

    cfg = world_config(world, world["root"] / "unused")
    wav2vec = Wav2Vec2Features.from_pretrained(find_wav2vec(cfg.model), dtype=torch.float32)
    entry = next(e for e in load_entries(world["clean"]) if e.probe and e.probe.fps == 25 and e.probe.num_frames >= 40)
    audio_path = cfg.data.media_root() / entry.audio_path  # type: ignore[operator]
    fps, start, frames = entry.probe.fps, 16, 17  # type: ignore[union-attr]
    whole = read_audio_for_frames(audio_path, 0, entry.probe.num_frames, 1, fps)  # type: ignore[union-attr]
    window = read_audio_for_frames(audio_path, start, frames, 1, fps)
    with torch.no_grad():
        cut = wav2vec(window)[0]
        full = wav2vec(whole)[0]
    offset = round(start / fps * SAMPLE_RATE) // 320  # wav2vec2's hop: token k starts at sample 320 k
    sliced = full[offset : offset + cut.shape[0]]
    assert sliced.shape == cut.shape
    relative = ((sliced - cut).norm() / cut.norm()).item()
    assert relative > 0.01, relative


def test_read_ahead_threads_write_the_same_cache(world: dict[str, Path], tmp_path: Path) -> None:
    """`--dataloader_num_workers 2`: two threads decode, read and hash ahead of the encoders; every entry (its
    tensors bitwise, its metadata) and the merged manifest are those of the cache written without them."""
    inline = _cache(world, tmp_path / "inline", dataloader_num_workers=0)
    ahead = _cache(world, tmp_path / "ahead", dataloader_num_workers=2)
    assert any("2 threads" in note for note in ahead.notes) and ahead.computed == inline.computed

    def entries(root: Path) -> list[Path]:
        return sorted(p.relative_to(root) for p in root.rglob("*.safetensors"))

    names = entries(tmp_path / "inline")
    assert names and names == entries(tmp_path / "ahead")
    for name in names:
        with (
            safe_open(str(tmp_path / "inline" / name), "pt") as a,
            safe_open(str(tmp_path / "ahead" / name), "pt") as b,
        ):
            assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys()), name
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys()), name  # noqa: SIM118
    merged = [json.loads((tmp_path / folder / "manifest.json").read_text()) for folder in ("inline", "ahead")]
    assert merged[0] == merged[1]
