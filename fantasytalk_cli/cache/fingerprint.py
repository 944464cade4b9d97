"""Content hashes that decide cache keys: of a file (`file_sha256`), of model files cheaply
(`model_fingerprint`), and of media files memoised across runs (`MediaHashes`), so a 100k-clip dataset is
read in full once.

`append_json_line` / `read_json_lines` are the append-only JSON Lines both the media memo and the store's
manifests use: one writer per file, each line fsync'd, a torn last line from a killed writer skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import file_sha256, fsync_dir

MIB = 1 << 20
MEDIA_MEMO_GLOB = "media-hashes*.jsonl"
_FINGERPRINT_TAG = "ftalk-model-fingerprint-v1"
_HEX = frozenset("0123456789abcdef")


def _model_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and every file under the folders named (hidden ones skipped), absolute, deduplicated."""
    found: set[Path] = set()
    for given in paths:
        path = Path(given).absolute()
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            # Hidden entries (huggingface_hub's `.cache/` download bookkeeping) change without the weights changing.
            found.update(
                p
                for p in path.rglob("*")
                if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts)
            )
        else:
            raise FtalkError(f"model path {path} does not exist: fix the model paths in the config (`model.*`)")
    return sorted(found)


def _head_tail_sha256(path: Path, size: int) -> tuple[str, str]:
    """sha256 of a file's first MiB and of its last MiB (the whole file for both when it is smaller)."""
    with open(path, "rb") as handle:
        head = hashlib.sha256(handle.read(MIB)).hexdigest()
        handle.seek(max(0, size - MIB))
        tail = hashlib.sha256(handle.read(MIB)).hexdigest()
    return head, tail


def model_fingerprint(paths: Iterable[Path]) -> str:
    """A cheap content fingerprint (hex sha256) of model files: each file's name relative to the folder that
    holds them all, its size, and the sha256 of its first and last MiB; folders are walked recursively.

    Not a full hash: the frozen encoders and VAE are tens of GB and would be read in full at every run just to
    look the cache up. A changed or retrained checkpoint changes a safetensors header (first MiB: tensor names,
    shapes, offsets), the last tensors or the size; moving or renaming the model folder changes nothing.
    """
    files = _model_files(paths)
    parent = Path(os.path.commonpath([f.parent for f in files])) if files else Path()
    digest = hashlib.sha256(_FINGERPRINT_TAG.encode() + b"\n")
    for path in files:
        size = path.stat().st_size
        head, tail = _head_tail_sha256(path, size)
        digest.update(json.dumps([path.relative_to(parent).as_posix(), size, head, tail]).encode() + b"\n")
    return digest.hexdigest()


def append_json_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append `record` as one JSON line and fsync it. A torn last line (a writer killed mid-line) is closed
    with a newline first, so it stays one bad line instead of swallowing this one."""
    data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with open(path, "a+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        if end:
            handle.seek(end - 1)
            if handle.read(1) != b"\n":
                data = b"\n" + data
        handle.write(data)  # O_APPEND: lands at the end whatever the read position
        handle.flush()
        os.fsync(handle.fileno())
    if created:
        fsync_dir(path.parent)


def read_json_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON object lines of `path` in order, and how many non-blank lines were skipped (not a JSON
    object: torn or damaged). A missing file reads as no lines."""
    records: list[dict[str, Any]] = []
    skipped = 0
    try:
        with open(path, "rb") as handle:
            for raw in handle:
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:  # includes UnicodeDecodeError
                    record = None
                if isinstance(record, dict):
                    records.append(record)
                else:
                    skipped += 1
    except FileNotFoundError:
        pass
    return records, skipped


def _memo_entry(record: dict[str, Any]) -> tuple[tuple[str, int, int], str] | None:
    """`((path, size, mtime_ns), sha256)` of a memo line, or None when a field is missing or of the wrong type."""
    path, size, mtime, sha = (record.get(k) for k in ("path", "size", "mtime_ns", "sha256"))
    typed = isinstance(path, str) and isinstance(size, int) and isinstance(mtime, int) and isinstance(sha, str)
    if not typed or isinstance(size, bool) or isinstance(mtime, bool) or len(sha) != 64 or not set(sha) <= _HEX:
        return None
    return (path, size, mtime), sha


class MediaHashes:
    """A persistent memo of media content hashes, keyed by (absolute path, size, mtime_ns).

    Loads every `media-hashes*.jsonl` in `folder` (each writer — a rank, a process — has its own file, so
    nothing interleaves); a file whose size or mtime changed since it was recorded is hashed again. Safe to call from
    several threads of one process. Counters:
    `hashed` (files read in full by this process), `reused` (memo hits), `skipped_lines` (malformed lines).
    """

    def __init__(self, folder: Path, *, writer_name: str) -> None:
        if not writer_name or "/" in writer_name or writer_name.startswith("."):
            raise ValueError(f"writer_name must be a plain file-name part, got {writer_name!r}")
        self.folder = Path(folder)
        self.memo_path = self.folder / f"media-hashes-{writer_name}.jsonl"
        self.hashed = 0
        self.reused = 0
        self.skipped_lines = 0
        self._memo: dict[tuple[str, int, int], str] = {}
        self._lock = threading.Lock()  # `ftalk cache`'s loader threads hash files at once
        for memo in sorted(self.folder.glob(MEDIA_MEMO_GLOB)) if self.folder.is_dir() else []:
            records, skipped = read_json_lines(memo)
            self.skipped_lines += skipped
            for record in records:
                entry = _memo_entry(record)
                if entry is None:
                    self.skipped_lines += 1
                else:
                    self._memo[entry[0]] = entry[1]  # later lines win

    def sha256(self, path: Path) -> str:
        """The sha256 (hex) of the file's bytes: from the memo when its size and mtime_ns are unchanged, else
        read and recorded. OSError when the file cannot be read (the caller names the metadata entry)."""
        resolved = Path(path).resolve()
        before = os.stat(resolved)
        key = (str(resolved), before.st_size, before.st_mtime_ns)
        with self._lock:
            known = self._memo.get(key)
            if known is not None:
                self.reused += 1
                return known
        digest = file_sha256(resolved)  # outside the lock: threads hash different files at once
        after = os.stat(resolved)
        with self._lock:
            self.hashed += 1
            if (after.st_size, after.st_mtime_ns) == key[1:] and key not in self._memo:  # not while written to
                self._memo[key] = digest
                record = {"path": key[0], "size": key[1], "mtime_ns": key[2], "sha256": digest}
                append_json_line(self.memo_path, record)
        return digest
