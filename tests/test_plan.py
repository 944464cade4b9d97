"""`ftalk plan-buckets` and the plan file: rendered table, --write / --json, staleness checks, no media opened."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.config import load_config
from fantasytalk_cli.data.metadata_write import write_entries_atomic
from fantasytalk_cli.data.plan import (
    BucketPlan,
    ClipFacts,
    PlanError,
    build_plan,
    load_plan_checked,
    read_clip_facts,
)
from fantasytalk_cli.planning.model_dims import BUILTIN_MODEL
from fantasytalk_cli.planning.report import make_plan_report
from fantasytalk_cli.planning.stats import default_world_size, plan_stats

# (width, height, num_frames, fps): 512 squares, 720p landscape, portrait, one too short, one too small
CLIPS = [(512, 512, 120, 25.0)] * 6 + [(1280, 720, 100, 30.0)] * 4 + [(720, 1280, 200, 60.0)] * 3
CLIPS += [(512, 512, 30, 25.0), (100, 100, 200, 25.0)]


def entry(i: int, w: int, h: int, n: int, fps: float, probe: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "file_path": f"videos/{i}.mp4",
        "audio_path": f"wav/{i}.wav",
        "text": "talks",
        "type": "video",
    }
    if probe:
        out["probe"] = {
            "width": w,
            "height": h,
            "num_frames": n,
            "fps": fps,
            "audio_duration": n / fps,
            "sample_rate": 16000,
            "channels": 1,
        }
    return out


@pytest.fixture
def no_media(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a video or audio file fails the test."""

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("planning opened a media file")

    import decord
    import soundfile

    monkeypatch.setattr(decord, "VideoReader", boom)
    for name in ("SoundFile", "read", "info"):
        monkeypatch.setattr(soundfile, name, boom)
    import fantasytalk_cli.data.probe as probe

    monkeypatch.setattr(probe, "open_decoder", boom)


@pytest.fixture
def meta(tmp_path: Path) -> Path:
    path = tmp_path / "metadata_clean.json"
    write_entries_atomic(path, [entry(i, *c) for i, c in enumerate(CLIPS)])
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


BASE = ["--enable_bucket", "--video_sample_n_frames", "49", "--train_batch_size", "2"]


