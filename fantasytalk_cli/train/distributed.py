"""All distributed plumbing of ftalk: `cfg.dist` + the `accelerate launch` environment -> an `Accelerator`
with the DeepSpeed or FSDP plugin, and the few strategy-specific operations the loop needs
(gathering the trainable weights). No other module imports accelerate's plugins or deepspeed.

What we add to accelerate's own handling of the launcher flags:
- ZeRO: `max_grad_norm` is written into the DeepSpeed JSON's `gradient_clipping` when the JSON has
  none (the reference never clipped under ZeRO-2 because of that), and we say so.
- FSDP1: `use_orig_params=True` is forced, because each `AudioAttentionBlock` mixes frozen and
  trainable parameters (without it accelerate's optimizer save fails with a KeyError).
- FSDP: `AudioAttentionBlock` is the unit to wrap when the launcher did not name one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin, ProjectConfiguration
from safetensors.torch import load_file

from fantasytalk_cli.checkpoints.folder import WEIGHTS_NAME, CheckpointError
from fantasytalk_cli.config.schema import CheckpointConfig, DistConfig, TrainConfig
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.models.dit_loading import FLOAT8_DTYPES
from fantasytalk_cli.models.weights import ShardedBuild
from fantasytalk_cli.runtime.world import World
from fantasytalk_cli.train.sharded_state import (
    fsdp_clean_name,
    fsdp_trainable_only,
    init_optimizer_state,
    recorded_load_keys,
    verify_module_state,
)

log = logging.getLogger(__name__)

WRAP_CLASS = "AudioAttentionBlock"
T = TypeVar("T")


class DistributedSetupError(FtalkError, RuntimeError):
    """The launcher flags and the config ask for incompatible things."""


@dataclass(frozen=True)
class Strategy:
    """What the run is: `ddp` (or single process), `zero2`, `zero3`, `fsdp` (version 1 or 2)."""

    name: str
    fsdp_version: int = 0
    notes: tuple[str, ...] = ()

    @property
    def uniform_dtype(self) -> bool:
        """FSDP flattens each unit into one tensor, so the whole transformer keeps one dtype (fp32; FSDP's
        mixed-precision policy computes in bf16)."""
        return self.name == "fsdp"

    @property
    def reshards(self) -> bool:
        """Whether its checkpoints resume under another process count: DDP's optimizer state is whole on every rank,
        ZeRO's and FSDP's are split per rank and cannot be re-split."""
        return self.name == "ddp"

    @property
    def shards_weights(self) -> bool:
        """Whether the trainable weights live sharded across ranks (ZeRO-3, FSDP): gather them to use them whole."""
        return self.name in ("zero3", "fsdp")

    @property
    def engine_pickles(self) -> bool:
        """Whether resuming reads engine files with pickle that ftalk cannot check: DeepSpeed's own `.pt` files."""
        return self.name in ("zero2", "zero3")

    @property
    def label(self) -> str:
        """`ddp`, `zero2`, `zero3`, `fsdp1` or `fsdp2`, as checkpoints record it."""
        return f"fsdp{self.fsdp_version}" if self.fsdp_version else self.name


def compute_dtype(strategy: Strategy, frozen_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the conditioning tensors fed to the transformer: that of its frozen weights, or fp32 under
    FSDP (which casts to its compute dtype itself)."""
    return torch.float32 if strategy.uniform_dtype else frozen_dtype


def keep_float8_out_of_ddp_sync(model: torch.nn.Module) -> int:
    """Leave the float8-stored frozen weights (`--base_weights_dtype fp8`) out of what DDP syncs; returns how many.

    DDP broadcasts every parameter from rank 0 when it wraps the model, and there is no float8 collective (gloo has
    none, NCCL only in recent versions). Nothing is lost: every rank read these weights from the same files, and
    frozen weights have no gradients to reduce. DDP's own ignore list carries them."""
    names = [n for n, p in model.named_parameters() if p.dtype in FLOAT8_DTYPES and not p.requires_grad]
    if names:
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return len(names)


def backward(accelerator: Accelerator, loss: torch.Tensor, *, skip_update: bool) -> None:
    """`accelerator.backward`; with `skip_update` at a window's end, DeepSpeed (whose engine steps inside
    backward there) takes it as a mid-window micro-step instead, so that window merges into the next."""
    if skip_update and accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=False)
    else:
        accelerator.backward(loss)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def _load_ds_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise DistributedSetupError(f"cannot read the DeepSpeed config {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise DistributedSetupError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} ({exc.msg})"
        ) from exc


