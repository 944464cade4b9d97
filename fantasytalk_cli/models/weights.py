"""Stored tensors (safetensors files or shards, torch ``.pth``) streamed into a model built on the meta device.

Every model is built on the meta device and filled tensor by tensor (``safe_open`` per tensor,
``torch.load(weights_only=True, mmap=True)`` for ``.pth``), cast on the way, so peak memory is about one copy of
the model. Each file goes through a `state_dict_adapters` map that is checked on names and shapes before a byte of
weights is read: a missing, unexpected or wrong-shape key is a `ModelLoadError` naming the file and keys.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from torch import nn

from fantasytalk_cli.models.key_mapping import MappingPlan, Shape, StateDictAdapter, plan_mapping
from fantasytalk_cli.models.layout import ModelLoadError, need, read_json

Device = str | torch.device
M = TypeVar("M", bound=nn.Module)


# --------------------------------------------------------------------------------------------------------------------
# Stored tensors: safetensors (one file or shards + index) and torch .pth files.


def _diagnose_safetensors(path: Path) -> str:
    """Say what is wrong with an unreadable safetensors file, naming the first tensor a truncation cuts."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + header_len > size:
                return f"the header claims {header_len} bytes but the file has {size}: truncated or not safetensors"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"the header is unreadable ({exc})"
    data_len = size - 8 - header_len
    entries = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    for end, key in entries:
        if end > data_len:
            return f"truncated: tensor {key!r} needs {end} bytes of data but the file holds {data_len}"
    return "the file is corrupt"


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: missing") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for every header problem
        raise ModelLoadError(f"{path}: cannot read safetensors: {_diagnose_safetensors(path)} ({exc})") from exc
    with handle as f:
        yield f