def test_plan_buckets_renders_writes_and_is_accepted(meta: Path, tmp_path: Path, no_media: None) -> None:
    plan_file, report_file = tmp_path / "plan.json", tmp_path / "report.json"
    result = run(
        "plan-buckets", "--train_data_meta", str(meta), *BASE, "--write", str(plan_file), "--json", str(report_file)
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("512x512", "384x672", "672x384", "13,312", "too short", "too small", "steps per epoch", "padding"):
        assert text in out, text
    assert "frozen DiT weights" in out and "activations" in out
    assert plan_file.exists()
    report = json.loads(report_file.read_text())
    stats = report["stats"]
    assert stats["dropped"] == {"too short": 1, "too small": 1, "bad facts": 0}
    rows = {(r["height"], r["width"]): r for r in stats["rows"]}
    assert rows[512, 512]["samples"] == 6 and rows[512, 512]["batches_per_rank"] == 3
    assert rows[512, 512]["too_short"] == 1 and rows[512, 512]["too_small"] == 1
    assert rows[384, 672]["samples"] == 4 and rows[384, 672]["tokens"] == 13 * 24 * 42
    assert rows[672, 384]["leftover"] == 1  # 3 portrait clips, global batch 2
    assert stats["steps_per_epoch"] == 3 + 2 + 1

    cfg = load_config(overrides={"enable_bucket": True, "video_sample_n_frames": 49, "train_batch_size": 2})
    plan, warnings = load_plan_checked(
        plan_file, data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=meta
    )
    assert warnings == []
    fresh = build_plan(read_clip_facts(meta)[0], cfg.buckets, cfg.train)
    assert np.array_equal(plan.assignment(0), fresh.assignment(0))
    assert plan.dropped()["too short"].tolist() == [13] and plan.dropped()["too small"].tolist() == [14]


def test_changed_config_or_metadata_rebuilds_with_a_warning(meta: Path, tmp_path: Path, no_media: None) -> None:
    plan_file = tmp_path / "plan.json"
    assert run("plan-buckets", "--train_data_meta", str(meta), *BASE, "--write", str(plan_file)).exit_code == 0
    changed = load_config(overrides={"enable_bucket": True, "video_sample_n_frames": 101, "train_batch_size": 2})
    plan, warnings = load_plan_checked(
        plan_file, data=changed.data, buckets=changed.buckets, train=changed.train, metadata_path=meta
    )
    assert len(warnings) == 1 and "stale" in warnings[0] and "video_sample_n_frames: 49 -> 101" in warnings[0]
    assert plan.grid.frames == (101,)
    assert plan.drop_reason.tolist().count(1) == 1 + 4 + 3  # 30 frames; 100 frames; 200 at 60 fps (stride 2)

    same = load_config(overrides={"enable_bucket": True, "video_sample_n_frames": 49, "train_batch_size": 2})
    write_entries_atomic(meta, [entry(i, *c) for i, c in enumerate(CLIPS[:-1])])
    plan, warnings = load_plan_checked(
        plan_file, data=same.data, buckets=same.buckets, train=same.train, metadata_path=meta
    )
    assert len(warnings) == 1 and "metadata" in warnings[0] and plan.num_samples == len(CLIPS) - 1

    plan, warnings = load_plan_checked(
        tmp_path / "missing.json", data=same.data, buckets=same.buckets, train=same.train, metadata_path=meta
    )
    assert "cannot read the plan file" in warnings[0] and plan.num_samples == len(CLIPS) - 1


def test_world_size_change_only_warns(meta: Path, tmp_path: Path, no_media: None) -> None:
    cfg = load_config(overrides={"enable_bucket": True, "video_sample_n_frames": 49})
    plan_file = tmp_path / "plan.json"
    assert run("plan-buckets", "--train_data_meta", str(meta), "--enable_bucket", "--video_sample_n_frames", "49",
               "--write", str(plan_file), "--world-size", "2").exit_code == 0  # fmt: skip
    plan, warnings = load_plan_checked(
        plan_file, data=cfg.data, buckets=cfg.buckets, train=cfg.train, metadata_path=meta, world_size=4
    )
    assert plan.world_size == 4 and "world size 2" in warnings[0]
    assert np.array_equal(plan.assignment(0), BucketPlan.load(plan_file).assignment(0))


def test_plan_file_round_trip_and_damage(tmp_path: Path) -> None:
    facts = ClipFacts.from_lists(*zip(*CLIPS, strict=True))
    cfg = load_config(overrides={"enable_bucket": True, "random_hw_adapt": True, "video_sample_size": 768})
    plan = build_plan(facts, cfg.buckets, cfg.train, world_size=2, seed=3)
    path = tmp_path / "p.json"
    plan.save(path)
    back = BucketPlan.load(path)
    for name in ("ratio_index", "size_mask", "stride", "drop_reason"):
        assert np.array_equal(getattr(plan, name), getattr(back, name))
    assert back.grid.sizes == (512, 640, 768) and back.seed == 3 and back.world_size == 2
    for epoch in range(3):
        assert np.array_equal(plan.assignment(epoch), back.assignment(epoch))
    data = json.loads(path.read_text())
    assert set(data) >= {"config_hash", "metadata_hash", "samples", "dropped", "grid"}
    assert data["dropped"]["too short"] == [13]
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not a plan file"):
        BucketPlan.load(path)
    path.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(PlanError, match="version"):
        BucketPlan.load(path)


def test_formats_give_the_same_facts(tmp_path: Path) -> None:
    entries = [entry(i, *c) for i, c in enumerate(CLIPS)]
    facts = []
    for name in ("m.json", "m.jsonl", "m.csv"):
        write_entries_atomic(tmp_path / name, entries)
        facts.append(read_clip_facts(tmp_path / name)[0])
    for other in facts[1:]:
        for field in ("width", "height", "num_frames", "fps"):
            assert np.array_equal(getattr(facts[0], field), getattr(other, field))


def test_entries_without_facts_need_validate_metadata(tmp_path: Path, no_media: None) -> None:
    path = tmp_path / "raw.json"
    write_entries_atomic(path, [entry(0, *CLIPS[0]), entry(1, *CLIPS[0], probe=False)])
    with pytest.raises(PlanError, match="validate-metadata --write-clean"):
        read_clip_facts(path, probe_missing=False)


def test_entries_without_facts_are_probed(tmp_path: Path) -> None:
    from fantasytalk_cli.data.synthetic import make_demo_dataset

    make_demo_dataset(tmp_path / "demo", seed=0, num_clips=2)
    meta = tmp_path / "demo" / "metadata_control.json"
    facts, notes = read_clip_facts(meta)  # relative paths: joined to the metadata file's folder
    assert (facts.width > 0).all() and (facts.num_frames > 0).all() and "4 files probed" in notes[0]
    again, notes = read_clip_facts(meta)  # the probe cache beside the metadata answers
    assert "nothing probed" in notes[0] and np.array_equal(again.num_frames, facts.num_frames)


def test_cli_errors_are_usage_errors(tmp_path: Path) -> None:
    result = run("plan-buckets")
    assert result.exit_code == 2 and "train_data_meta" in result.output
    result = run("plan-buckets", "--train_data_meta", str(tmp_path / "nope.json"))
    assert result.exit_code == 2 and "cannot read" in result.output


def test_nothing_trainable_exits_1(meta: Path, no_media: None) -> None:
    result = run("plan-buckets", "--train_data_meta", str(meta), "--video_sample_n_frames", "401")
    assert result.exit_code == 1 and "15 too short" in result.output


def test_stats_of_random_sizes_match_assignment(meta: Path) -> None:
    cfg = load_config(overrides={"enable_bucket": True, "random_hw_adapt": True, "video_sample_size": 1024,
                                 "training_with_video_token_length": True, "video_sample_n_frames": 49})  # fmt: skip
    facts, _ = read_clip_facts(meta)
    plan = build_plan(facts, cfg.buckets, cfg.train)
    stats = plan_stats(plan, cfg.buckets, facts=facts)
    assert sum(r.samples for r in stats.rows) == int((plan.assignment(0) >= 0).sum())
    for row in stats.rows:
        assert row.tokens * row.frames and row.height % 16 == 0 and row.width % 16 == 0
        assert row.frames * row.size**2 <= 49 * 512 * 512  # never above the token budget


def test_build_plan_from_loaded_entries(meta: Path) -> None:
    from fantasytalk_cli.data.metadata import load_entries

    cfg = load_config(overrides={"enable_bucket": True, "video_sample_n_frames": 49})
    from_entries = build_plan(load_entries(meta), cfg.buckets, cfg.train)
    from_arrays = build_plan(read_clip_facts(meta)[0], cfg.buckets, cfg.train)
    assert np.array_equal(from_entries.assignment(0), from_arrays.assignment(0))


def test_default_world_size() -> None:
    assert default_world_size({}) == 1
    assert default_world_size({"WORLD_SIZE": "8"}) == 8
    assert default_world_size({"WORLD_SIZE": "x"}) == 1


def test_memory_estimate_uses_the_configured_model(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    """plan-buckets estimates the model of `--pretrained_model_name_or_path` (here the tiny world's, read by the
    loaders' own config reader), and says when it falls back to the built-in 14B config."""
    from fantasytalk_cli.models.dims import TINY_CONFIG, WAN21_I2V_14B_CONFIG
    from fantasytalk_cli.planning.model_size import transformer_params
    from tests.tiny_world import world_config

    cfg = world_config(tiny_world, tmp_path / "run")
    tiny = make_plan_report(cfg, world_size=1).memory
    assert tiny is not None
    config_json = tiny_world["model"] / "config.json"
    assert tiny.model == f"{config_json} (original layout)"
    frozen = next(t for t in tiny.terms if t.name == "frozen DiT weights")
    assert frozen.bytes == transformer_params(TINY_CONFIG)[0] * 4  # fp32 (mixed_precision no)
    assert f"model dims from {config_json}" in "\n".join(tiny.lines())

    builtin_cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained_model_name_or_path": None})})
    builtin = make_plan_report(builtin_cfg, world_size=1)
    assert builtin.memory is not None and builtin.memory.model == BUILTIN_MODEL
    assert any("no --pretrained_model_name_or_path" in note and "14B" in note for note in builtin.notes)
    big = next(t for t in builtin.memory.terms if t.name == "frozen DiT weights")
    assert big.bytes == transformer_params(WAN21_I2V_14B_CONFIG)[0] * 4
    assert tiny.total_bytes < builtin.memory.total_bytes

    flags = ["--train_data_meta", str(tiny_world["clean"]), "--pretrained_model_name_or_path", str(tiny_world["model"])]
    result = run("plan-buckets", *flags, "--video_sample_size", "48", "--video_sample_n_frames", "9")
    assert result.exit_code == 0, result.output
    assert "model dims from" in result.output and "no --pretrained_model_name_or_path" not in result.output


def test_unreadable_model_folder_falls_back_with_a_note(meta: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    cfg = load_config(overrides={"train_data_meta": meta, "pretrained_model_name_or_path": tmp_path / "empty"})
    report = make_plan_report(cfg, world_size=1)
    assert report.memory is not None and report.memory.model == BUILTIN_MODEL
    assert any("cannot read the transformer config" in note for note in report.notes)


def test_memory_estimate_reads_a_diffusers_layout_folder(meta: Path, tmp_path: Path) -> None:
    from fantasytalk_cli.models.dims import TINY_CONFIG
    from fantasytalk_cli.models.tiny import make_tiny_model
    from fantasytalk_cli.planning.model_size import transformer_params

    make_tiny_model(tmp_path / "model", "diffusers")
    cfg = load_config(overrides={"train_data_meta": meta, "pretrained_model_name_or_path": tmp_path / "model"})
    report = make_plan_report(cfg, world_size=1)
    assert report.memory is not None
    assert report.memory.model == f"{tmp_path / 'model' / 'transformer' / 'config.json'} (diffusers layout)"
    frozen = next(t for t in report.memory.terms if t.name == "frozen DiT weights")
    assert frozen.bytes == transformer_params(TINY_CONFIG)[0] * 2  # bf16 by default
    assert any("released Wan2.1" in note for note in report.notes)  # the encoders are not read from the folder
