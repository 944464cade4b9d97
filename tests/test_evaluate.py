"""`ftalk evaluate` and `--validation_metrics` on the tiny world: a fresh (zero) adapter's audio gaps are exactly 0
and a trained one's are not; the bootstrap interval; metrics.jsonl, the plot, the sample sheet, `best` and
`ftalk sample --checkpoint best`; the refusals; metrics during training leave the weights bitwise alone and, on 2
processes (DDP and ZeRO-3), equal a 1-process `ftalk evaluate` of the same checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from typer.testing import CliRunner

from fantasytalk_cli.checkpoints.folder import CheckpointError, named_checkpoint
from fantasytalk_cli.checkpoints.metrics import (
    MetricRow,
    RecordError,
    append_rows,
    best_checkpoint,
    read_rows,
    write_best,
)
from fantasytalk_cli.cli import app
from fantasytalk_cli.config import load_config
from fantasytalk_cli.data.synthetic import make_demo_dataset
from fantasytalk_cli.evaluate.run import EvaluateOptions, eval_context, evaluate
from fantasytalk_cli.train.audio_reliance import (
    EvaluationError,
    bootstrap_mean,
    clip_losses,
    held_out_clips,
    reliance_report,
    stratified_timesteps,
)
from fantasytalk_cli.train.loop import run_training
from fantasytalk_cli.train.model_setup import load_training_models
from tests.tiny_world import SMALL_BUCKETS, train_in_own_state, world_argv, world_config

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (kept for the session)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic clips the tiny world does not train on (another seed), with their tracks."""
    root = tmp_path_factory.mktemp("held_out") / "data"
    make_demo_dataset(root, seed=5, num_clips=3)
    return root / "metadata_control.json"


def _reliance(world: dict, held: Path, **overrides: object) -> dict:
    cfg = world_config(world, Path("unused"), **overrides)
    models = load_training_models(cfg.model, cfg.train, device=torch.device("cpu"), uniform_dtype=False)
    clips = held_out_clips(held, cfg.data, cfg.buckets, cfg.train)
    ctx = eval_context(cfg.train, cfg.model, torch.device("cpu"))
    results = clip_losses(models.transformer.eval(), models.encoders, models.wav2vec, clips, range(3), ctx,
                          timesteps=4)  # fmt: skip
    return reliance_report(results, clips.left_out).metrics


def test_a_fresh_adapter_has_exactly_zero_audio_gaps(tiny_world: dict, held_out: Path) -> None:
    """The fresh adapter's audio k/v are zero: its output is the base model's whatever the audio, so the losses with
    its own audio, another clip's and none are bitwise equal, over the latent and over the mouth."""
    metrics = _reliance(tiny_world, held_out, transformer_path=None)
    for name in ("audio_gap", "audio_off_gap", "mouth_audio_gap", "mouth_audio_off_gap"):
        found = metrics[name]
        assert (found.value, found.low, found.high, found.n) == (0.0, 0.0, 0.0, 3), name
    assert metrics["loss"].value > 0 and metrics["loss"].low < metrics["loss"].high


def test_an_adapter_that_hears_the_audio_has_non_zero_gaps(tiny_world: dict, held_out: Path) -> None:
    """The tiny world's adapter file (random, non-zero k/v) changes the prediction with the audio."""
    metrics = _reliance(tiny_world, held_out)
    assert metrics["audio_gap"].value != 0.0 and metrics["audio_off_gap"].value != 0.0
    assert metrics["mouth_audio_gap"].value != 0.0


def test_timesteps_are_stratified_and_the_bootstrap_interval_covers_the_mean() -> None:
    assert stratified_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 1.0, 400)
    found = bootstrap_mean(values)
    half = 1.96 / np.sqrt(len(values))
    assert found.value == pytest.approx(values.mean())
    assert found.low < found.value < found.high
    assert found.high - found.low == pytest.approx(2 * half, rel=0.15)  # the normal interval, roughly
    assert bootstrap_mean(values) == found  # seeded
    same = bootstrap_mean(np.full(5, 0.25))
    assert (same.value, same.low, same.high) == (0.25, 0.25, 0.25)


