"""Write tensors as size-capped safetensors shards with a diffusers-style index, into an output folder that appears
all at once (a temporary sibling renamed at the end) or not at all.

Shards are planned from names, shapes and the output dtype before any tensor is read, so file names
(``<stem>-0000i-of-0000n.safetensors``) are final from the first write and memory holds one shard at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from fantasytalk_cli.checkpoints.folder import ConversionError, ConversionUsageError
from fantasytalk_cli.fileio import follow_umask, swap_folder
from fantasytalk_cli.models.key_mapping import Shape

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"80GB"`` -> bytes. KB/MB/GB/TB are decimal (1GB = 10^9 bytes, as the Hugging Face hub counts),
    KiB/MiB/GiB/TiB binary; a bare number is bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE_RE.match(text)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ConversionUsageError(
                f"--max_shard_size {text!r}: expected a number with an optional unit (B, KB, MB, GB, TB, "
                "KiB, MiB, GiB, TiB), e.g. 80GB"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ConversionUsageError(f"--max_shard_size {text!r}: must be at least one byte")
    return value


@dataclass(frozen=True)
class Entry:
    """One output tensor: our name, its name in the file, shape and dtype."""

    name: str
    stored: str
    shape: Shape
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ShardPlan:
    """Which entries go in which file; ``oversized`` are tensors alone in a shard because they exceed the cap."""

    stem: str
    shards: list[list[Entry]]
    max_bytes: int
    oversized: list[Entry]

    @property
    def files(self) -> list[str]:
        n = len(self.shards)
        if n == 1:
            return [f"{self.stem}.safetensors"]
        return [f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for shard in self.shards for e in shard)

    @property
    def index_name(self) -> str | None:
        return f"{self.stem}.safetensors.index.json" if len(self.shards) > 1 else None


def plan_shards(entries: list[Entry], stem: str, max_bytes: int) -> ShardPlan:
    """Fill shards in order, starting a new one when the next tensor would pass ``max_bytes``."""
    stored = [e.stored for e in entries]
    if len(set(stored)) != len(stored):
        dupes = sorted({s for s in stored if stored.count(s) > 1})
        raise ConversionError(f"two tensors would be written under the same name: {dupes[:10]}")
    shards: list[list[Entry]] = []
    oversized: list[Entry] = []
    size = 0
    for entry in entries:
        if entry.nbytes > max_bytes:
            oversized.append(entry)
        if not shards or (shards[-1] and size + entry.nbytes > max_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    return ShardPlan(stem, shards or [[]], max_bytes, oversized)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write one shard (a seam for the interruption test)."""
    save_file(tensors, str(path), metadata={"format": "pt"})
    follow_umask(path)


def write_shards(
    folder: Path,
    plan: ShardPlan,
    tensors: Iterator[tuple[str, torch.Tensor]],
    *,
    keep: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Write ``plan``'s shards from ``tensors`` (``(name, tensor)`` in the plan's order), cast to each entry's dtype;
    returns the files written (the index included). ``keep`` collects the cast tensors by our name."""
    done, total = 0, plan.total_bytes
    weight_map: dict[str, str] = {}
    for shard, file in zip(plan.shards, plan.files, strict=True):
        data: dict[str, torch.Tensor] = {}
        for entry in shard:
            name, tensor = next(tensors)
            if name != entry.name:
                raise RuntimeError(f"tensor order broke: expected {entry.name}, got {name}")
            if tuple(tensor.shape) != entry.shape:
                raise ConversionError(f"{name}: shape {list(tensor.shape)}, expected {list(entry.shape)}")
            out = tensor.to(dtype=entry.dtype, copy=True).contiguous()  # a copy: never a view of a mapped file
            data[entry.stored] = out
            if keep is not None:
                keep[entry.name] = out
            weight_map[entry.stored] = file
            done += entry.nbytes
        _save_shard(data, folder / file)
        del data
        if progress is not None:
            progress(done, total)
    files = list(plan.files)
    if plan.index_name is not None:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / plan.index_name).write_text(json.dumps(index, indent=2) + "\n")
        files.append(plan.index_name)
    return files


# --------------------------------------------------------------------------------------------------------------------
# The output folder, all at once.

_TMP_RE = re.compile(r"^\.(?P<name>.+)\.converting-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(output: Path) -> list[Path]:
    """Remove temporary folders of earlier conversions to ``output`` whose process is gone."""
    removed = []
    if output.parent.is_dir():
        for child in output.parent.iterdir():
            match = _TMP_RE.match(child.name)
            if match and match["name"] == output.name and child.is_dir() and not _alive(int(match["pid"])):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not overwrite:
        raise ConversionUsageError(f"{output} exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise ConversionUsageError(f"{output} exists and is not a folder")


@contextmanager
def atomic_output(output: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder to write into; renamed to ``output`` when the block succeeds, removed when not.

    A killed process leaves only ``.<name>.converting-<pid>`` (cleaned by the next conversion to the same output)."""
    output = output.absolute()
    check_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(output)
    tmp = output.parent / f".{output.name}.converting-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        check_output(output, overwrite)
        swap_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
