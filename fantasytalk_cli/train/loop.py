"""`ftalk train`: the training loop. Linear on purpose; the domain math lives in `step.training_step`,
the distributed set-up in `distributed`, the checkpoint files in `checkpoint`."""

from __future__ import annotations

import dataclasses
import functools
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from diffusers.optimization import get_scheduler
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fantasytalk_cli import __version__
from fantasytalk_cli.config.load import config_diff, config_hash, config_to_yaml
from fantasytalk_cli.config.schema import DataConfig, FtalkConfig, TrainConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.data.dataset import ClipBatchDataset
from fantasytalk_cli.data.metadata import OUTSIDE_FIX, MetadataEntry, load_entries, outside_root
from fantasytalk_cli.data.plan import facts_from_entries, load_plan_checked
from fantasytalk_cli.data.probing import FilledFacts, default_cache_path, probe_missing_facts
from fantasytalk_cli.data.sampler import BucketBatchSampler
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.train.checkpoint import (
    CheckpointMeta,
    install_state_hooks,
    load_training_checkpoint,
    pick_resume,
    save_training_checkpoint,
    write_text_atomic,
)
from fantasytalk_cli.train.distributed import build_accelerator, plain_construction, sharded_build, share_from_main
from fantasytalk_cli.train.flow import FlowSchedule
from fantasytalk_cli.train.model_setup import load_training_models
from fantasytalk_cli.train.preflight import check_model_paths, plan_run_folder, set_aside_previous_run
from fantasytalk_cli.train.step import StepContext, training_step, zero_gradient_loss