def deepspeed_config(dist: DistConfig, train: TrainConfig, stage_hint: int | None) -> tuple[dict, list[str]]:
    """The DeepSpeed JSON to use (file from the launcher or the config), with our additions and notes."""
    notes: list[str] = []
    file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    path = Path(file) if file and file != "none" else dist.deepspeed_config_file
    if path is not None:
        ds = _load_ds_json(path)
    else:
        stage = stage_hint or 2
        ds = {
            "zero_optimization": {"stage": stage},
            "train_micro_batch_size_per_gpu": "auto",
            "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto",
        }
        notes.append(f"no DeepSpeed JSON given: using ZeRO-{stage} defaults")
    if "gradient_clipping" not in ds and train.max_grad_norm > 0:
        ds["gradient_clipping"] = train.max_grad_norm
        notes.append(
            f"gradient_clipping was missing from the DeepSpeed config: set to max_grad_norm={train.max_grad_norm}"
        )
    elif ds.get("gradient_clipping") not in (None, "auto") and float(ds["gradient_clipping"]) != train.max_grad_norm:
        notes.append(
            f"the DeepSpeed config's gradient_clipping={ds['gradient_clipping']} wins over "
            f"max_grad_norm={train.max_grad_norm}"
        )
    # accelerate cannot infer the micro batch: our sampler feeds batches, no prepared DataLoader does
    for key, value in (
        ("train_micro_batch_size_per_gpu", train.train_batch_size),
        ("gradient_accumulation_steps", train.gradient_accumulation_steps),
    ):
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise DistributedSetupError(
                f"the DeepSpeed config sets {key}={ds[key]} but the run asks for {value}; "
                f'set it to "auto" in the JSON or change the flag'
            )
    precision = train.mixed_precision
    for key in ("bf16", "fp16"):
        ds.setdefault(key, {"enabled": key == precision})
    return ds, notes


def detect_strategy(dist: DistConfig) -> str:
    """`ddp`, `zero2`, `zero3` or `fsdp`, from `dist.strategy` or what `accelerate launch` set."""
    if dist.strategy != "auto":
        return dist.strategy
    if _env_true("ACCELERATE_USE_DEEPSPEED"):
        file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        stage = None
        if file and file != "none":
            stage = _load_ds_json(Path(file)).get("zero_optimization", {}).get("stage")
        stage = stage if isinstance(stage, int) else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        return "zero3" if stage == 3 else "zero2"
    if _env_true("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp"


def _device_available() -> bool:
    """A device that multi-process DeepSpeed / FSDP can run on: a GPU (or XPU/NPU), or the device named in
    accelerate's own `ACCELERATE_TORCH_DEVICE` (whoever sets it has chosen the device for accelerate)."""
    from accelerate.utils import is_npu_available, is_xpu_available

    return (
        torch.cuda.is_available() or is_xpu_available() or is_npu_available() or "ACCELERATE_TORCH_DEVICE" in os.environ
    )


CPU_COMMANDS = (
    "on a machine without GPUs ftalk runs one process (`ftalk train ...`) or DDP over gloo "
    "(`accelerate launch --multi_gpu --num_processes N -m fantasytalk_cli train ...`)"
)


def check_world(launched: int, running: int, strategy: str) -> None:
    """Refuse a run whose accelerator does not hold the processes the launcher started: each would train
    alone and race the others in the same run folder."""
    if launched != running:
        raise DistributedSetupError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate set up "
            f"{running} for {strategy}: the processes would train independently and overwrite each other's "
            f"checkpoints. Nothing was written. {CPU_COMMANDS[0].upper() + CPU_COMMANDS[1:]}; with GPUs, check "
            "that every process sees one (`nvidia-smi`, CUDA_VISIBLE_DEVICES)"
        )


