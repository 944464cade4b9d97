"""Read the trained weights out of a checkpoint folder, whatever wrote it, one tensor at a time.

Kinds, told apart by their files (in ``checkpoint-N/accelerate/`` for our checkpoints, in ``checkpoint-N/`` itself for
the reference trainer's plain ``save_state`` output):

- ``zero1``/``zero2``/``zero3``: DeepSpeed's ``latest`` (or ``--tag``) naming a folder of ``*_model_states.pt`` and
  ``zero_pp_rank_R_mp_rank_00_optim_states.pt``. The fp32 weights are rebuilt from the optimizer's flat partitions the
  way DeepSpeed's ``zero_to_fp32`` does (the layout facts are DeepSpeed's; the code is ours): ZeRO-1/2 concatenate
  the ranks' partitions of each parameter group and cut the parameters out in order, skipping recorded alignment
  padding; ZeRO-3 gives every parameter ``ceil(numel / world)`` elements on each rank, padded at the end.
- ``fsdp``: a ``torch.distributed.checkpoint`` folder ``pytorch_model_fsdp_0/`` (FSDP1 and FSDP2 write the same
  format), read without a process group; which parameters were trained comes from ``optimizer_0/``.
- ``plain``: our ``trainable.safetensors`` (DDP checkpoints, where it is the model).

Pickled DeepSpeed files are loaded with ``weights_only=True``: the few DeepSpeed classes they name are replaced by
inert stand-ins, so no code from a checkpoint runs and DeepSpeed need not be importable. Files are memory-mapped:
only the bytes of the tensors asked for are read.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fantasytalk_cli.checkpoints.folder import (
    FSDP_MODEL_DIR,
    FSDP_OPTIM_DIR,
    WEIGHTS_NAME,
    ConversionError,
    ConversionUsageError,
    deepspeed_tag,
    resolve_checkpoint,
    state_roots,
    trainable_patterns,
)
from fantasytalk_cli.models.key_mapping import Shape
from fantasytalk_cli.models.trainable import is_adapter_name

_OPTIM_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
DCP_READ_BYTES = 256 * 2**20
"""Tensors read per ``torch.distributed.checkpoint`` call (a single larger tensor is read alone)."""


# --------------------------------------------------------------------------------------------------------------------
# The common interface.


@dataclass
class CheckpointSource:
    """One checkpoint's trained weights: names and shapes known up front, tensors read on demand (fp32)."""

    kind: str
    folder: Path
    trainable: dict[str, Shape]
    """Trained parameters (our names) in the order the source stores them."""
    description: str
    frozen_count: int = 0
    """Frozen tensors the checkpoint also holds (never read: the base model folder provides them)."""
    notes: list[str] = field(default_factory=list)

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for each of ``names``, in that order; tensors may be views of memory-mapped files."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop memory maps and handles."""


def open_checkpoint(path: Path, tag: str | None = None) -> CheckpointSource:
    """Detect the kind of the checkpoint at ``path`` (or a run folder's newest) and open it."""
    folder = resolve_checkpoint(path)
    for root in state_roots(folder):
        found = deepspeed_tag(root, tag)
        if found is not None:
            return ZeroSource.open(folder, root, found)
        if (root / FSDP_MODEL_DIR / ".metadata").is_file():
            return DcpSource.open(folder, root)
    if tag is not None:
        raise ConversionUsageError(f"{folder}: --tag {tag} given, but there is no DeepSpeed checkpoint with that tag")
    if (folder / WEIGHTS_NAME).is_file():
        return PlainSource.open(folder)
    raise ConversionError(f"{folder}: no model weights found (no DeepSpeed or FSDP shards, no {WEIGHTS_NAME})")


# --------------------------------------------------------------------------------------------------------------------
# Our plain trainable.safetensors.


@dataclass
class PlainSource(CheckpointSource):
    handle: Any = None

    @classmethod
    def open(cls, folder: Path) -> PlainSource:
        from safetensors import safe_open

        path = folder / WEIGHTS_NAME
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        except Exception as exc:
            raise ConversionError(f"{path}: cannot read safetensors (truncated or corrupt?): {exc}") from exc
        return cls("plain", folder, shapes, f"plain ({WEIGHTS_NAME}, {len(shapes)} tensors)", handle=handle)

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            try:
                yield name, self.handle.get_tensor(name).float()
            except Exception as exc:
                raise ConversionError(f"{self.folder / WEIGHTS_NAME}: cannot read tensor {name!r}: {exc}") from exc

    def close(self) -> None:
        self.handle = None


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO partitions.


