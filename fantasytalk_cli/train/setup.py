"""Everything `ftalk train` sets up before its first step, gathered into one `Run`: the checks that need no
model (first, so a mistake costs seconds and writes nothing), the accelerator, the data (metadata with probe
facts, the plan, the sampler and loader), the models and optimizer prepared by accelerate, the resumed
state, and the run folder (created only now that the run can start)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from rich.console import Console

from fantasytalk_cli import __version__
from fantasytalk_cli.cache.keys import cache_settings
from fantasytalk_cli.cache.lookup import CacheLookup, coverage
from fantasytalk_cli.cache.store import CACHE_MARKER
from fantasytalk_cli.config.load import config_diff, config_hash, config_to_yaml
from fantasytalk_cli.config.schema import (
    BucketConfig,
    CheckpointConfig,
    DataConfig,
    FtalkConfig,
    ModelConfig,
    TrainConfig,
)
from fantasytalk_cli.data.dataset import ClipBatchDataset
from fantasytalk_cli.data.entry_facts import Share, with_probe_facts
from fantasytalk_cli.data.metadata import MetadataEntry, load_entries, outside_report
from fantasytalk_cli.data.plan import BucketPlan, facts_from_entries, load_plan_checked
from fantasytalk_cli.data.sampler import BucketBatchSampler
from fantasytalk_cli.data.tracks import track_coverage
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import write_text_atomic
from fantasytalk_cli.locks import LOCK_NAME, FolderBusyError, FolderLock, acquire
from fantasytalk_cli.models.paths import check_model_paths
from fantasytalk_cli.planning.fit import MemoryOptions, chosen_options, fit_warning, run_estimate, search_space
from fantasytalk_cli.planning.memory import MemoryEstimate
from fantasytalk_cli.planning.model_dims import configured_model_dims
from fantasytalk_cli.runtime.block_offload import check_block_count, offload_blocks
from fantasytalk_cli.runtime.flow import FlowSchedule
from fantasytalk_cli.runtime.memory_options import check_memory_options
from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.train.audio_reliance import HeldOut
from fantasytalk_cli.train.checkpoint import load_training_checkpoint, pick_resume
from fantasytalk_cli.train.distributed import (
    Strategy,
    build_accelerator,
    compute_dtype,
    install_state_hooks,
    keep_float8_out_of_ddp_sync,
    plain_construction,
    sharded_build,
    share_from_main,
)
from fantasytalk_cli.train.init_from import check_init_from, init_from
from fantasytalk_cli.train.model_setup import TrainingModels, load_training_models
from fantasytalk_cli.train.preflight import (
    RUN_FOLDER_FIX,
    check_resume_trains_the_same,
    plan_run_folder,
    set_aside_previous_run,
)
from fantasytalk_cli.train.state import RunState
from fantasytalk_cli.train.step import StepContext
from fantasytalk_cli.train.validation import Validation, check_validation
from fantasytalk_cli.train.validation_metrics import check_encoders, check_validation_metrics


class TrainingError(FtalkError, RuntimeError):
    """Training cannot go on; the message says why and what to do."""


@dataclass
class Run:
    """A training run ready for its first step (or its next one, resumed)."""

    data: DataConfig
    train: TrainConfig
    model: ModelConfig
    checkpoint: CheckpointConfig
    config_hash: str
    """`config_hash` of the resolved config, computed once: every checkpoint's meta records it."""
    config_dump: dict[str, Any]
    """The resolved config as JSON data, computed once: every checkpoint's meta records it."""
    accelerator: Accelerator
    world: World
    strategy: Strategy
    models: TrainingModels
    transformer: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    loader: torch.utils.data.DataLoader
    state: RunState
    ctx: StepContext
    num_entries: int
    max_steps: int
    steps_per_epoch: int
    console: Console
    say: Callable[..., None]
    """Prints on the main process only (one line stays one line in a piped log)."""
    tell: Callable[..., None]
    """Prints on every process (what one rank alone saw)."""
    validation: Validation | None = None
    """The validation pairs, checked at set-up (None: no validation)."""
    metrics: HeldOut | None = None
    """The held-out clips `--validation_metrics` scores, planned at set-up (None: no metrics)."""
    lock: FolderLock | None = None
    """The run folder's lock, held by the main process for the run's whole life (`locks.py`)."""
    cache_misses: Counter[str] = dataclasses.field(default_factory=Counter)
    """Feature-cache entries this rank's batches lacked (or found corrupt) and computed online, by kind."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def any_rank(self, flag: bool) -> bool:
        """A collective: every rank must call it at the same points, and all get the same answer."""
        value = torch.tensor(float(flag), device=self.accelerator.device)
        return self.accelerator.reduce(value, reduction="sum").item() > 0


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (the frozen base gets no optimizer state)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=train.learning_rate,
        betas=(train.adam_beta1, train.adam_beta2),
        weight_decay=train.adam_weight_decay,
        eps=train.adam_epsilon,
    )


def set_up(cfg: FtalkConfig, console: Console) -> Run:
    """Check, build, resume and open the run folder, in that order; raises a `FtalkError` with the fix."""
    data, train, model, checkpoint = cfg.data, cfg.train, cfg.model, cfg.checkpoint
    if data.train_data_meta is None:
        raise TrainingError("--train_data_meta is required (the metadata file: the seed's metadata_control.json)")
    folder = plan_run_folder(checkpoint, checkpoint.overwrite_output_dir)
    if folder.resume is not None:
        check_resume_trains_the_same(folder.resume, model, train)
    check_model_paths(model)
    validation = check_validation(train, checkpoint.output_dir)
    accelerator, strategy = build_accelerator(cfg.dist, train, checkpoint, train.report_to)
    with contextlib.ExitStack() as undo:  # a run that does not start releases the folder it locked
        lock, made = _lock_run_folder(checkpoint.output_dir, accelerator)
        undo.callback(_unlock_run_folder, checkpoint.output_dir, lock, made)
        world = World.of(accelerator)
        check_memory_options(model, strategy.name)
        start = None
        if checkpoint.init_from is not None and folder.resume is None:  # before anything slow, as resume is
            start = check_init_from(checkpoint.init_from, model, strategy.name)
        if model.blocks_to_offload:  # before anything loads: the count against the DiT config's blocks
            check_block_count(model.blocks_to_offload, int(configured_model_dims(model).config["num_layers"]))
        tell = functools.partial(console.print, soft_wrap=True)
        say = tell if world.main else (lambda *a, **k: None)
        for note in (*strategy.notes, *folder.notes):
            say(f"[yellow]note:[/] {note}")
        set_seed(train.seed)
        share = functools.partial(share_from_main, accelerator)
        lookup = _feature_lookup(data, model, train)
        pin = accelerator.device.type == "cuda"
        entries, sampler, loader = _data(data, cfg.buckets, train, lookup, world, share, say, pin_memory=pin)
        metrics = check_validation_metrics(data, cfg.buckets, train, world, share, say)
        steps_per_epoch = math.ceil(len(sampler) / train.gradient_accumulation_steps)
        max_steps = train.total_steps(steps_per_epoch)
        plan = loader.dataset.plan
        cached = _encoders_the_cache_spares(
            data, train.seed, lookup, plan, entries, train.epochs_covered(steps_per_epoch), say
        )
        if cached and (validation is not None or metrics is not None):  # held-out inputs run every encoder
            say("cache: the encoders stay loaded for validation (--validation_image_paths, --validation_metrics)")
            cached = frozenset()
        models = _models(model, train, accelerator, strategy, say, cached)
        if metrics is not None:
            check_encoders(models)
        if start is not None:
            say(f"model: {init_from(start, models.transformer)}")
        elif checkpoint.init_from is not None:
            say(f"model: --init_from {checkpoint.init_from} not used: resuming this run's own checkpoint")
        if accelerator.device.type == "cuda":
            _warn_if_unfit(model, train, accelerator, world, strategy, plan, models, cached, say)
        optimizer = build_optimizer(models.transformer, train)
        # accelerate steps a prepared scheduler once per process per step: scale as diffusers' scripts do.
        lr_scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=train.lr_warmup_steps * world.processes,
            num_training_steps=max_steps * world.processes,
        )
        keep_float8_out_of_ddp_sync(models.transformer)
        transformer, optimizer, lr_scheduler = accelerator.prepare(models.transformer, optimizer, lr_scheduler)
        install_state_hooks(accelerator, strategy)
        if model.blocks_to_offload:  # the count was checked against the model's config at set-up's start
            offload_blocks(accelerator.unwrap_model(transformer), model.blocks_to_offload, accelerator.device)
            say(f"model: the frozen weights of the last {model.blocks_to_offload} blocks live in host memory")
        dump = cfg.model_dump(mode="json")
        ctx = _step_context(train, model, accelerator, world, strategy, models)
        run = Run(
            data, train, model, checkpoint, config_hash(cfg), dump, accelerator, world, strategy, models, transformer,
            optimizer, lr_scheduler, loader, RunState(sampler), ctx, len(entries), max_steps, steps_per_epoch, console,
            say, tell, validation, metrics=metrics, lock=lock,
        )  # fmt: skip
        _resume(run, folder.resume)
        if run.main:  # the run folder (made by its lock) gets the run's files only now that the run can start
            set_aside_previous_run(folder)
            write_text_atomic(checkpoint.output_dir / "config.yaml", config_to_yaml(cfg))
        accelerator.wait_for_everyone()
        if train.report_to != "none":
            accelerator.init_trackers("ftalk", config=_flat_config(dump))
        say(
            f"training {max_steps} steps ({steps_per_epoch} per epoch), strategy {strategy.name}, "
            f"{world.processes} process(es) on {accelerator.device}, "
            f"{models.trainable_parameters:,} trainable parameters"
        )
        undo.pop_all()  # the run starts: its lock stays held for the run's life (released by `run_training`)
        return run


def _lock_run_folder(output_dir: Path, accelerator: Accelerator) -> tuple[FolderLock | None, bool]:
    """The main process takes the run folder's lock (making the folder if needed: whether it did is returned) and
    every rank learns the answer from it, so that no rank proceeds alone; a held lock is a `FolderBusyError`
    naming its holder on every rank."""
    lock: FolderLock | None = None
    made, failure = False, None
    if accelerator.is_main_process:
        made = not output_dir.exists()
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            lock = acquire(output_dir / LOCK_NAME, f"the run folder {output_dir}", RUN_FOLDER_FIX)
        except (FolderBusyError, OSError) as exc:
            failure = str(exc)
            _unlock_run_folder(output_dir, None, made)
    failure = share_from_main(accelerator, failure)
    if failure is not None:
        raise FolderBusyError(failure)
    return lock, made


def _unlock_run_folder(output_dir: Path, lock: FolderLock | None, made: bool) -> None:
    """A run that did not start: release its lock and remove the folder when this run made it and left it empty."""
    if lock is not None:
        lock.release()
    if made:
        with contextlib.suppress(OSError):  # not empty (or gone): leave it
            output_dir.rmdir()


def _check_tracks(entries: Sequence[MetadataEntry], data: DataConfig, train: TrainConfig) -> str:
    """Before anything slow: every `track` an entry names exists; without `require_tracks` entries without one
    train with weight 1 (counted), with it they are refused. Returns the line for the log."""
    found = track_coverage(entries, data.media_root())
    meta = data.train_data_meta
    if found.lost:
        first = found.lost[0]
        raise TrainingError(
            f"{meta}: {len(found.lost)} entries name a `track` file that does not exist, e.g. entry {first.index}: "
            f"{first.extra['track']}; rerun `ftalk prepare`, or remove the field"
        )
    if found.untracked and train.require_tracks:
        first = found.untracked[0]
        raise TrainingError(
            f"{meta}: --require_tracks, but {len(found.untracked)} of {found.total} entries have no `track` "
            f"(face/mouth boxes), e.g. entry {first.index} ({first.file_path}); make the data with `ftalk prepare`, "
            "or drop --require_tracks to train them with weight 1"
        )
    return (
        f"face cells x{1 + train.face_loss_weight:g}, mouth cells +{train.lip_loss_weight:g}; "
        f"{found.tracked} of {found.total} entries have a track, {len(found.untracked)} train with weight 1"
    )


def _identity(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _data(
    data: DataConfig,
    buckets: BucketConfig,
    train: TrainConfig,
    lookup: CacheLookup | None,
    world: World,
    share: Share,
    say: Callable[..., None],
    *,
    pin_memory: bool,
) -> tuple[list[MetadataEntry], BucketBatchSampler, torch.utils.data.DataLoader]:
    """Metadata with probe facts, the plan `plan-buckets` showed, the sampler that follows it, the loader."""
    entries, facts_notes = _entries(data, world, share, say)
    plan, warnings = load_plan_checked(
        data.bucket_plan, data=data, buckets=buckets, train=train, world_size=world.dp_size,
        facts=facts_from_entries(entries),
    )  # fmt: skip
    for warning in facts_notes + warnings:
        say(f"[yellow]plan:[/] {warning}")
    if train.region_weights() is not None:
        say(f"loss: {_check_tracks(entries, data, train)}")
    batch_size = train.train_batch_size
    sampler = BucketBatchSampler(
        plan, batch_size=batch_size, rank=world.dp_rank, world_size=world.dp_size, seed=train.seed
    )
    if len(sampler) == 0:
        raise TrainingError(
            f"no full batch of {batch_size} x {world.dp_size} processes in any bucket: run `ftalk plan-buckets` to "
            "see why (too few clips per bucket, or all dropped)"
        )
    # The dataset always hands failures back; the loop applies `bad_sample_policy` after sharing them
    # across ranks, so that `fail` stops every rank together instead of one raising while the others wait.
    dataset = ClipBatchDataset(
        entries, plan, data.media_root(), seed=train.seed, policy="skip", cache=lookup,
        fixed_window=data.fixed_window, regions=train.region_weights(),
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=None, collate_fn=_identity,
        num_workers=data.dataloader_num_workers, persistent_workers=False,
        pin_memory=pin_memory,  # on CUDA: the step's uint8 copies to the GPU then do not block
    )  # fmt: skip
    return entries, sampler, loader


def _feature_lookup(data: DataConfig, model: ModelConfig, train: TrainConfig) -> CacheLookup | None:
    """The feature cache's read side for this run's settings (`--cache_dir`), checked to be a cache."""
    if data.cache_dir is None:
        return None
    if not (data.cache_dir / CACHE_MARKER).is_file():
        raise TrainingError(
            f"--cache_dir {data.cache_dir}: no feature cache there (no {CACHE_MARKER}); write it first with "
            "`ftalk cache` and this run's flags, or leave --cache_dir out to compute every feature online"
        )
    return CacheLookup(data.cache_dir, cache_settings(model, train), required=data.cache_required)


def _entries(
    data: DataConfig, world: World, share: Share, say: Callable[..., None]
) -> tuple[list[MetadataEntry], list[str]]:
    """The metadata's entries, checked against the data-folder rule, then given their probe facts (`entry_facts`:
    probed on the main process, shared with every rank, so that all plan the same)."""
    assert data.train_data_meta is not None
    root = data.media_root()
    where = "--train_data_dir" if data.train_data_dir else "the metadata file's folder; --train_data_dir changes it"
    say(f"metadata {data.train_data_meta}: relative media paths are joined to {root} ({where})")
    entries = load_entries(data.train_data_meta)
    if not data.allow_outside_data_dir and root is not None:
        outside = outside_report(root, ((e.index, w) for e in entries for w in (e.file_path, e.audio_path)))
        if outside:
            raise TrainingError(outside)
    return entries, with_probe_facts(entries, data, world, share, say)


def _warn_if_unfit(
    model: ModelConfig,
    train: TrainConfig,
    accelerator: Accelerator,
    world: World,
    strategy: Strategy,
    plan: BucketPlan,
    models: TrainingModels,
    cached: frozenset[str],
    say: Callable[..., None],
) -> None:
    """Before the first step: warn when the largest planned bucket is estimated not to fit this GPU."""
    shapes = {plan.grid.shape(b) for b in plan.assignment(0).tolist() if b >= 0}
    if not shapes:
        return
    height, width, frames = max(shapes, key=lambda s: s[0] * s[1] * s[2])
    config = dict(models.transformer.config)

    def estimate(options: MemoryOptions) -> MemoryEstimate:
        return run_estimate(train, model, config, (height, width, frames), options, strategy=strategy.name,
                            devices=world.processes, cached=cached)  # fmt: skip

    capacity = torch.cuda.get_device_properties(accelerator.device).total_memory
    warning = fit_warning(estimate, chosen_options(model), capacity, **search_space(strategy.name, config))
    if warning is not None:
        say(f"[yellow]memory:[/] {warning}")


def _encoders_the_cache_spares(
    data: DataConfig,
    seed: int,
    lookup: CacheLookup | None,
    plan: BucketPlan,
    entries: list[MetadataEntry],
    epochs: int,
    say: Callable[..., None],
) -> frozenset[str]:
    """The kinds of features (text, audio, video) the feature cache holds for every batch this run can train on:
    their encoders are not loaded."""
    if lookup is None:
        return frozenset()
    found = coverage(lookup, entries, facts_from_entries(entries), plan, seed=seed, data=data, epochs=epochs)
    for note in found.notes():
        say(f"[yellow]cache:[/] {note}")
    kinds = found.whole_kinds()
    if data.cache_required and len(kinds) < 3:
        raise TrainingError(
            f"{data.cache_dir}: --cache_required, but the cache lacks entries this run needs "
            f"({'; '.join(found.notes())}): run `ftalk cache` with this run's flags (same model, precision, buckets, "
            "seed, --cache_epochs covering the run or --fixed_window), or drop --cache_required to compute them online"
        )
    if kinds:
        say(f"cache: not loading the encoders of {', '.join(sorted(kinds))} (every entry this run needs is cached)")
    return kinds


def _models(
    model: ModelConfig,
    train: TrainConfig,
    accelerator: Accelerator,
    strategy: Strategy,
    say: Callable[..., None],
    cached: frozenset[str] = frozenset(),
) -> TrainingModels:
    """Frozen base + encoders in the low precision, the adapter in fp32 (ZeRO-3 init: the transformer alone
    is built partitioned)."""
    sharded = sharded_build(accelerator, strategy)
    with plain_construction(accelerator):
        models = load_training_models(
            model, train, device=accelerator.device, uniform_dtype=strategy.uniform_dtype, sharded=sharded,
            cached=cached,
        )  # fmt: skip
    for note in models.notes:
        say(f"model: {note}")
    return models


def _step_context(
    train: TrainConfig,
    model: ModelConfig,
    accelerator: Accelerator,
    world: World,
    strategy: Strategy,
    models: TrainingModels,
) -> StepContext:
    return StepContext(
        train=train,
        model_cfg=model,
        sigmas=FlowSchedule.of(model).sigmas(),
        world=world,
        device=accelerator.device,
        dtype=compute_dtype(strategy, models.frozen_dtype),
        autocast=accelerator.autocast,
        activation_offload=model.activation_offload,
    )


def cpu_step_context(train: TrainConfig, model: ModelConfig, dtype: torch.dtype) -> StepContext:
    """A one-process step context on the CPU without autocast (the fixed-batch evaluation, the benchmarks)."""
    return StepContext(
        train=train,
        model_cfg=model,
        sigmas=FlowSchedule.of(model).sigmas(),
        world=World(),
        device=torch.device("cpu"),
        dtype=dtype,
        autocast=lambda: torch.autocast("cpu", enabled=False),
    )


def _resume(run: Run, candidate: Path | None) -> None:
    """Verify (main process) and restore the checkpoint; a changed config is reported key by key."""
    ckpt = run.checkpoint
    picked = None
    if run.main:  # reads every byte of the checkpoint once, then tells the others
        picked = pick_resume(ckpt.output_dir, ckpt.resume_from_checkpoint, candidate, ckpt.allow_unverified_resume)
    resume, notes = share_from_main(run.accelerator, picked) or (None, [])
    if resume is not None:
        meta, run_state, load_notes = load_training_checkpoint(
            run.accelerator, run.transformer, run.strategy, resume, ckpt.allow_unverified_resume
        )
        run.state.load_state_dict(run_state)
        notes = [*notes, *load_notes]
    for note in notes:
        run.say(f"[yellow]resume:[/] {note}")
    if resume is None:
        return
    state = run.state
    run.say(f"resumed from {resume} at step {state.step} (epoch {state.epoch}, batch {state.consumed})")
    for line in config_diff(meta.config, run.config_dump):
        if not line.startswith("checkpoint."):
            run.say(f"[yellow]config changed since the checkpoint:[/] {line}")


def _flat_config(dump: dict[str, Any]) -> dict[str, Any]:
    """TensorBoard hparams take scalars only."""
    flat: dict[str, Any] = {}
    for section, values in dump.items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def versions() -> dict[str, str]:
    """Versions recorded in every checkpoint's meta.json."""
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