def build_accelerator(
    dist: DistConfig, train: TrainConfig, checkpoint: CheckpointConfig, log_with: str | None
) -> tuple[Accelerator, Strategy]:
    """The run's `Accelerator`, configured for the detected strategy. Several launched processes on a
    machine without GPUs run DDP over gloo (accelerate's CPU mode); DeepSpeed and FSDP there are refused,
    and so is any launch whose process count accelerate does not match, before the run folder is touched."""
    name = detect_strategy(dist)
    notes: list[str] = []
    launched = World.from_env().processes
    on_cpu = launched > 1 and not _device_available()
    if on_cpu and name != "ddp":
        raise DistributedSetupError(
            f"{launched} processes were launched for {name} on a machine without GPUs: DeepSpeed and FSDP need "
            f"GPUs. Nothing was written; {CPU_COMMANDS}"
        )
    if on_cpu:
        notes.append(f"no GPU: {launched} processes train with DDP on the CPU over gloo")
    ds_plugin = None
    fsdp_plugin = None
    fsdp_version = 0
    if name in ("zero2", "zero3"):
        ds, notes = deepspeed_config(dist, train, 3 if name == "zero3" else 2)
        ds.setdefault("zero_optimization", {})["stage"] = (
            3 if name == "zero3" else ds["zero_optimization"].get("stage", 2)
        )
        zero3_init = _env_true("ACCELERATE_DEEPSPEED_ZERO3_INIT") or (
            name == "zero3" and "ACCELERATE_DEEPSPEED_ZERO3_INIT" not in os.environ
        )
        ds_plugin = DeepSpeedPlugin(
            hf_ds_config=ds,
            gradient_clipping=train.max_grad_norm if train.max_grad_norm > 0 else None,
            zero3_init_flag=zero3_init if name == "zero3" else False,
        )
    elif name == "fsdp":
        if "FSDP_VERSION" not in os.environ:
            os.environ["FSDP_VERSION"] = str(dist.fsdp_version)
        fsdp_plugin = FullyShardedDataParallelPlugin()
        fsdp_version = int(fsdp_plugin.fsdp_version)
        if fsdp_version == 1 and not fsdp_plugin.use_orig_params:
            fsdp_plugin.use_orig_params = True
            notes.append("FSDP1: use_orig_params forced on (blocks mix frozen and trainable parameters)")
        if not fsdp_plugin.transformer_cls_names_to_wrap:
            fsdp_plugin.transformer_cls_names_to_wrap = [WRAP_CLASS]
            notes.append(f"FSDP: wrapping each {WRAP_CLASS}")
    accelerator = Accelerator(
        cpu=on_cpu,
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        deepspeed_plugin=ds_plugin,
        fsdp_plugin=fsdp_plugin,
        log_with=None if log_with in (None, "none") else log_with,
        project_config=ProjectConfiguration(
            project_dir=str(checkpoint.output_dir), logging_dir=str(checkpoint.output_dir / "logs")
        ),
    )
    check_world(launched, accelerator.num_processes, name)
    return accelerator, Strategy(name, fsdp_version, tuple(notes))


def share_from_main(accelerator: Accelerator, value: T) -> T:
    """`value` as the main process computed it, on every process (a collective: every rank calls it; the
    others' `value` is ignored), so that no rank decides alone."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]  # type: ignore[return-value]


def gather_objects(accelerator: Accelerator, value: T) -> list[T]:
    """Every process's ``value``, in rank order, on every process (a collective; one process: ``[value]``)."""
    if accelerator.num_processes == 1:
        return [value]
    gathered: list[T | None] = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(gathered, value)
    return gathered  # type: ignore[return-value]