def load_torch_file(path: Path) -> Any:
    """``torch.load`` a checkpoint safely (``weights_only=True``) and lazily (``mmap=True``) where the format allows."""
    need(path, "torch checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise ModelLoadError(f"{path}: cannot read the torch checkpoint (truncated or corrupt?): {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the torch checkpoint (truncated or corrupt?): {exc}") from exc
    try:  # the legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the torch checkpoint (truncated or corrupt?): {exc}") from exc


@dataclass
class TensorSource:
    """Where one model's stored tensors are: ``key -> file`` and ``key -> shape``, known before any data is read."""

    where: Path
    """The file, or the index file of a sharded set: what error messages name."""
    files: dict[Path, list[str]]
    """Each file with its keys, in reading order."""
    shapes: dict[str, Shape]
    state: dict[str, torch.Tensor] | None = None
    """For a ``.pth``: the lazily loaded (memory-mapped) state dict."""

    def file_of(self, key: str) -> str:
        """The file name holding ``key``."""
        return next((path.name for path, keys in self.files.items() if key in keys), self.where.name)

    @contextmanager
    def reader(self, path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
        """A function reading one tensor of ``path`` at a time."""
        if self.state is not None:
            state = self.state
            yield lambda key: state[key]
            return
        with _open_safetensors(path) as handle:
            yield lambda key: _read_tensor(handle, key, path)


def _read_tensor(handle: Any, key: str, path: Path) -> torch.Tensor:
    """One tensor out of an open safetensors file (the only place loaders read safetensors data)."""
    try:
        return handle.get_tensor(key)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read tensor {key!r}: {exc}") from exc


def safetensors_source(folder: Path, stem: str, what: str, *, single_only: bool = False) -> TensorSource:
    """The tensors of the shards listed in ``<stem>.safetensors.index.json``, else of ``<stem>.safetensors``
    (only the latter with ``single_only``).

    Each shard's header is read (not its data) and must hold exactly the keys the index gives it.
    """
    index_path = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index_path.is_file() and not single_only:
        weight_map = read_json(index_path, what).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path}: no weight_map")
        by_file: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(folder / name, []).append(key)
        where = index_path
    elif single.is_file():
        by_file, where = {single: []}, single
    else:
        raise ModelLoadError(f"{single} (or its sharded index {index_path.name}): missing ({what})")
    shapes: dict[str, Shape] = {}
    files: dict[Path, list[str]] = {}
    for path, listed in sorted(by_file.items()):
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: missing shard ({what}; the index maps {len(listed)} keys to it, e.g. {listed[0]!r})"
            )
        with _open_safetensors(path) as handle:
            keys = sorted(handle.keys())
            for key in keys:
                shapes[key] = tuple(handle.get_slice(key).get_shape())
        if listed and set(listed) != set(keys):
            extra, lost = sorted(set(keys) - set(listed)), sorted(set(listed) - set(keys))
            raise ModelLoadError(
                f"{path}: keys differ from {index_path.name}: in the shard but not the index {extra[:10]}, "
                f"in the index but not the shard {lost[:10]}"
            )
        files[path] = keys
    return TensorSource(where, files, shapes)


def torch_source(path: Path, what: str) -> TensorSource:
    """The tensors of a ``.pth`` state dict (memory-mapped; nothing is copied until a tensor is used)."""
    state = load_torch_file(need(path, what))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a flat state dict of tensors ({what})")
    return TensorSource(path, {path: sorted(state)}, {k: tuple(v.shape) for k, v in state.items()}, state)


# --------------------------------------------------------------------------------------------------------------------
# Streaming into a meta-built model.


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with its parameters on the meta device (buffers stay real: RoPE tables, position ids)."""
    with parameters_on_meta():
        return factory()


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Inside: every parameter a module registers moves to the meta device as it is registered (its class, its
    attributes and `requires_grad` kept), so no weight stays allocated; buffers are left as they are made."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            made = module._parameters[name]
            assert made is not None
            kwargs = {**made.__dict__, "requires_grad": made.requires_grad}
            module._parameters[name] = type(made)(made.to("meta"), **kwargs)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def model_shapes(model: nn.Module) -> tuple[dict[str, Shape], dict[str, str]]:
    """Every parameter and persistent buffer name with its shape, and ``alias -> canonical`` for tied tensors."""
    shapes: dict[str, Shape] = {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions know their full shape
        canonical = first.setdefault(id(param), name)
        if canonical != name:
            aliases[name] = canonical
    for module_name, module in model.named_modules():
        for leaf, buf in module._buffers.items():
            if buf is not None and leaf not in module._non_persistent_buffers_set:
                shapes[f"{module_name}.{leaf}" if module_name else leaf] = tuple(buf.shape)
    return shapes, aliases


def fp32_rule(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which names stay float32 when loading in a lower precision: the model class's own rule, as
    diffusers (``_keep_in_fp32_modules``, any dtype) and transformers (fp16 only, or ``..._strict``) apply it."""
    if dtype == torch.float32:
        return lambda name: False
    from diffusers import ModelMixin  # imported here: diffusers and transformers take seconds to import
    from transformers import PreTrainedModel

    modules: set[str] = set()
    if isinstance(model, ModelMixin):
        modules |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    elif isinstance(model, PreTrainedModel):
        modules |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            modules |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return lambda name: bool(modules.intersection(name.split(".")))


def set_tensor(
    model: nn.Module, name: str, value: torch.Tensor, *, dtype: torch.dtype, device: Device, own: bool = False
) -> None:
    """Put ``value`` into parameter/buffer ``name``: assigned when still on meta (no second copy), copied into the
    existing tensor otherwise (keeping its dtype and device).

    ``own=True`` makes an assigned tensor own its memory even when no cast or move copied it: a tensor read from a
    safetensors shard is a view of the shard's memory map, and one surviving view (say a float32-kept norm) would
    keep the whole mapped shard resident after the shard is done.
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    slots = module._parameters if leaf in module._parameters else module._buffers if leaf in module._buffers else None
    if slots is None:
        raise ModelLoadError(f"{type(model).__name__} has no parameter or buffer {name!r}")
    old = slots[leaf]
    if old is not None and not old.is_meta:
        with torch.no_grad():
            old.copy_(value.to(device=old.device, dtype=old.dtype))
        return
    tensor = value.to(device=device, dtype=dtype)
    if own and tensor.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
        tensor = tensor.clone()
    if slots is module._parameters:
        slots[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    else:
        slots[leaf] = tensor


def plan_for(model: nn.Module, source: TensorSource, adapter: StateDictAdapter) -> MappingPlan:
    """Plan ``source`` into ``model`` by names and shapes; a `ModelLoadError` lists every problem, each stored key
    with the shard holding it."""
    shapes, aliases = model_shapes(model)
    origin = source.file_of if len(source.files) > 1 else None
    plan = plan_mapping(adapter, source.shapes, shapes, aliases, origin)
    if not plan.ok:
        raise ModelLoadError(plan.problems(str(source.where)))
    return plan


def stream_into(
    model: nn.Module,
    source: TensorSource,
    plan: MappingPlan,
    *,
    dtype: torch.dtype,
    device: Device,
    dtype_for: Callable[[str], torch.dtype] | None = None,
) -> int:
    """Read ``source`` one tensor at a time into ``model`` following ``plan``; returns the tensors read."""
    keep_fp32 = fp32_rule(model, dtype)
    mapped = source.state is None  # safetensors shards are memory-mapped and closed one by one
    read = 0
    for path, keys in source.files.items():
        with source.reader(path) as get:
            for key in keys:
                targets = plan.moves.get(key)
                if not targets:
                    continue
                tensor = get(key)
                read += 1
                for target, transform in targets:
                    want = dtype_for(target) if dtype_for else (torch.float32 if keep_fp32(target) else dtype)
                    set_tensor(model, target, transform.apply(tensor), dtype=want, device=device, own=mapped)
                del tensor
    source.state = None  # drop the memory map of a .pth
    return read


def assert_materialised(model: nn.Module, where: Path) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ModelLoadError(f"{where}: parameters left unfilled after loading: {left[:20]}")


def _load(
    model: nn.Module, source: TensorSource, adapter: StateDictAdapter, *, dtype: torch.dtype, device: Device
) -> MappingPlan:
    plan = plan_for(model, source, adapter)
    stream_into(model, source, plan, dtype=dtype, device=device)
    return plan


def init_kwargs(cls: type, config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Constructor kwargs from a diffusers ``config.json``: ``_``-keys dropped, unknown keys an error."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelLoadError(f"{path}: keys {cls.__name__} does not take: {unknown}")
    return kwargs


def load_frozen(model: M, source: TensorSource, adapter: StateDictAdapter, *, dtype: torch.dtype, device: Device) -> M:
    """Fill a meta-built frozen model from ``source`` through ``adapter`` (checked first), strictly; eval, no grad."""
    stream_into(model, source, plan_for(model, source, adapter), dtype=dtype, device=device)
    assert_materialised(model, source.where)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# Models partitioned as they are built (ZeRO-3 init).


@dataclass(frozen=True)
class ShardedBuild:
    """How to build and fill a transformer whose parameters are partitioned as it is built (ZeRO-3 init)."""

    context: Callable[[], Any]
    """A context manager inside which modules are built partitioned."""
    write: Callable[[nn.Parameter, torch.Tensor | None], None]
    """Collective: write a whole tensor (given on the reading rank, None elsewhere) into one parameter."""
    reads: bool
    """Whether this rank reads the files."""


def write_sharded(model: nn.Module, source: TensorSource, plan: MappingPlan, sharded: ShardedBuild) -> int:
    """Every rank walks the same keys in the same order (each write is a collective); returns tensors read."""
    params = dict(model.named_parameters())
    read = 0
    for path, keys in source.files.items():
        with source.reader(path) as get:
            for key in keys:
                for target, transform in plan.moves.get(key, ()):
                    if target not in params:
                        raise ModelLoadError(f"{source.where}: {key} maps to {target}, not a parameter")
                    sharded.write(params[target], transform.apply(get(key)) if sharded.reads else None)
                    read += 1
    source.state = None
    return read