class TrainingError(FtalkError, RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class RunState:
    """Counters that checkpoints carry besides model and optimizer (`run_state.json`: plain JSON)."""

    sampler: BucketBatchSampler
    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    consumed: int = 0
    """Batches of the current epoch trained on (the loader may have prefetched more)."""
    nonfinite_skipped: int = 0
    outliers: int = 0
    failed_entries: set[int] = field(default_factory=set)
    """Metadata entries that failed to load, the same set on every rank (one entry counts once)."""

    COUNTERS = ("step", "micro_step", "epoch", "consumed", "nonfinite_skipped", "outliers")

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": {k: getattr(self, k) for k in self.COUNTERS},
            "failed_entries": sorted(self.failed_entries),
            "sampler": self.sampler.state_dict(consumed=self.consumed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.COUNTERS:
            setattr(self, key, int(state["counters"][key]))
        self.failed_entries = set(state.get("failed_entries", ()))
        self.sampler.load_state_dict(state["sampler"])


@dataclass
class TrainSummary:
    output_dir: Path
    steps: int
    epochs_started: int
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    stopped_by: str | None = None
    nonfinite_skipped: int = 0
    failed_entries: list[int] = field(default_factory=list)
    outliers: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    main: bool = True
    """Whether this process is the main one (only it prints the summary)."""


class _StopFlag:
    """SIGTERM/SIGINT: finish the step, save, exit cleanly. A second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: the user will not wait for the step (or the set-up) to end
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the frozen base gets no optimizer state)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def run_training(cfg: FtalkConfig, console: Console | None = None) -> TrainSummary:
    """Train per `cfg`; returns what happened. Raises `TrainingError` with a user-facing message.

    NaN/inf, the same rule in every strategy: a micro-batch whose loss is non-finite on any rank gives
    no gradient (every rank backpropagates `zero_gradient_loss` instead, so collectives, FSDP/ZeRO hooks
    and DeepSpeed's micro-step count go on as for any batch). A step with no finite micro-batch loss, or
    with a non-finite gradient norm (the outlier guard turns NaN predictions into a finite loss), makes
    no update: weights, optimizer state and learning rate stay as they were; it is counted, and
    `max_consecutive_nonfinite` of them in a row abort. DeepSpeed steps inside `backward`: there a step
    with no finite loss is backpropagated as a mid-window micro-step (its zero gradients join the next
    window), and ZeRO's own overflow check drops a non-finite gradient. Under fp16 an overflowing
    gradient is the loss scaler's to skip (it lowers its scale); that is not counted.
    """
    # Before anything slow (model load, ZeRO-3 init): a signal during set-up also ends in a clean stop.
    with _StopFlag() as stop:
        return _train(cfg, console or Console(), stop)


def _train(cfg: FtalkConfig, console: Console, stop: _StopFlag) -> TrainSummary:
    t_start = time.perf_counter()
    train, ckpt = cfg.train, cfg.checkpoint
    # Every check that needs no model first: a mistake costs seconds and writes nothing.
    if cfg.data.train_data_meta is None:
        raise TrainingError("--train_data_meta is required (the metadata file: the seed's metadata_control.json)")
    folder = plan_run_folder(ckpt, ckpt.overwrite_output_dir)
    check_model_paths(cfg.model)
    accelerator, strategy = build_accelerator(cfg.dist, train, ckpt, train.report_to)
    main = accelerator.is_main_process
    # soft_wrap: one log line stays one line in a piped log (paths are never broken for grep)
    tell = functools.partial(console.print, soft_wrap=True)
    say = tell if main else (lambda *a, **k: None)

    def any_rank(flag: bool) -> bool:
        """A collective: every rank must call it at the same points, and all get the same answer."""
        return accelerator.reduce(torch.tensor(float(flag), device=accelerator.device), reduction="sum").item() > 0

    for note in strategy.notes:
        say(f"[yellow]note:[/] {note}")
    set_seed(train.seed or 0)

    for note in folder.notes:
        say(f"[yellow]note:[/] {note}")
    out = ckpt.output_dir

    # Data: metadata with probe facts, the plan `plan-buckets` showed, the sampler that follows it.
    entries, facts_notes = _entries_with_facts(cfg.data, accelerator, say)
    plan, warnings = load_plan_checked(
        cfg.data.bucket_plan,
        cfg,
        cfg.data.train_data_meta,
        world_size=accelerator.num_processes,
        facts=facts_from_entries(entries),
    )
    for warning in facts_notes + warnings:
        say(f"[yellow]plan:[/] {warning}")
    sampler = BucketBatchSampler(
        plan,
        batch_size=train.train_batch_size,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        seed=train.seed or 0,
    )
    if len(sampler) == 0:
        raise TrainingError(
            f"no full batch of {train.train_batch_size} x {accelerator.num_processes} processes in any bucket: "
            "run `ftalk plan-buckets` to see why (too few clips per bucket, or all dropped)"
        )
    # The dataset always hands failures back; the loop applies `bad_sample_policy` after sharing them
    # across ranks, so that `fail` stops every rank together instead of one raising while the others wait.
    dataset = ClipBatchDataset(entries, plan, cfg.data.media_root(), seed=train.seed or 0, policy="skip")
    loader = torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=None,
        collate_fn=_identity,
        num_workers=cfg.data.dataloader_num_workers,
        persistent_workers=False,
    )

    # Models: frozen base + encoders in the low precision, the adapter in fp32.
    sharded = sharded_build(accelerator, strategy)  # ZeRO-3 init: the transformer alone is partitioned
    with plain_construction(accelerator):
        models = load_training_models(
            cfg.model, train, device=accelerator.device, uniform_dtype=strategy.name == "fsdp", sharded=sharded
        )
    for note in models.notes:
        say(f"model: {note}")
    transformer = models.transformer
    optimizer = build_optimizer(transformer, train)
    steps_per_epoch = math.ceil(len(sampler) / train.gradient_accumulation_steps)
    max_steps = train.max_train_steps or train.num_train_epochs * steps_per_epoch
    # accelerate steps a prepared scheduler once per process per step: scale as diffusers' scripts do.
    lr_scheduler = get_scheduler(
        train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=train.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if strategy.name == "ddp":
        install_state_hooks(accelerator)
    state = RunState(sampler)

    # Resume: the checkpoint verified (main process) and everything restored, a changed config reported key by key.
    picked = (
        pick_resume(out, ckpt.resume_from_checkpoint, folder.resume, ckpt.allow_unverified_resume) if main else None
    )
    resume, resume_notes = share_from_main(accelerator, picked) or (None, [])
    for note in resume_notes:
        say(f"[yellow]resume:[/] {note}")
    if resume is not None:
        meta, run_state, load_notes = load_training_checkpoint(
            accelerator, transformer, strategy, resume, ckpt.allow_unverified_resume
        )
        state.load_state_dict(run_state)
        for note in load_notes:
            say(f"[yellow]resume:[/] {note}")
        current = cfg.model_dump(mode="json")
        changed = [line for line in config_diff(meta.config, current) if not line.startswith("checkpoint.")]
        say(f"resumed from {resume} at step {state.step} (epoch {state.epoch}, batch {state.consumed})")
        for line in changed:
            say(f"[yellow]config changed since the checkpoint:[/] {line}")

    # Run folder: written only now that the run can start (a run that fails to set up leaves none behind);
    # the resolved config goes in first, so a run is always explainable.
    if main:
        set_aside_previous_run(folder)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", config_to_yaml(cfg))
    accelerator.wait_for_everyone()

    schedule = FlowSchedule(**_schedule_kwargs(cfg))
    ctx = StepContext(
        train=train,
        model_cfg=cfg.model,
        sigmas=schedule.sigmas(),
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        device=accelerator.device,
        dtype=models.frozen_dtype if strategy.name != "fsdp" else torch.float32,
        autocast=accelerator.autocast,
    )
    if train.report_to != "none":
        accelerator.init_trackers("ftalk", config=_flat_config(cfg))
    summary = TrainSummary(out, state.step, state.epoch, notes=list(models.notes), main=main)
    if main:
        say(
            f"training {max_steps} steps ({steps_per_epoch} per epoch), strategy {strategy.name}, "
            f"{accelerator.num_processes} process(es) on {accelerator.device}, "
            f"{models.trainable_parameters:,} trainable parameters"
        )

    def save() -> None:
        meta = CheckpointMeta(
            step=state.step,
            epoch=state.epoch,
            config_hash=config_hash(cfg),
            config=cfg.model_dump(mode="json"),
            strategy=strategy.name if not strategy.fsdp_version else f"fsdp{strategy.fsdp_version}",
            world_size=accelerator.num_processes,
            versions=_versions(),
        )
        summary.checkpoints.append(
            save_training_checkpoint(
                accelerator, transformer, strategy, out, meta, ckpt.checkpoints_total_limit, state.state_dict()
            )
        )
        say(f"saved {summary.checkpoints[-1]}")

    consecutive_skipped = 0
    window_loss, window_finite = torch.zeros((), device=accelerator.device), 0  # over the finite micro-batches
    wait_s = compute_s = 0.0
    samples_seen = tokens_seen = 0
    last_saved = state.step  # nothing to save before the first step (or at the one resumed from)
    stopping = any_rank(stop.signal is not None)  # a signal during set-up: stop before the first step
    # A terminal gets a live progress bar; a file (a job log, `> train.log`, SLURM) one plain line per
    # `logging_steps` steps and the first, so that the log says how the run went without terminal codes.
    plain_log = not console.is_terminal
    progress = Progress(
        TextColumn("[bold]step"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
        disable=not main or plain_log,
    )
    first_step, t_loop = state.step, time.perf_counter()
    with progress:
        task = progress.add_task("train", total=max_steps, completed=state.step, info="")
        while state.step < max_steps and not stopping:
            sampler.set_epoch(state.epoch)
            t_wait = time.perf_counter()
            for batch in loader:
                t_got = time.perf_counter()
                wait_s += t_got - t_wait

                # A broken clip left its batch: logged by the rank that met it, counted once per entry however
                # many epochs meet it. New entries are shared every step so that every rank holds the same set
                # and takes the same abort decision (a lone rank raising would leave the others hanging).
                new = [f for f in batch["failures"] if f.index not in state.failed_entries]
                for failure in new:
                    tell(
                        f"[yellow]rank {accelerator.process_index}: skipped[/] entry {failure.index} "
                        f"({failure.path}): {failure.reason}"
                    )
                counts = torch.tensor([float(batch["pixels"] is not None), len(new)], device=accelerator.device)
                ranks_with_data, new_failures = accelerator.reduce(counts, reduction="sum").tolist()
                if new_failures:
                    shared = gather_object([(f.index, f.path, f.reason) for f in new])
                    state.failed_entries.update(index for index, _, _ in shared)
                    if cfg.data.bad_sample_policy == "fail":
                        index, path, reason = shared[0]
                        raise TrainingError(
                            f"entry {index} ({path}) failed to load: {reason}; fix or drop it "
                            "(`ftalk validate-metadata`), or train with --bad_sample_policy skip"
                        )
                    if len(state.failed_entries) > cfg.data.max_bad_sample_fraction * len(entries):
                        raise TrainingError(
                            f"{len(state.failed_entries)} clips failed to load, more than max_bad_sample_fraction="
                            f"{cfg.data.max_bad_sample_fraction} of {len(entries)}: run `ftalk validate-metadata`"
                        )
                # Every rank must step together: if any rank lost its whole batch, all skip it.
                if ranks_with_data < accelerator.num_processes:
                    state.consumed += 1
                    t_wait = time.perf_counter()
                    continue

                with accelerator.accumulate(transformer):
                    out_step = training_step(transformer, models.encoders, models.wav2vec, batch, ctx, state.micro_step)
                    if not any_rank(not torch.isfinite(out_step.loss).item()):
                        loss = out_step.loss
                        window_loss += loss.detach()
                        window_finite += 1
                    else:
                        out_step.loss = out_step.loss.detach()  # its graph goes before the stand-in's is built
                        loss = zero_gradient_loss(transformer, out_step.inputs, ctx)
                    updated = accelerator.sync_gradients and window_finite > 0
                    _backward(accelerator, loss, skip_update=accelerator.sync_gradients and not updated)
                    if updated:
                        # The norm is wanted even without clipping (max_norm inf): NaN gradients skip the update.
                        norm = accelerator.clip_grad_norm_(transformer.parameters(), train.max_grad_norm or math.inf)
                        updated = norm is None or math.isfinite(float(norm)) or accelerator.mixed_precision == "fp16"
                    if updated:
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                state.micro_step += 1
                state.consumed += 1
                state.outliers += out_step.outliers
                samples_seen += out_step.samples * accelerator.num_processes
                tokens_seen += out_step.tokens * accelerator.num_processes
                compute_s += time.perf_counter() - t_got

                if accelerator.sync_gradients:
                    state.step += 1
                    # Logged: the mean over the window's finite micro-batches and all ranks.
                    loss_value = accelerator.reduce(window_loss / max(window_finite, 1), reduction="mean").item()
                    if window_finite:
                        summary.losses.append(loss_value)
                    else:
                        loss_value = math.nan
                    window_loss, window_finite = torch.zeros_like(window_loss), 0
                    if updated:
                        consecutive_skipped = 0
                    else:
                        consecutive_skipped += 1
                        state.nonfinite_skipped += 1
                        say(f"[yellow]step {state.step}: non-finite loss or gradient, update skipped[/]")
                        if consecutive_skipped >= train.max_consecutive_nonfinite:
                            raise TrainingError(
                                f"{consecutive_skipped} steps in a row had a NaN/inf loss or gradient: lower "
                                "--learning_rate, check the data (`ftalk validate-metadata`), or resume from an "
                                "earlier checkpoint"
                            )
                    elapsed = max(wait_s + compute_s, 1e-9)
                    lr = lr_scheduler.get_last_lr()[0]
                    logs = {
                        "loss": loss_value,
                        "lr": lr,
                        "samples_per_s": samples_seen / elapsed,
                        "tokens_per_s": tokens_seen / elapsed,
                        "data_wait_share": wait_s / elapsed,
                    }
                    if train.report_to != "none":
                        accelerator.log(logs, step=state.step)
                    info = (
                        f"loss {loss_value:.4f}  lr {lr:.2e}  {logs['samples_per_s']:.2f} samples/s  "
                        f"{logs['tokens_per_s']:.0f} tok/s  data wait {logs['data_wait_share']:.0%}"
                    )
                    progress.update(task, completed=state.step, info=info)
                    done_here = state.step - first_step
                    if plain_log and (
                        done_here == 1 or state.step % train.logging_steps == 0 or state.step == max_steps
                    ):
                        eta = (time.perf_counter() - t_loop) / done_here * (max_steps - state.step)
                        say(f"step {state.step}/{max_steps}  {info}  eta {_duration(eta)}", highlight=False)

                    stopping = any_rank(stop.signal is not None)
                    if state.step % ckpt.checkpointing_steps == 0 or stopping or state.step >= max_steps:
                        save()
                        last_saved = state.step
                    if stopping or state.step >= max_steps:
                        break
                t_wait = time.perf_counter()
            else:  # the epoch ran out: next epoch
                state.epoch += 1
                state.consumed = 0
                continue
            break
    if stopping:
        summary.stopped_by = stop.signal or "signal on another rank"
        say(f"stopped by {summary.stopped_by} at step {state.step}")
    if last_saved != state.step:
        save()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary.steps = state.step
    summary.epochs_started = state.epoch + 1
    summary.nonfinite_skipped = state.nonfinite_skipped
    summary.failed_entries = sorted(state.failed_entries)
    summary.outliers = state.outliers
    summary.seconds = time.perf_counter() - t_start
    return summary


def _entries_with_facts(
    data: DataConfig, accelerator: Accelerator, say: Callable[..., None]
) -> tuple[list[MetadataEntry], list[str]]:
    """The metadata's entries, each with its probe facts: stored ones (`validate-metadata --write-clean`), else
    from the probe cache beside the metadata, else probed now on the main process (in parallel, written to
    that cache so the next run probes nothing) and shared with every rank, so that all plan the same."""
    assert data.train_data_meta is not None
    root = data.media_root()
    where = (
        "--train_data_dir"
        if data.train_data_dir is not None
        else "the metadata file's folder; --train_data_dir changes it"
    )
    say(f"metadata {data.train_data_meta}: relative media paths are joined to {root} ({where})")
    entries = load_entries(data.train_data_meta)
    if not data.allow_outside_data_dir and root is not None:
        outside = [
            (e.index, why) for e in entries for w in (e.file_path, e.audio_path) if (why := outside_root(root, w))
        ]
        if outside:
            shown = "; ".join(f"entry {i}: {why}" for i, why in outside[:3])
            raise TrainingError(f"{len(outside)} media paths lie outside the data folder ({shown}): {OUTSIDE_FIX}")
    lacking = [(e.index, e.file_path, e.audio_path) for e in entries if e.probe is None]
    if not lacking:
        return entries, []
    filled: FilledFacts | None = None
    if accelerator.is_main_process:
        say(f"reading the probe facts of {len(lacking)} entries (validate-metadata --write-clean stores them)")
        filled = probe_missing_facts(lacking, root, default_cache_path(data.train_data_meta))
    filled = share_from_main(accelerator, filled)
    assert filled is not None
    for index, facts in filled.facts.items():
        entries[index] = dataclasses.replace(entries[index], probe=facts)
    return entries, [filled.note()]


def _backward(accelerator: Accelerator, loss: torch.Tensor, *, skip_update: bool) -> None:
    """`accelerator.backward`; with `skip_update` at a window's end, DeepSpeed (whose engine steps inside
    backward there) takes it as a mid-window micro-step instead, so that window merges into the next."""
    if skip_update and accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=False)
    else:
        accelerator.backward(loss)


def _duration(seconds: float) -> str:
    """`1:02:03` / `2:03` for an ETA."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _schedule_kwargs(cfg: FtalkConfig) -> dict[str, Any]:
    sched = load_wan_yaml(cfg.model.config_path).scheduler_kwargs
    return {"num_train_timesteps": sched.num_train_timesteps, "shift": sched.shift}


def _flat_config(cfg: FtalkConfig) -> dict[str, Any]:
    """TensorBoard hparams take scalars only."""
    flat: dict[str, Any] = {}
    for section, values in cfg.model_dump(mode="json").items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def _versions() -> dict[str, str]:
    import accelerate
    import diffusers
    import transformers

    return {
        "ftalk": __version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _entries(indices: list[int]) -> str:
    """`0` or `2: entries 3, 17` (the first few)."""
    if not indices:
        return "0"
    more = ", ..." if len(indices) > 5 else ""
    return f"{len(indices)}: entries {', '.join(map(str, indices[:5]))}{more}"


def render_summary(summary: TrainSummary) -> Table:
    """The end-of-run table."""
    table = Table(title="training summary", show_header=False)
    first = f"{summary.losses[0]:.4f}" if summary.losses else "-"
    last = f"{summary.losses[-1]:.4f}" if summary.losses else "-"
    rows = [
        ("run folder", str(summary.output_dir)),
        ("optimizer steps", str(summary.steps)),
        ("loss first -> last", f"{first} -> {last}"),
        ("checkpoints", ", ".join(p.name for p in summary.checkpoints) or "-"),
        ("stopped by", summary.stopped_by or "-"),
        ("non-finite steps skipped", str(summary.nonfinite_skipped)),
        ("clips skipped (failed to load)", _entries(summary.failed_entries)),
        ("loss elements over the outlier guard", str(summary.outliers)),
        ("wall time", f"{summary.seconds:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