def sharded_build(accelerator: Accelerator, strategy: Strategy) -> ShardedBuild | None:
    """ZeRO-3 with `zero3_init_flag`: build the transformer partitioned (`deepspeed.zero.Init`) and fill
    it one gathered parameter at a time, the files read on the main process only. None otherwise."""
    plugin = accelerator.state.deepspeed_plugin
    if strategy.name != "zero3" or plugin is None or not plugin.zero3_init_flag:
        return None
    import deepspeed

    # zero.Init parses the config: keep what it needs, without accelerate's unresolved "auto" values
    keep = ("zero_optimization", "bf16", "fp16", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    ds_config = {k: v for k, v in plugin.deepspeed_config.items() if k in keep}
    main = accelerator.is_main_process

    def context() -> Any:
        return deepspeed.zero.Init(config_dict_or_path=ds_config)

    def write(param: torch.nn.Parameter, tensor: torch.Tensor | None) -> None:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
            if main:
                assert tensor is not None
                param.data.copy_(tensor.to(param.dtype))

    return ShardedBuild(context=context, write=write, reads=main)


@contextmanager
def plain_construction(accelerator: Accelerator) -> Iterator[None]:
    """Build models unpartitioned even under ZeRO-3 init: transformers would otherwise build the frozen
    encoders (umT5, CLIP, wav2vec2) inside `zero.Init` (it reads the global DeepSpeed config accelerate
    registers, and accelerate's own `zero3_init_context_manager(False)` leaves a stage-3 config there)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None or not plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def gather_trainable_state(
    accelerator: Accelerator, model: torch.nn.Module, strategy: Strategy
) -> dict[str, torch.Tensor]:
    """The full fp32 trainable weights, on every rank's CPU (collective: call on all ranks).

    ZeRO-1/2/3 keep fp32 masters in the optimizer: `safe_get_full_fp32_param` gathers them; FSDP2
    holds DTensors: `full_tensor()`; FSDP1 (use_orig_params): `_gather_fsdp1`; DDP: the parameters.
    """
    if strategy.name == "fsdp" and strategy.fsdp_version == 1:
        return _gather_fsdp1(accelerator, model)
    unwrapped = accelerator.unwrap_model(model)
    params = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    out: dict[str, torch.Tensor] = {}
    if strategy.name in ("zero2", "zero3"):
        from deepspeed.utils import safe_get_full_fp32_param

        for n, p in params:
            full = safe_get_full_fp32_param(p)
            out[n] = full.detach().float().cpu().clone()
    elif strategy.name == "fsdp":
        for n, p in params:
            data = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[n] = data.detach().float().cpu().clone()
    else:
        for n, p in params:
            out[n] = p.detach().float().cpu().clone()
    return out


def _gather_fsdp1(accelerator: Accelerator, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """FSDP1: unshard one FSDP unit at a time (`recurse=False`: its own flat parameter, not the units
    nested in it) and copy its trainable parameters to the CPU. Summoning the root with recursion would
    hold the whole fp32 transformer on every rank (~57 GB at 14B). Units without trainable parameters
    are skipped, the same ones on every rank (the collective stays matched). No `offload_to_cpu`: the
    unit is unsharded on the device first anyway, and offloading would copy its frozen part to the
    CPU too; no `rank0_only`: every rank gets the weights, as under the other strategies."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    params = [(fsdp_clean_name(n), p) for n, p in accelerator.unwrap_model(model).named_parameters()]
    gathered: dict[int, torch.Tensor] = {}
    for unit in FSDP.fsdp_modules(model):
        own = [p for p in _unit_parameters(unit, FSDP) if p.requires_grad]
        if not own:
            continue
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for p in own:
                gathered[id(p)] = p.detach().float().cpu().clone()
    return {n: gathered[id(p)] for n, p in params if p.requires_grad}  # the order of named_parameters


def _unit_parameters(unit: torch.nn.Module, fsdp_cls: type) -> Iterator[torch.nn.Parameter]:
    """The original parameters (use_orig_params) that FSDP unit `unit` shards itself: those of its
    wrapped module's tree, without descending into nested units."""
    stack = [unit.module]
    while stack:
        module = stack.pop()
        yield from module.parameters(recurse=False)
        stack.extend(child for child in module.children() if not isinstance(child, fsdp_cls))


def install_state_hooks(accelerator: Accelerator, strategy: Strategy) -> None:
    """Plain (DDP) runs: accelerate would write the whole model (the 14B base included, the
    reference's waste) and read it back. The trainable weights already sit in `trainable.safetensors`,
    so accelerate skips the model and `load_training_checkpoint` restores it from that file. (ZeRO and
    FSDP leave the frozen weights out in `save_training_checkpoint` itself.)"""
    if strategy.name != "ddp":
        return

    def skip_model_save(models: list, weights: list, output_dir: str) -> None:  # noqa: ARG001
        weights.clear()

    def skip_model_load(models: list, input_dir: str) -> None:  # noqa: ARG001
        models.clear()

    accelerator.register_save_state_pre_hook(skip_model_save)
    accelerator.register_load_state_pre_hook(skip_model_load)


def save_state(accelerator: Accelerator, model: torch.nn.Module, strategy: Strategy, folder: Path) -> None:
    """accelerate's state (optimizer, scheduler, RNG; the trainable model shards under ZeRO and FSDP) into `folder`,
    without the frozen weights: DeepSpeed's `exclude_frozen_parameters`, FSDP's state dict hooks, DDP's
    `install_state_hooks` (its model state is `trainable.safetensors`)."""
    if strategy.name in ("zero2", "zero3"):
        accelerator.save_state(str(folder), exclude_frozen_parameters=True)
    elif strategy.name == "fsdp":
        with fsdp_trainable_only(model):
            accelerator.save_state(str(folder))
    else:
        accelerator.save_state(str(folder))


def load_state(accelerator: Accelerator, model: torch.nn.Module, strategy: Strategy, folder: Path, state: Path) -> None:
    """Restore what `save_state` wrote in `state` (of checkpoint `folder`): ZeRO's module state non-strict and
    verified, FSDP's trainable shards (FSDP1 with its optimizer state created first), DDP's trainable weights from
    `trainable.safetensors`."""
    if strategy.name in ("zero2", "zero3"):
        # not strict: the frozen weights were excluded at save; that every trainable one is there is checked
        module = accelerator.unwrap_model(model)
        with recorded_load_keys(module) as loads:
            accelerator.load_state(str(state), load_module_strict=False)
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        verify_module_state(loads, trainable, state)
    elif strategy.name == "fsdp":
        if strategy.fsdp_version == 1:
            for optimizer in accelerator._optimizers:  # the prepared ones (accelerate keeps no public list)
                init_optimizer_state(optimizer.optimizer)
        with fsdp_trainable_only(model):
            accelerator.load_state(str(state))
    else:
        accelerator.load_state(str(state))
        _restore_plain_trainable(accelerator, model, folder)


def _restore_plain_trainable(accelerator: Accelerator, model: torch.nn.Module, folder: Path) -> None:
    """DDP: the trainable weights come from `trainable.safetensors`, which must name exactly them."""
    saved = load_file(str(folder / WEIGHTS_NAME))
    unwrapped = accelerator.unwrap_model(model)
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    missing = sorted(set(trainable) - set(saved))
    unexpected = sorted(set(saved) - set(trainable))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS_NAME} does not match this run's trainable parameters: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (was --trainable_modules changed?)"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name].to(param.dtype))