class _Inert:
    """Stand-in for a class a DeepSpeed pickle names (a loss scaler, an enum, a fragment address): keeps its
    arguments and state, runs nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


def load_pickled(path: Path) -> Any:
    """``torch.load`` a DeepSpeed ``.pt`` safely (``weights_only``, unknown classes inert) and memory-mapped."""
    if not path.is_file():
        raise ConversionError(f"{path}: missing")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins = [(type(name.rpartition(".")[2], (_Inert,), {}), name) for name in names]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise ConversionError(f"{path}: cannot read it (truncated or corrupt?): {exc}") from exc


def _pieces(flats: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Elements ``[start, start + length)`` of the virtual concatenation of ``flats``, as views."""
    out: list[torch.Tensor] = []
    base = 0
    for flat in flats:
        size = flat.numel()
        lo, hi = max(start, base), min(start + length, base + size)
        if lo < hi:
            out.append(flat.narrow(0, lo - base, hi - lo))
        base += size
        if base >= start + length:
            break
    return out


@dataclass
class _ZeroSlot:
    """Where one trained parameter lies in the partitions: ZeRO-1/2 (group, offset in the group's full flat vector),
    ZeRO-3 (offset in each rank's virtual flat vector, elements per rank)."""

    group: int
    offset: int
    per_rank: int = 0


