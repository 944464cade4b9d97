"""`--validation_metrics`: `ftalk evaluate`'s audio reliance on the held-out clips (`--eval_meta`), computed with
the live weights every `validation_steps` and at the end, into ``output_dir/metrics.jsonl`` and TensorBoard.

Every rank scores its share of the clips (clip i on rank i mod world; the last clip repeated where a rank has fewer,
so sharded strategies run the same number of forwards everywhere) and the main rank gathers and reports them. A
clip's numbers depend on the clip alone (`train/audio_reliance.py`), so a 2-process validation equals a 1-process
`ftalk evaluate` of the same step's checkpoint. The forwards run in ``no_grad``, in eval mode, inside
`torch.random.fork_rng`, and draw only from generators of their own: a run with metrics ends on the same weights,
bit for bit, as one without.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fantasytalk_cli.checkpoints.folder import checkpoint_dir, is_complete
from fantasytalk_cli.checkpoints.metrics import MetricRow, append_rows
from fantasytalk_cli.config.schema import BucketConfig, DataConfig, TrainConfig
from fantasytalk_cli.data.entry_facts import Share
from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.train.audio_reliance import EvaluationError, HeldOut, clip_losses, held_out_clips, reliance_report
from fantasytalk_cli.train.distributed import gather_objects

if TYPE_CHECKING:
    from collections.abc import Callable

    from fantasytalk_cli.train.model_setup import TrainingModels
    from fantasytalk_cli.train.setup import Run


def check_validation_metrics(
    data: DataConfig, buckets: BucketConfig, train: TrainConfig, world: World, share: Share, say: Callable[..., None]
) -> HeldOut | None:
    """The held-out clips, read, probed (main rank, shared) and planned at set-up, or None without the flag."""
    if not train.validation_metrics:
        return None
    assert data.eval_meta is not None  # the config refuses --validation_metrics without it
    held = held_out_clips(data.eval_meta, data, buckets, train, world=world, share=share, say=say)
    say(f"validation metrics: {len(held.batches)} held-out clips of {data.eval_meta} ({held.tracked} with a track)")
    return held


def check_encoders(models: TrainingModels) -> None:
    """Held-out clips are not in the feature cache: the run must hold every encoder to score them."""
    missing = [name for name in ("vae", "text", "image") if getattr(models.encoders, name) is None]
    if models.wav2vec is None:
        missing.append("audio")
    if missing:
        raise EvaluationError(
            f"--validation_metrics needs the encoders this cached run leaves unloaded ({', '.join(missing)}): "
            "drop --validation_metrics and score the checkpoints with `ftalk evaluate` afterwards"
        )


def metrics_due(run: Run, step: int) -> bool:
    every = run.train.validation_steps
    return run.metrics is not None and (step >= run.max_steps or (every is not None and step % every == 0))


def score_held_out(run: Run, step: int) -> list[MetricRow]:
    """Audio reliance of the live weights (collective: every rank calls it). Rows on the main rank."""
    held = run.metrics
    assert held is not None
    count, world, rank = len(held.batches), run.world.dp_size, run.world.dp_rank
    mine = [rank + world * i for i in range(math.ceil(count / world))]
    positions = [p if p < count else count - 1 for p in mine]
    model = run.transformer
    was_training = model.training
    model.eval()
    devices = [run.accelerator.device] if run.accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        scored = clip_losses(model, run.models.encoders, run.models.wav2vec, held, positions, run.ctx,
                             timesteps=run.train.eval_timesteps)  # fmt: skip
    model.train(was_training)
    kept = [result for result, p in zip(scored, mine, strict=True) if p < count]
    everything = [result for part in gather_objects(run.accelerator, kept) for result in part]
    if not run.main:
        return []
    report = reliance_report(everything, held.left_out)
    folder = checkpoint_dir(run.checkpoint.output_dir, step)
    checkpoint = str(folder) if is_complete(folder) else None
    rows = report.rows(step, checkpoint, "validation")
    append_rows(run.checkpoint.output_dir, rows)
    if run.train.report_to != "none":
        run.accelerator.log({f"eval/{row.metric}": row.value for row in rows}, step=step)
    gap = report.metrics["audio_gap"]
    run.say(
        f"validation metrics: step {step}, loss {report.metrics['loss'].value:.4f}, audio gap {gap.value:+.5f} "
        f"[{gap.low:+.5f}, {gap.high:+.5f}] on {report.clips} held-out clips"
    )
    return rows
