"""`ftalk train`: the training loop, in torchtitan's shape. `train()` iterates optimizer steps (step, maybe
save, maybe stop); beside it one function per concern: the batch stream (epochs and the exact-resume
position), sharing failed clips across ranks, one micro-step with the NaN stand-in, the update (clip, finite
check, step or skip), recording a step (streak, throughput, progress, log line). The set-up is `setup.py`,
the domain math `step.training_step`, what differs between DDP, DeepSpeed and FSDP `distributed.py`.

NaN/inf, the same rule in every strategy: a micro-batch whose loss is non-finite on any rank gives no
gradient (every rank backpropagates `zero_gradient_loss` instead, so collectives, FSDP/ZeRO hooks and
DeepSpeed's micro-step count go on as for any batch). A step with no finite micro-batch loss, or with a
non-finite gradient norm (the outlier guard turns NaN predictions into a finite loss), makes no update:
weights, optimizer state and learning rate stay as they were; it is counted, and `max_consecutive_nonfinite`
of them in a row abort. DeepSpeed steps inside `backward`: there a step with no finite loss is backpropagated
as a mid-window micro-step (its zero gradients join the next window), and ZeRO's own overflow check drops a
non-finite gradient. Under fp16 an overflowing gradient is the loss scaler's to skip (it lowers its scale);
that is not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object
from rich.console import Console

from fantasytalk_cli.checkpoints.folder import CheckpointMeta
from fantasytalk_cli.config.schema import FtalkConfig
from fantasytalk_cli.train.checkpoint import save_training_checkpoint
from fantasytalk_cli.train.display import Display, Meter
from fantasytalk_cli.train.distributed import backward
from fantasytalk_cli.train.setup import Run, TrainingError, build_optimizer, set_up, versions
from fantasytalk_cli.train.state import RunState, TrainSummary, render_summary
from fantasytalk_cli.train.step import StepOutput, training_step, zero_gradient_loss
from fantasytalk_cli.train.stop import StopFlag
from fantasytalk_cli.train.validation import due, validate
from fantasytalk_cli.train.validation_metrics import metrics_due, score_held_out

__all__ = ["RunState", "TrainSummary", "TrainingError", "build_optimizer", "render_summary", "run_training"]


def run_training(cfg: FtalkConfig, console: Console | None = None) -> TrainSummary:
    """Train per `cfg`; returns what happened. Raises a `FtalkError` with a user-facing message."""
    t0 = time.perf_counter()
    with StopFlag() as stop:  # before anything slow: a signal during set-up also ends in a clean stop
        run = set_up(cfg, console or Console())
        try:
            summary = train(run, stop)
        finally:
            if run.lock is not None:
                run.lock.release()
    summary.seconds = time.perf_counter() - t0
    return summary


@dataclass
class Window:
    """One optimizer step's micro-batches: their finite losses, and whether the step updated the weights."""

    loss: torch.Tensor
    finite: int = 0
    updated: bool = False


def train(run: Run, stop: StopFlag) -> TrainSummary:
    """Optimizer steps until `max_steps` or a signal; a checkpoint every `checkpointing_steps` and at the end."""
    state, every = run.state, run.checkpoint.checkpointing_steps
    summary = TrainSummary(run.checkpoint.output_dir, state.step, state.epoch, main=run.main)
    summary.notes = list(run.models.notes)
    meter = Meter(first_step=state.step)
    batches = batch_stream(run, meter)
    last_saved = state.step  # nothing to save before the first step (or at the one resumed from)
    stopping = run.any_rank(stop.signal is not None)  # a signal during set-up: stop before the first step
    with Display(run) as display:
        while state.step < run.max_steps and not stopping:
            window = optimizer_step(run, batches, meter)
            record_step(run, window, meter, summary, display)
            stopping = run.any_rank(stop.signal is not None)
            if state.step % every == 0 or stopping or state.step >= run.max_steps:
                save(run, summary)
                last_saved = state.step
            if due(run, state.step) and not stopping:
                summary.samples += validate(run, run.validation, state.step)  # type: ignore[arg-type]
            if metrics_due(run, state.step) and not stopping:
                score_held_out(run, state.step)
    batches.close()
    if stopping:
        summary.stopped_by = stop.signal or "signal on another rank"
        run.say(f"stopped by {summary.stopped_by} at step {state.step}")
    if last_saved != state.step:
        save(run, summary)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return finish(run, summary)