@dataclass
class ZeroSource(CheckpointSource):
    stage: int = 2
    world: int = 1
    partitions: list[list[torch.Tensor]] = field(default_factory=list)
    """``partitions[rank][group]``: the rank's flat fp32 vector of each group."""
    slots: dict[str, _ZeroSlot] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path, root: Path, tag: str) -> ZeroSource:
        ds_dir = root / tag
        optim = cls._optimizer_files(ds_dir)
        first = load_pickled(optim[0])
        osd = cls._optimizer_state(first, optim[0])
        world = osd.get("partition_count")
        world = max(world) if isinstance(world, list) else world
        if not isinstance(world, int) or world < 1:
            raise ConversionError(f"{optim[0]}: no partition_count: not a ZeRO optimizer state")
        found = {int(_OPTIM_RE.match(p.name).group(1)): p for p in optim}  # type: ignore[union-attr]
        expected = {r: ds_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)}
        missing = [str(p) for r, p in expected.items() if r not in found]
        if missing:
            raise ConversionError(
                f"{ds_dir}: the ZeRO checkpoint was written by {world} ranks but partition(s) are missing: "
                f"{', '.join(missing)}"
            )
        extra = sorted(str(p) for r, p in found.items() if r not in expected)
        if extra:
            raise ConversionError(
                f"{ds_dir}: partitions of more ranks than the {world} that wrote this checkpoint: {extra} "
                "(left over from an older checkpoint?)"
            )
        states = [first] + [load_pickled(expected[r]) for r in range(1, world)]
        osds = [cls._optimizer_state(s, expected[r]) for r, s in enumerate(states)]
        if "fp32_flat_groups" in osd:
            stage, key = 3, "fp32_flat_groups"
        elif "single_partition_of_fp32_groups" in osd:
            stage, key = cls._stage_of(osd), "single_partition_of_fp32_groups"
        else:
            raise ConversionError(f"{optim[0]}: holds no fp32 partitions (neither ZeRO-1/2 nor ZeRO-3 layout)")
        partitions = []
        for r, o in enumerate(osds):
            groups = o.get(key)
            if not isinstance(groups, list | tuple) or not all(isinstance(g, torch.Tensor) for g in groups):
                raise ConversionError(f"{expected[r]}: {key} is missing or not a list of tensors")
            partitions.append([g.reshape(-1) for g in groups])
        model_file = ds_dir / (
            "zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt"
        )
        model_state = load_pickled(model_file)
        if not isinstance(model_state, dict) or "param_shapes" not in model_state:
            raise ConversionError(f"{model_file}: no param_shapes: not a DeepSpeed model state file")
        param_shapes = [
            {str(n): tuple(int(s) for s in shape) for n, shape in g.items()} for g in model_state["param_shapes"]
        ]
        source = cls(
            kind=f"zero{stage}",
            folder=folder,
            trainable={},
            description="",
            stage=stage,
            world=world,
            partitions=partitions,
        )
        if stage == 3:
            source._layout_zero3(param_shapes, optim[0])
        else:
            source._layout_zero12(param_shapes, osd.get("param_alignment_paddings"), optim[0])
        shared = model_state.get("shared_params") or {}
        source.aliases = {str(a): str(b) for a, b in shared.items() if str(b) in source.slots}
        for alias, target in source.aliases.items():
            source.trainable[alias] = source.trainable[target]
        frozen = model_state.get("frozen_param_shapes") or {}
        source.frozen_count = len(frozen)
        where = root.relative_to(folder) if root != folder else Path(".")
        source.description = (
            f"DeepSpeed ZeRO-{stage} ({world} partitions, tag {tag!r} in {where}/; "
            f"{len(source.trainable)} trained tensors, {len(frozen)} frozen stored)"
        )
        return source

    @staticmethod
    def _optimizer_files(ds_dir: Path) -> list[Path]:
        files = sorted((p for p in ds_dir.glob("*_optim_states.pt") if _OPTIM_RE.match(p.name)), key=lambda p: p.name)
        if not files:
            raise ConversionError(f"{ds_dir}: no zero_pp_rank_*_mp_rank_00_optim_states.pt (ZeRO partitions) found")
        ranks = {(int(m.group(1)), int(m.group(2))) for p in files if (m := _OPTIM_RE.match(p.name))}
        if any(mp != 0 for _, mp in ranks):
            raise ConversionError(f"{ds_dir}: tensor/pipeline-parallel (mp_rank > 0) checkpoints are not supported")
        return sorted(files, key=lambda p: int(_OPTIM_RE.match(p.name).group(1)))  # type: ignore[union-attr]

    @staticmethod
    def _optimizer_state(state: Any, path: Path) -> dict[str, Any]:
        osd = state.get("optimizer_state_dict") if isinstance(state, dict) else None
        if not isinstance(osd, dict):
            raise ConversionError(f"{path}: no optimizer_state_dict: not a ZeRO optimizer state file")
        return osd

    @staticmethod
    def _stage_of(osd: dict[str, Any]) -> int:
        value = osd.get("zero_stage")
        value = value.args[0] if isinstance(value, _Inert) and value.args else value
        return int(value) if isinstance(value, int) and value in (1, 2) else 2

    def _layout_zero12(self, param_shapes: list[dict[str, Shape]], paddings: Any, where: Path) -> None:
        groups = len(self.partitions[0])
        if len(param_shapes) != groups or any(len(p) != groups for p in self.partitions):
            raise ConversionError(
                f"{where}: {len(param_shapes)} parameter groups in the model state, "
                f"{[len(p) for p in self.partitions]} fp32 groups in the ranks' partitions"
            )
        align = 2 * self.world
        for g, shapes in enumerate(param_shapes):
            sizes = {p[g].numel() for p in self.partitions}
            if len(sizes) != 1:
                raise ConversionError(f"{where}: group {g} has partitions of different sizes {sorted(sizes)}")
            available = sizes.pop() * self.world
            pads = paddings[g] if isinstance(paddings, list) and g < len(paddings) else None
            if pads is not None and len(pads) != len(shapes):
                raise ConversionError(f"{where}: group {g} has {len(pads)} alignment paddings for {len(shapes)} params")
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                self.slots[name] = _ZeroSlot(g, offset)
                self.trainable[name] = shape
                offset += math.prod(shape) + (int(pads[i]) if pads is not None else 0)
            # DeepSpeed pads each group's flat vector to a multiple of 2 * world: compare aligned sizes
            if align * math.ceil(offset / align) != align * math.ceil(available / align):
                raise ConversionError(
                    f"{where}: group {g} parameters take {offset} elements but the partitions hold {available}"
                )

    def _layout_zero3(self, param_shapes: list[dict[str, Shape]], where: Path) -> None:
        totals = {sum(g.numel() for g in p) for p in self.partitions}
        if len(totals) != 1:
            raise ConversionError(f"{where}: the ranks' fp32 partitions differ in size {sorted(totals)}")
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                per_rank = math.ceil(math.prod(shape) / self.world)
                self.slots[name] = _ZeroSlot(0, offset, per_rank)
                self.trainable[name] = shape
                offset += per_rank
        if offset != totals.pop():
            raise ConversionError(f"{where}: parameters take {offset} elements per rank, the partitions hold more/less")

    def _tensor(self, name: str) -> torch.Tensor:
        slot, shape = self.slots[name], self.trainable[name]
        numel = math.prod(shape)
        if self.stage == 3:
            pieces = [piece for flats in self.partitions for piece in _pieces(flats, slot.offset, slot.per_rank)]
        else:
            pieces = _pieces([p[slot.group] for p in self.partitions], slot.offset, numel)
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return flat[:numel].view(shape)

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for name in names:
            yield name, self._tensor(self.aliases.get(name, name))

    def close(self) -> None:
        self.partitions = []


# --------------------------------------------------------------------------------------------------------------------
# torch.distributed.checkpoint (FSDP1/FSDP2 SHARDED_STATE_DICT).


