"""The feature cache on disk: content-addressed safetensors files, one per (kind, key), plus per-rank
manifests of what was built.

    <root>/cache.json                                  {"format": "ftalk-feature-cache", "version": 1}
    <root>/<kind>/<key[:2]>/<key>.safetensors          tensors + metadata (format, version, kind, key, ...)
    <root>/manifest-<rank>.jsonl                       one line per entry built, appended by that rank
    <root>/done-<rank>.json                            that rank finished a run of world size N
    <root>/manifest.json                               the merged manifest: every rank's entries, once each,
                                                       written when every rank of the run has finished

A file is written atomically, so a reader sees a whole file or none; a damaged one (truncated, another
key, another version) reads as missing and is listed in `CacheStore.corrupt`: the caller recomputes it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from fantasytalk_cli.cache.fingerprint import append_json_line, read_json_lines
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import write_bytes_atomic, write_text_atomic

CACHE_FORMAT = "ftalk-feature-cache"
CACHE_VERSION = 1
CACHE_MARKER = "cache.json"
RANK_LOCK = ".ftalk-rank{rank}.lock"
"""The lock file one rank's `ftalk cache` process holds while it writes (`locks.py`)."""
_RANK_LOCK_RE = re.compile(r"^\.ftalk-rank\d+\.lock$")
MANIFEST_GLOB = "manifest-*.jsonl"
MERGED_MANIFEST = "manifest.json"

Kind = Literal["text", "audio", "video"]
KINDS: tuple[str, ...] = get_args(Kind)
RESERVED_META = ("format", "version", "kind", "key")
_KEY = re.compile(r"[0-9a-f]{2,}")
_NEW_CACHE_FIX = "pass a new --cache_dir (an empty or missing folder)"


class CacheError(FtalkError):
    """The cache folder cannot be used (another format or version, not a cache, not writable)."""