def test_metrics_file_best_and_named_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (2, 4, 6):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        (run / f"checkpoint-{step}" / "meta.json").write_text("{}")
    rows = [MetricRow(step=s, metric="audio_gap", value=v, checkpoint=str(run / f"checkpoint-{s}"))
            for s, v in ((2, 0.1), (4, 0.3), (6, 0.2))]  # fmt: skip
    rows += [MetricRow(step=s, metric="lse_d", value=v, checkpoint=str(run / f"checkpoint-{s}"))
             for s, v in ((2, 9.0), (4, 8.0), (6, 7.5))]  # fmt: skip
    append_rows(run, rows[:3])
    append_rows(run, rows[3:])
    assert read_rows(run) == rows
    assert best_checkpoint(rows, "audio_gap").step == 4  # larger is better
    assert best_checkpoint(rows, "lse_d").step == 6  # smaller is better
    assert best_checkpoint(rows, "lse_c") is None
    assert write_best(run, "audio_gap").step == 4
    assert (run / "best").read_text() == "checkpoint-4\n"
    assert named_checkpoint(run, "best") == run / "checkpoint-4"
    assert named_checkpoint(run, "checkpoint-2") == run / "checkpoint-2"
    with pytest.raises(CheckpointError, match="no `latest` file"):
        named_checkpoint(run, "latest")
    with pytest.raises(CheckpointError, match=r"no checkpoint 'checkpoint-9'.*checkpoint-2"):
        named_checkpoint(run, "checkpoint-9")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + "{not json\n")
    with pytest.raises(RecordError, match=r"metrics.jsonl:7: not a metrics line"):
        read_rows(run)