def batch_stream(run: Run, meter: Meter) -> Iterator[dict[str, Any]]:
    """Planned batches across epochs from the exact-resume position (the sampler skips the batches a
    resumed epoch already trained on). A batch some rank lost entirely is skipped by every rank."""
    state = run.state
    while True:
        state.sampler.set_epoch(state.epoch)
        t_wait = time.perf_counter()
        for batch in run.loader:
            meter.wait_s += time.perf_counter() - t_wait
            run.cache_misses.update(batch.get("cache_misses") or {})
            if share_failures(run, batch):
                yield batch
            else:
                state.consumed += 1
            t_wait = time.perf_counter()
        state.epoch += 1  # the epoch ran out: the next one
        state.consumed = 0


def share_failures(run: Run, batch: dict[str, Any]) -> bool:
    """Log the clips this rank could not load (once per entry, however many epochs meet it), share them so
    every rank holds the same set and takes the same decision (a lone rank raising would leave the others
    hanging), apply `bad_sample_policy`; True when every rank has data to step on."""
    state, acc, data = run.state, run.accelerator, run.data
    new = [f for f in batch["failures"] if f.index not in state.failed_entries]
    for failure in new:
        run.tell(
            f"[yellow]rank {run.world.dp_rank}: skipped[/] entry {failure.index} ({failure.path}): {failure.reason}"
        )
    counts = torch.tensor([float(bool(batch["indices"])), len(new)], device=acc.device)
    ranks_with_data, new_failures = acc.reduce(counts, reduction="sum").tolist()
    if new_failures:
        shared = gather_object([(f.index, f.path, f.reason) for f in new])
        state.failed_entries.update(index for index, _, _ in shared)
        if data.bad_sample_policy == "fail":
            index, path, reason = shared[0]
            raise TrainingError(
                f"entry {index} ({path}) failed to load: {reason}; fix or drop it (`ftalk validate-metadata`), "
                "or train with --bad_sample_policy skip"
            )
        if len(state.failed_entries) > data.max_bad_sample_fraction * run.num_entries:
            raise TrainingError(
                f"{len(state.failed_entries)} clips failed to load, more than max_bad_sample_fraction="
                f"{data.max_bad_sample_fraction} of {run.num_entries}: run `ftalk validate-metadata`"
            )
    return ranks_with_data == run.world.processes


def optimizer_step(run: Run, batches: Iterator[dict[str, Any]], meter: Meter) -> Window:
    """Micro-batches until accelerate's accumulation window closes (the last one updates the weights)."""
    window = Window(loss=torch.zeros((), device=run.accelerator.device))
    while True:
        batch = next(batches)
        t_got = time.perf_counter()
        out = micro_step(run, batch, window)
        meter.samples += out.samples * run.world.processes
        meter.tokens += out.tokens * run.world.processes
        meter.compute_s += time.perf_counter() - t_got
        if run.accelerator.sync_gradients:
            return window


