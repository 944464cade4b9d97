"""A checkpoint's manifest: every file's size and sha256, written after the files and before the folder's
atomic rename, so that resume can tell a complete checkpoint from a damaged one (a truncated or missing
file, bytes changed on disk) before loading anything, and name the file."""

from __future__ import annotations

import json
from pathlib import Path

from fantasytalk_cli.fileio import file_sha256, write_text_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "ftalk-checkpoint-manifest"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(folder: Path) -> int:
    """Record every file under `folder` (fsync'd); returns the checkpoint's size in bytes."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(folder)}
    write_text_atomic(
        folder / MANIFEST_NAME,
        json.dumps({"format": MANIFEST_FORMAT, "version": 1, "files": files}, indent=1, sort_keys=True),
    )
    return sum(entry["size"] for entry in files.values())


def checkpoint_size(folder: Path) -> int:
    """Bytes of a checkpoint's files (from its manifest, else from the files)."""
    try:
        files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
        return sum(int(entry["size"]) for entry in files.values())
    except (OSError, ValueError, KeyError, TypeError):
        return sum(p.stat().st_size for p in _files(folder)) if folder.is_dir() else 0


def verify_manifest(folder: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256; else what is wrong,
    naming the file. A checkpoint without a manifest is reported as such (written by an older ftalk)."""
    path = folder / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
        files = data["files"]
        if data.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not an ftalk checkpoint manifest")
    except FileNotFoundError:
        return f"{folder} has no {MANIFEST_NAME}, so it cannot be verified (written by an older ftalk, or damaged)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{path} is damaged ({exc})"
    for name, entry in sorted(files.items()):
        target = folder / name
        if not target.is_file():
            return f"{target} is missing"
        size = target.stat().st_size
        if size != int(entry["size"]):
            return f"{target} has {size} bytes, the checkpoint wrote {entry['size']} (truncated or replaced)"
        if file_sha256(target) != entry["sha256"]:
            return f"{target} does not hold the bytes the checkpoint wrote (sha256 differs)"
    return None