@dataclass
class DcpSource(CheckpointSource):
    model_dir: Path = Path()
    keys: dict[str, str] = field(default_factory=dict)
    """Our name -> the DCP key (``model.<name>``)."""
    metadata: Any = None

    @classmethod
    def open(cls, folder: Path, root: Path) -> DcpSource:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        model_dir = root / FSDP_MODEL_DIR
        metadata = _dcp_metadata(model_dir)
        keys: dict[str, str] = {}
        shapes: dict[str, Shape] = {}
        for key, item in metadata.state_dict_metadata.items():
            if not isinstance(item, TensorStorageMetadata):
                continue
            path = (metadata.planner_data or {}).get(key)
            name = ".".join(str(p) for p in path[1:]) if path and path[0] == "model" else key.removeprefix("model.")
            keys[name] = key
            shapes[name] = tuple(int(s) for s in item.size)
        notes: list[str] = []
        names, rule = _dcp_trained_names(root / FSDP_OPTIM_DIR, folder)
        if names is None:
            patterns = trainable_patterns(folder)
            if patterns:
                names = [n for n in shapes if any(p in n for p in patterns)]
                rule = f"meta.json trainable_modules {patterns}"
            else:
                names = [n for n in shapes if is_adapter_name(n)]
                rule = "the audio adapter's names (no optimizer state, no meta.json)"
            notes.append(f"trained parameters taken from {rule}")
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ConversionError(f"{model_dir}: the optimizer names parameters the model shards lack: {unknown[:10]}")
        trainable = {n: shapes[n] for n in shapes if n in set(names)}
        where = root.relative_to(folder) if root != folder else Path(".")
        description = (
            f"FSDP sharded state dict (torch.distributed.checkpoint in {where}/{FSDP_MODEL_DIR}/; trained parameters "
            f"from {rule}; {len(trainable)} trained tensors, {len(shapes) - len(trainable)} frozen stored)"
        )
        return cls(
            kind="fsdp",
            folder=folder,
            trainable=trainable,
            description=description,
            frozen_count=len(shapes) - len(trainable),
            notes=notes,
            model_dir=model_dir,
            keys=keys,
            metadata=metadata,
        )

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        batch: list[str] = []
        size = 0
        for name in names:
            item = self.metadata.state_dict_metadata[self.keys[name]]
            nbytes = math.prod(item.size) * item.properties.dtype.itemsize
            if batch and size + nbytes > DCP_READ_BYTES:
                yield from self._read_batch(batch)
                batch, size = [], 0
            batch.append(name)
            size += nbytes
        if batch:
            yield from self._read_batch(batch)

    def _read_batch(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        wanted = {self.keys[n] for n in names}
        _check_dcp_files(self.model_dir, self.metadata, wanted)
        state = {}
        for key in wanted:
            item = self.metadata.state_dict_metadata[key]
            state[key] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
        _dcp_load(self.model_dir, state, self.metadata)
        for name in names:
            yield name, state.pop(self.keys[name]).float()


def _dcp_metadata(folder: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(folder)).read_metadata()
    except Exception as exc:
        raise ConversionError(f"{folder / '.metadata'}: cannot read it (truncated or corrupt?): {exc}") from exc


def _check_dcp_files(folder: Path, metadata: Any, keys: set[str]) -> None:
    """Every ``.distcp`` file holding a piece of ``keys`` exists and is long enough; else name it."""
    need: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if index.fqn in keys:
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for relative, end in sorted(need.items()):
        path = folder / relative
        if not path.is_file():
            raise ConversionError(f"{path}: missing (a shard of the FSDP checkpoint; every rank's file is needed)")
        if path.stat().st_size < end:
            raise ConversionError(f"{path}: truncated ({path.stat().st_size} bytes, the checkpoint index needs {end})")


def _dcp_load(folder: Path, state: dict[str, Any], metadata: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class _Reader(FileSystemReader):  # the metadata is read once per checkpoint, not once per batch
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp.load(
                state,
                storage_reader=_Reader(str(folder)),
                planner=DefaultLoadPlanner(allow_partial_load=True),
                no_dist=True,
            )
    except Exception as exc:
        raise ConversionError(f"{folder}: cannot read {sorted(state)[:5]}: {exc}") from exc


def _dcp_trained_names(optim_dir: Path, folder: Path) -> tuple[list[str] | None, str]:
    """The parameters the optimizer trained (its param groups), from the FSDP optimizer checkpoint."""
    if not (optim_dir / ".metadata").is_file():
        return None, ""
    metadata = _dcp_metadata(optim_dir)
    groups = sorted(k for k in metadata.state_dict_metadata if re.fullmatch(r"optimizer\.param_groups\.\d+\.params", k))
    if groups:
        state: dict[str, Any] = dict.fromkeys(groups)
        _check_dcp_files(optim_dir, metadata, set(groups))
        _dcp_load(optim_dir, state, metadata)
        names = [str(n) for g in groups for n in (state[g] or [])]
        if names:
            return names, f"the optimizer's param groups ({optim_dir.relative_to(folder)}/)"
    found: list[str] = []
    for key in metadata.state_dict_metadata:
        path = (metadata.planner_data or {}).get(key)
        if path and len(path) == 4 and path[:2] == ("optimizer", "state") and str(path[2]) not in found:
            found.append(str(path[2]))
    return (found, f"the optimizer state ({optim_dir.relative_to(folder)}/)") if found else (None, "")
