"""Resume never runs code from a checkpoint: every pickle that resuming would unpickle is read first, without
unpickling, and refused if it names any global outside an allow-list of plain data types.

A pickle can only run code by naming a callable (a GLOBAL / STACK_GLOBAL / INST opcode) that unpickling
then calls. `pickle_globals` lists what a pickle names by walking its opcodes with `pickletools` (nothing
is executed, nothing is imported); torch files are zip archives whose `data.pkl` holds that pickle (the
tensor bytes are separate records). The allow-lists hold what accelerate's optimizer, scheduler and RNG
files and torch's distributed-checkpoint metadata need, nothing callable beyond rebuilding tensors, numpy
arrays and those metadata records. accelerate then loads the torch files with `weights_only=True` as
well; torch's distributed checkpoint reads its `.metadata` with plain `pickle`, which is why this check
comes first.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

from fantasytalk_cli.errors import FtalkError

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_NO_PUSH = {"MEMOIZE", "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK"} | _PUT_OPS

TENSOR_STATE_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("torch.storage", "UntypedStorage"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }
)
"""Rebuilding tensors, numpy arrays (the RNG states) and ordered dicts: what accelerate's optimizer,
scheduler, sampler and RNG files need (besides the typed storages and dtypes allowed by name below)."""

_DCP = "torch.distributed.checkpoint.metadata"
DCP_METADATA_GLOBALS = frozenset(
    {
        (_DCP, "Metadata"),
        (_DCP, "MetadataIndex"),
        (_DCP, "StorageMeta"),
        (_DCP, "TensorProperties"),
        (_DCP, "TensorStorageMetadata"),
        (_DCP, "BytesStorageMetadata"),
        (_DCP, "ChunkStorageMetadata"),
        (_DCP, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch.serialization", "_get_layout"),
        ("torch", "Size"),
        ("pathlib", "PosixPath"),
        ("collections", "OrderedDict"),
    }
)
"""torch's distributed checkpoint (FSDP) `.metadata`: its record classes (dataclasses and an enum holding
values), sizes, dtypes and layouts, the checkpoint's path."""


class UnsafeCheckpointError(FtalkError):
    """A checkpoint file names code that loading would run."""


def _is_plain_type(module: str, name: str) -> bool:
    """Typed storages (`torch.FloatStorage`), dtypes (`torch.float32`), numpy dtype classes: data types."""
    if module == "torch" and (name.endswith("Storage") or name in _TORCH_DTYPES):
        return True
    return module in ("numpy.dtypes", "numpy") and name.endswith("DType")


_TORCH_DTYPES = {
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "complex64", "complex128", "float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64",
    "contiguous_format", "channels_last", "preserve_format", "strided",
}  # fmt: skip


def pickle_globals(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs a pickle refers to, read from its opcodes without unpickling. A global whose
    name is not a literal string (built on the stack by other means) is reported as `("?", "?")`."""
    found: set[tuple[str, str]] = set()
    memo: dict[int, object] = {}
    pushed: list[object] = []  # what the recent opcodes pushed (strings, else None)
    for opcode, arg, _pos in pickletools.genops(io.BytesIO(data)):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.add((module, attr))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
            found.add((module, attr) if isinstance(module, str) and isinstance(attr, str) else ("?", "?"))
            pushed.append(None)
        elif name in _STRING_OPS:
            pushed.append(arg if isinstance(arg, str) else arg.decode("latin-1") if isinstance(arg, bytes) else None)
        elif name in _GET_OPS:
            pushed.append(memo.get(int(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in _PUT_OPS:
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name not in _NO_PUSH:
            pushed.append(None)
        if len(pushed) > 64:
            del pushed[:-8]
    return found


def _pickle_bytes(path: Path) -> list[tuple[str, bytes]]:
    """The pickles inside `path`: a torch zip archive's `data.pkl` records, or the file itself."""
    raw = path.read_bytes()
    if zipfile.is_zipfile(io.BytesIO(raw)):
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            return [(f"{path}:{n}", archive.read(n)) for n in archive.namelist() if n.endswith(".pkl")]
    return [(str(path), raw)]


def check_pickle_file(path: Path, allowed: frozenset[tuple[str, str]]) -> None:
    """Raise `UnsafeCheckpointError` when the pickle(s) in `path` name anything but `allowed` pairs or plain
    data types. Nothing in the file is executed."""
    for where, data in _pickle_bytes(path):
        try:
            names = pickle_globals(data)
        except Exception as exc:  # noqa: BLE001 (any malformed opcode stream)
            raise UnsafeCheckpointError(f"{where} is not a readable pickle ({exc}): the checkpoint is damaged") from exc
        bad = sorted(f"{m}.{n}" for m, n in names if (m, n) not in allowed and not _is_plain_type(m, n))
        if bad:
            raise UnsafeCheckpointError(
                f"{where} refers to {', '.join(bad[:5])}, which loading would call: a checkpoint holds only tensors "
                "and plain values, so this file was altered or written by another tool. Refused; nothing was "
                "loaded. Resume from a checkpoint you wrote, or from a trusted copy"
            )