def micro_step(run: Run, batch: dict[str, Any], window: Window) -> StepOutput:
    """Forward and backward of one micro-batch (the NaN stand-in where any rank's loss is not finite); at the
    window's end, the update."""
    acc, state = run.accelerator, run.state
    with acc.accumulate(run.transformer):
        out = training_step(run.transformer, run.models.encoders, run.models.wav2vec, batch, run.ctx, state.micro_step)
        if not run.any_rank(not torch.isfinite(out.loss).item()):
            loss = out.loss
            window.loss += loss.detach()
            window.finite += 1
        else:
            out.loss = out.loss.detach()  # its graph goes before the stand-in's is built
            loss = zero_gradient_loss(run.transformer, out.inputs, run.ctx)
        window.updated = acc.sync_gradients and window.finite > 0
        backward(acc, loss, skip_update=acc.sync_gradients and not window.updated)
        if window.updated:
            window.updated = update(run)
        run.optimizer.zero_grad(set_to_none=True)
    state.micro_step += 1
    state.consumed += 1
    state.outliers += out.outliers
    return out


def update(run: Run) -> bool:
    """Clip, and step the optimizer and the schedule unless the gradient norm is not finite (False then).
    The norm is wanted even without clipping (max_norm inf): NaN gradients skip the update."""
    acc = run.accelerator
    norm = acc.clip_grad_norm_(run.transformer.parameters(), run.train.max_grad_norm or math.inf)
    if norm is not None and not math.isfinite(float(norm)) and acc.mixed_precision != "fp16":
        return False
    run.optimizer.step()
    run.lr_scheduler.step()
    return True


def record_step(run: Run, window: Window, meter: Meter, summary: TrainSummary, display: Display) -> None:
    """Count the step; the loss logged is the mean over the window's finite micro-batches and all ranks; a
    skipped update extends the streak that aborts at `max_consecutive_nonfinite`."""
    state, train_cfg = run.state, run.train
    state.step += 1
    loss = run.accelerator.reduce(window.loss / max(window.finite, 1), reduction="mean").item()
    if window.finite:
        summary.losses.append(loss)
    else:
        loss = math.nan
    if window.updated:
        meter.nonfinite_streak = 0
    else:
        meter.nonfinite_streak += 1
        state.nonfinite_skipped += 1
        run.say(f"[yellow]step {state.step}: non-finite loss or gradient, update skipped[/]")
        if meter.nonfinite_streak >= train_cfg.max_consecutive_nonfinite:
            raise TrainingError(
                f"{meter.nonfinite_streak} steps in a row had a NaN/inf loss or gradient: lower --learning_rate, "
                "check the data (`ftalk validate-metadata`), or resume from an earlier checkpoint"
            )
    elapsed = max(meter.wait_s + meter.compute_s, 1e-9)
    logs = {
        "loss": loss,
        "lr": run.lr_scheduler.get_last_lr()[0],
        "samples_per_s": meter.samples / elapsed,
        "tokens_per_s": meter.tokens / elapsed,
        "data_wait_share": meter.wait_s / elapsed,
    }
    if train_cfg.report_to != "none":
        run.accelerator.log(logs, step=state.step)
    display.show(state.step, logs, meter)


def save(run: Run, summary: TrainSummary) -> None:
    """A checkpoint of this step (collective)."""
    state, acc, ckpt = run.state, run.accelerator, run.checkpoint
    meta = CheckpointMeta(
        step=state.step,
        epoch=state.epoch,
        config_hash=run.config_hash,
        config=run.config_dump,
        strategy=run.strategy.label,
        world_size=run.world.dp_size,
        versions=versions(),
    )
    folder = save_training_checkpoint(
        acc, run.transformer, run.strategy, ckpt.output_dir, meta, ckpt.checkpoints_total_limit,
        state.state_dict(),
    )  # fmt: skip
    summary.checkpoints.append(folder)
    run.say(f"saved {folder}")


def finish(run: Run, summary: TrainSummary) -> TrainSummary:
    """The counters the summary reports."""
    state = run.state
    summary.steps = state.step
    summary.epochs_started = state.epoch + 1
    summary.nonfinite_skipped = state.nonfinite_skipped
    summary.failed_entries = sorted(state.failed_entries)
    summary.outliers = state.outliers
    summary.cache_misses = dict(run.cache_misses) if run.data.cache_dir is not None else None
    return summary