def check_root(root: Path) -> None:
    """Make `root` a cache folder of this format and version: created with its `cache.json` when missing or
    empty, accepted when its `cache.json` matches, refused (untouched) otherwise."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache folder {root} is a file, not a folder: {_NEW_CACHE_FIX}")
    names = {p.name for p in root.iterdir()} if root.is_dir() else set()
    if CACHE_MARKER in names:
        _check_marker(root / CACHE_MARKER)
        return
    # Another rank creating the same cache may have its `cache.json` temporary file (and its lock) there already.
    others = sorted(n for n in names if not n.startswith(f".{CACHE_MARKER}.") and not _RANK_LOCK_RE.match(n))
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise CacheError(
            f"{root} is not empty ({shown}) and holds no {CACHE_MARKER}: it is not a feature cache, "
            f"and nothing in it was touched; {_NEW_CACHE_FIX}"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(root / CACHE_MARKER, json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION}) + "\n")
    except OSError as exc:
        raise CacheError(f"cannot create the cache folder {root} ({exc.strerror or exc}): {_NEW_CACHE_FIX}") from exc


def _check_marker(marker: Path) -> None:
    """Raise unless `marker` says this format and version."""
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CacheError(f"cannot read {marker} ({exc}): {_NEW_CACHE_FIX}, or delete that folder") from exc
    got = (found.get("format"), found.get("version")) if isinstance(found, dict) else (None, None)
    if got != (CACHE_FORMAT, CACHE_VERSION):
        raise CacheError(
            f"{marker.parent} holds a feature cache of format {got[0]!r} version {got[1]!r}, this ftalk reads "
            f"{CACHE_FORMAT!r} version {CACHE_VERSION}: {_NEW_CACHE_FIX}, or delete that folder to rebuild it"
        )


def _check_entry(kind: str, key: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"cache kind must be one of {KINDS}, got {kind!r}")
    if not _KEY.fullmatch(key):
        raise ValueError(f"cache key must be lowercase hex (2+ digits), got {key!r}")


class CacheStore:
    """Content-addressed safetensors entries under `root` (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        check_root(self.root)
        self.corrupt: list[str] = []

    def path(self, kind: Kind, key: str) -> Path:
        """Where the entry (kind, key) lives."""
        _check_entry(kind, key)
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: Kind, key: str) -> bool:
        """The entry's file exists (nothing is read)."""
        return self.path(kind, key).is_file()

    def write(self, kind: Kind, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        """Write the entry atomically (contiguous CPU copies of `tensors`; `meta` plus format, version, kind
        and key as metadata); returns its path."""
        path = self.path(kind, key)
        clash = sorted(set(meta) & set(RESERVED_META))
        if clash:
            raise ValueError(f"meta keys {clash} are reserved by the cache")
        metadata = {**meta, "format": CACHE_FORMAT, "version": str(CACHE_VERSION), "kind": kind, "key": key}
        # One fresh copy each: no shared storage (which safetensors refuses), nothing on the GPU.
        stored = {
            name: t.detach().to(device="cpu", memory_format=torch.contiguous_format, copy=True)
            for name, t in tensors.items()
        }
        write_bytes_atomic(path, save(stored, metadata=metadata))
        return path

    def read(self, kind: Kind, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors; None when it is missing or damaged (a damaged one is listed in `corrupt`)."""
        path = self.path(kind, key)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                problem = _metadata_problem(handle.metadata(), kind, key)
                tensors = None if problem else {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            # Any failure to load a cache file means "recompute it", never a failed run.
            problem = f"unreadable ({exc})"
            tensors = None
        if problem:
            self.corrupt.append(f"{path}: {problem}")
        return tensors

    def record(self, rank_name: str, line: dict[str, Any]) -> None:
        """Append one line to this rank's manifest `manifest-<rank_name>.jsonl` (fsync'd)."""
        if not rank_name or "/" in rank_name:
            raise ValueError(f"rank_name must be a plain file-name part, got {rank_name!r}")
        append_json_line(self.root / f"manifest-{rank_name}.jsonl", line)

    def manifest(self) -> list[dict[str, Any]]:
        """The lines of every rank's manifest (files in name order, torn or malformed lines skipped)."""
        return [record for path in sorted(self.root.glob(MANIFEST_GLOB)) for record in read_json_lines(path)[0]]

    def start_rank(self, rank: int) -> None:
        """A new run of this rank begins: its finished-marker of an earlier run no longer counts."""
        (self.root / f"done-{rank}.json").unlink(missing_ok=True)

    def finish_rank(self, rank: int, world_size: int) -> Path | None:
        """Mark this rank finished; when every rank of this world size has, write the merged manifest (the path).

        No collective is needed: a rank's marker is written after its last manifest line, so the rank that finds
        every marker reads every line. Ranks finishing together both write the same content, atomically."""
        write_text_atomic(self.root / f"done-{rank}.json", json.dumps({"rank": rank, "world_size": world_size}))
        for other in range(world_size):
            try:
                marker = json.loads((self.root / f"done-{other}.json").read_text())
            except (OSError, ValueError):
                return None
            if marker.get("world_size") != world_size:
                return None
        return self.write_merged_manifest()

    def write_merged_manifest(self) -> Path:
        """`manifest.json`: every entry of every rank's manifest once, by (kind, key): the same whichever rank
        built what, so a 2-process cache's equals a 1-process one's."""
        entries = {(r["kind"], r["key"]): r["file"] for r in self.manifest() if {"kind", "key", "file"} <= set(r)}
        merged = {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "counts": {kind: sum(1 for k, _ in entries if k == kind) for kind in KINDS},
            "entries": [{"kind": k, "key": key, "file": file} for (k, key), file in sorted(entries.items())],
        }
        path = self.root / MERGED_MANIFEST
        write_text_atomic(path, json.dumps(merged, indent=1) + "\n")
        return path


def _metadata_problem(metadata: dict[str, str] | None, kind: str, key: str) -> str | None:
    """What is wrong with an entry's metadata for (kind, key), or None."""
    want = {"format": CACHE_FORMAT, "version": str(CACHE_VERSION), "kind": kind, "key": key}
    got = metadata or {}
    wrong = [f"{name} {got.get(name)!r} (expected {value!r})" for name, value in want.items() if got.get(name) != value]
    return ", ".join(wrong) if wrong else None