def test_refusals_name_the_fix(tiny_world: dict, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code != 0 and "--eval_meta HELD_OUT.json" in result.output
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--eval_meta", "x.json", "--select", "lse_c"])
    assert result.exit_code != 0 and "--syncnet" in result.output
    with pytest.raises(Exception, match="--eval_meta"):
        load_config(None, {"validation_metrics": True})
    one = tmp_path / "one"
    make_demo_dataset(one, seed=9, num_clips=1)
    cfg = world_config(tiny_world, tmp_path / "run")
    with pytest.raises(EvaluationError, match="needs at least 2"):
        held_out_clips(one / "metadata_control.json", cfg.data, cfg.buckets, cfg.train)


@pytest.mark.slow
def test_evaluate_a_trained_run_then_sample_its_best(tiny_world: dict, held_out: Path, tmp_path: Path) -> None:
    """Train from the fresh adapter with --validation_metrics, then `ftalk evaluate` the run: its rows equal the
    validation rows of the same steps, the fresh start's gaps (step 0 is not scored) become non-zero, the plot and
    the sheets are written, --select writes best, and `ftalk sample --checkpoint best` samples it. A held-out file
    that is also training data is flagged. The metrics leave the weights bitwise as a run without them."""
    steps = {"max_train_steps": 4, "checkpointing_steps": 2, "transformer_path": None, "report_to": "tensorboard"}
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    run_training(world_config(tiny_world, plain, **steps), QUIET)
    metrics = {"validation_metrics": True, "eval_meta": held_out, "validation_steps": 2, "eval_timesteps": 4}
    run_training(world_config(tiny_world, scored, **steps, **metrics), QUIET)
    for step in (2, 4):
        want = load_file(plain / f"checkpoint-{step}" / "trainable.safetensors")
        got = load_file(scored / f"checkpoint-{step}" / "trainable.safetensors")
        assert all(torch.equal(got[k], want[k]) for k in want)
    during = {(r.step, r.metric): r for r in read_rows(scored) if r.source == "validation"}
    assert {s for s, _ in during} == {2, 4} and during[(4, "audio_gap")].value != 0.0
    flags = {"eval_timesteps": 4, "transformer_path": None, **SMALL_BUCKETS}
    options = EvaluateOptions(held_out, select="audio_gap", samples=1, sample_size=64, sample_frames=9, sample_steps=1)
    report = evaluate([scored], options, flags=flags, say=lambda _: None)
    after = {(r.step, r.metric): r for r in report.rows}
    for key, row in during.items():
        assert after[key].value == pytest.approx(row.value, rel=1e-6, abs=1e-9), key
        assert (after[key].low, after[key].high) == pytest.approx((row.low, row.high), rel=1e-6, abs=1e-9)
    assert report.plot is not None and report.plot.stat().st_size > 10_000
    assert [s.parent.name for s in report.sheets] == ["checkpoint-2", "checkpoint-4"]
    assert report.best is not None and (scored / "best").read_text().strip() == Path(report.best.checkpoint).name
    assert all(json.loads(line)["metric"] for line in (scored / "metrics.jsonl").read_text().splitlines())
    # the training metadata as held-out clips: flagged
    report = evaluate([scored / "checkpoint-4"], EvaluateOptions(tiny_world["clean"], samples=0),
                      flags=flags, say=lambda _: None)  # fmt: skip
    assert any("also in the training metadata" in note for note in report.notes)
    # sample the best checkpoint
    image = report.run_dir / "eval" / "inputs" / "000.png"
    out = tmp_path / "best.mp4"
    result = CliRunner().invoke(app, [
        "sample", "--pretrained_model_name_or_path", str(tiny_world["model"]), "--adapter", str(scored),
        "--checkpoint", "best", "--image", str(image), "--audio", str(tiny_world["data"] / "wav" / "00000001.wav"),
        "--out", str(out), "--image_size", "64", "--max_num_frames", "9", "--num_inference_steps", "1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"--checkpoint best: {scored / (scored / 'best').read_text().strip()}" in result.output.replace("\n", "")
    assert out.is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "zero3"])
def test_two_process_validation_metrics_equal_a_one_process_evaluate(
    name: str, tiny_world: dict, held_out: Path, tmp_path: Path
) -> None:
    """2 processes score the 3 held-out clips (one rank 2, the other 1 and a repeat, so ZeRO-3 runs the same
    forwards on both) at steps 1 and 2: the rows equal `ftalk evaluate` of checkpoint-2 in one process, and the
    weights equal those of the same run without metrics."""
    from tests.test_distributed import STRATEGIES
    from tests.test_train_distributed import ZERO3_TEST_JSON, launch

    env = dict(STRATEGIES[name])
    if name == "zero3":
        ds = tmp_path / "zero3.json"
        ds.write_text(json.dumps(ZERO3_TEST_JSON))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(ds)
    common = {"checkpointing_steps": 2, "train_batch_size": 1, "max_train_steps": 2, "eval_timesteps": 2}
    plain, scored = tmp_path / "plain", tmp_path / "scored"
    launch(world_argv(tiny_world, plain, **common), env, tmp_path / "p1", plain / "checkpoint-2")
    metrics = {"validation_metrics": True, "eval_meta": held_out, "validation_steps": 1}
    out = launch(world_argv(tiny_world, scored, **common, **metrics), env, tmp_path / "p2", scored / "checkpoint-2")
    assert "validation metrics: step 1" in out and "validation metrics: step 2" in out
    want = load_file(plain / "checkpoint-2" / "trainable.safetensors")
    got = load_file(scored / "checkpoint-2" / "trainable.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    during = {r.metric: r for r in read_rows(scored) if r.source == "validation" and r.step == 2}
    assert during["audio_gap"].n == 3
    report = evaluate([scored / "checkpoint-2"], EvaluateOptions(held_out, samples=0),
                      flags={"eval_timesteps": 2, **SMALL_BUCKETS}, say=lambda _: None)  # fmt: skip
    after = {r.metric: r for r in report.rows}
    assert set(after) == set(during)
    for metric, row in during.items():
        assert after[metric].value == pytest.approx(row.value, rel=1e-5, abs=1e-7), metric


@pytest.mark.slow
def test_evaluate_with_a_syncnet_scores_the_reference_and_the_samples(
    tiny_world: dict, held_out: Path, tmp_path: Path
) -> None:
    """`ftalk evaluate --syncnet` with a random-weight SyncNet in syncnet_v2.model's layout: the held-out clips
    are scored as the reference row, every held-out pair is sampled and scored, clips without a face are counted
    (the scored ones and the counted ones add up to all), and --select lse_d writes best. A SyncNet of another
    layout is refused through the command, naming the keys, before any model loads or any line is written."""
    from fantasytalk_cli.evaluate.syncnet import write_random_syncnet

    run = tmp_path / "run"
    run_training(world_config(tiny_world, run, max_train_steps=1, checkpointing_steps=1, transformer_path=None), QUIET)
    syncnet = tmp_path / "syncnet_v2.model"
    write_random_syncnet(syncnet)
    flags = {"eval_timesteps": 2, "transformer_path": None, **SMALL_BUCKETS}
    options = EvaluateOptions(held_out, syncnet=syncnet, select="lse_d", sample_size=64, sample_frames=9,
                              sample_steps=1)  # fmt: skip
    report = evaluate([run], options, flags=flags, say=lambda _: None)
    for source in ("reference", "evaluate"):
        rows = {r.metric: r for r in report.rows if r.source == source}
        assert {"lse_no_face", "lse_face_frames"} <= set(rows), source
        counted = int(rows["lse_no_face"].value)
        assert rows["lse_no_face"].n == 3 and 0.0 <= rows["lse_face_frames"].value <= 1.0
        scored = rows["lse_d"].n if "lse_d" in rows else 0
        assert scored + counted == 3, source
    reference = {r.metric: r for r in report.rows if r.source == "reference"}
    # the synthetic clips' drawn faces are found by the detector: the reference row scores all three
    assert reference["lse_d"].n == 3 and reference["lse_d"].checkpoint is None
    assert np.isfinite(reference["lse_d"].value) and reference["lse_c"].value >= 0.0
    assert len(list((run / "eval").glob("checkpoint-1/*.mp4"))) == 3
    assert (run / "best").read_text().strip() == "checkpoint-1"
    written = (run / "metrics.jsonl").read_text()
    assert '"lse_d"' in written and '"reference"' in written
    # another layout, through the command: refused naming the key, nothing appended
    state = torch.load(syncnet, weights_only=True)
    state["netcnnaud.0.weight_renamed"] = state.pop("netcnnaud.0.weight")
    other = tmp_path / "other.model"
    torch.save(state, other)
    result = CliRunner().invoke(app, [
        "evaluate", str(run), "--eval_meta", str(held_out), "--syncnet", str(other)
    ])  # fmt: skip
    assert result.exit_code != 0
    said = " ".join(result.output.split())
    assert "is not a SyncNet" in said and "netcnnaud.0.weight" in said, result.output
    assert (run / "metrics.jsonl").read_text() == written


@pytest.mark.slow
def test_a_bf16_run_is_evaluated_as_it_validated(tiny_world: dict, held_out: Path, tmp_path: Path) -> None:
    """A run trained with --mixed_precision bf16 (the README's recipe) on the CPU: `ftalk evaluate` loads its frozen
    weights in bf16 and autocasts as accelerate did, so its rows equal the run's own validation rows exactly."""
    run = tmp_path / "run"
    cfg = world_config(tiny_world, run, max_train_steps=2, checkpointing_steps=2, transformer_path=None,
                       mixed_precision="bf16", validation_metrics=True, eval_meta=held_out, validation_steps=2,
                       eval_timesteps=2)  # fmt: skip
    train_in_own_state(cfg, QUIET)
    during = {r.metric: r.value for r in read_rows(run) if r.source == "validation"}
    report = evaluate([run], EvaluateOptions(held_out, samples=0), flags={"eval_timesteps": 2, **SMALL_BUCKETS},
                      say=lambda _: None)  # fmt: skip
    assert {r.metric: r.value for r in report.rows} == during and during["audio_off_gap"] != 0.0
