"""The training metadata's entries: which clip, which audio, which caption. `MetadataEntry`, the schema checks
shared by `load_entries` (strict: the first problem raises) and `ftalk validate-metadata` (every problem is a
finding), and where an entry's media paths point (joined to the data folder; the outside-the-folder rule).

An entry is `{"file_path": str, "audio_path": str, "text": str, "type": "video", "probe": {...}?}`; other keys are
kept in `MetadataEntry.extra`. The file itself (formats, encodings, streaming) is read by `metadata_file.py`;
`metadata_write.EntryWriter` writes metadata files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fantasytalk_cli.data.findings import Finding, finding
from fantasytalk_cli.data.metadata_file import (
    KNOWN_FIELDS,
    PROBE_FIELD_TYPES,
    REQUIRED_FIELDS,
    MetadataError,
    iter_raw_entries,
)
from fantasytalk_cli.data.probe_facts import PROBE_KEY, ProbeFacts
from fantasytalk_cli.fileio import file_sha256

ALLOWED_TYPES = ("video",)
KEPT_FIELDS = ("track",)
"""Fields ftalk knows and keeps with an entry (in `extra`) without a warning: `track`, the face/mouth track file
`ftalk prepare` writes (`docs/prepare.md`)."""
_LENIENT_CODES = {"W206", "I208"}  # problems load_entries tolerates: extra fields, missing type


@dataclass(frozen=True)
class MetadataEntry:
    """One checked metadata entry. Paths are as written in the file (see `resolve_media_path`)."""

    index: int
    file_path: str
    audio_path: str
    text: str
    type: str = "video"
    extra: dict[str, Any] = field(default_factory=dict)
    probe: ProbeFacts | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry as written to a metadata file (extra fields kept, probe facts under `probe`)."""
        out: dict[str, Any] = {
            "file_path": self.file_path,
            "audio_path": self.audio_path,
            "text": self.text,
            "type": self.type,
            **self.extra,
        }
        if self.probe is not None:
            out[PROBE_KEY] = self.probe.to_dict()
        return out


def _probe_problem(raw: Any) -> str | None:
    """Why stored probe facts are unusable, or None when they are fine."""
    if not isinstance(raw, dict):
        return f"`{PROBE_KEY}` must be an object, not {type(raw).__name__}"
    try:
        facts = ProbeFacts.from_dict(raw)
    except (KeyError, TypeError) as exc:
        return str(exc.args[0] if exc.args else exc)
    for name, kind in PROBE_FIELD_TYPES.items():
        value = getattr(facts, name)
        want_int = kind in ("int", int)
        ok = isinstance(value, int) if want_int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool) or value < 0:
            return f"probe fact {name}={value!r} is not a non-negative {'integer' if want_int else 'number'}"
    return None


def parse_entry(index: int, raw: Any) -> tuple[MetadataEntry | None, list[Finding]]:
    """Check one raw entry against the schema: the entry (None when unusable) and every problem found.

    Extra fields (W206), a missing type (I208) and malformed probe facts (W207, dropped) leave a usable
    entry; every E2xx problem makes it unusable.
    """
    problems: list[Finding] = []
    if not isinstance(raw, dict):
        shown = json.dumps(raw)[:60] if not isinstance(raw, (bytes, bytearray)) else repr(raw)[:60]
        return None, [finding("E201", f"entry is a {type(raw).__name__} ({shown}), not an object", index=index)]
    values: dict[str, str] = {}
    for name in REQUIRED_FIELDS:
        if name not in raw:
            problems.append(finding("E202", f"missing field `{name}`", index=index, fix=f"add `{name}` to the entry"))
            continue
        value = raw[name]
        if not isinstance(value, str):
            problems.append(
                finding("E203", f"`{name}` must be a string, not {type(value).__name__} ({value!r:.40})", index=index)
            )
        elif name != "text" and not value.strip():
            problems.append(finding("E203", f"`{name}` is empty", index=index, fix=f"give the {name} of the clip"))
        else:
            values[name] = value
    kind = raw.get("type")
    path_hint = raw.get("file_path") if isinstance(raw.get("file_path"), str) else None
    if "type" not in raw:
        problems.append(finding("I208", 'no `type`: taken as "video"', index=index, path=path_hint))
        kind = "video"
    elif not isinstance(kind, str):
        problems.append(finding("E203", f"`type` must be a string, not {type(kind).__name__}", index=index))
    elif kind == "image":
        problems.append(finding("E205", '`type` is "image"', index=index, path=path_hint))
    elif kind not in ALLOWED_TYPES:
        problems.append(finding("E204", f'`type` is {kind!r}; allowed: "video"', index=index, path=path_hint))
    extra = {k: v for k, v in raw.items() if k not in KNOWN_FIELDS}
    for name in extra:
        if name not in KEPT_FIELDS:
            problems.append(finding("W206", f"unknown field `{name}` (kept, not read)", index=index, path=path_hint))
    probe: ProbeFacts | None = None
    if PROBE_KEY in raw:
        why = _probe_problem(raw[PROBE_KEY])
        if why is None:
            facts = dict(raw[PROBE_KEY])
            facts["fps"] = float(facts["fps"])
            facts["audio_duration"] = float(facts["audio_duration"])
            probe = ProbeFacts.from_dict(facts)
        else:
            problems.append(finding("W207", f"ignored probe facts: {why}", index=index, path=path_hint))
    if any(p.severity == "error" for p in problems):
        return None, problems
    entry = MetadataEntry(
        index=index,
        file_path=values["file_path"],
        audio_path=values["audio_path"],
        text=values["text"],
        type=str(kind),
        extra=extra,
        probe=probe,
    )
    return entry, problems


def load_entries(path: Path) -> list[MetadataEntry]:
    """Read and check the whole file; the first problem raises `MetadataError` naming entry, field, fix.

    Strict: only unknown extra fields (kept in `extra`) and a missing `type` (taken as video) pass.
    Entries written by `validate-metadata --write-clean` carry their `ProbeFacts` in `probe`.
    """
    path = Path(path)
    entries: list[MetadataEntry] = []
    for index, raw in iter_raw_entries(path):
        entry, problems = parse_entry(index, raw)
        for problem in problems:
            if problem.code not in _LENIENT_CODES:
                raise MetadataError(path, problem.message, code=problem.code, index=index, fix=problem.fix)
        assert entry is not None  # no blocking problem
        entries.append(entry)
    return entries


def resolve_media_path(data_dir: Path | None, relative: str) -> Path:
    """Where a `file_path` / `audio_path` points: joined to `train_data_dir` unless absolute (not resolved)."""
    candidate = Path(os.path.expanduser(relative))
    if candidate.is_absolute() or data_dir is None:
        return candidate
    return Path(data_dir) / candidate


def may_leave(written: str) -> bool:
    """Whether a media path can point outside its root by how it is written (absolute, or with a `..`
    component): the cheap test that spares the exact one (`outside_root`) for almost every entry."""
    return written[:1] in ("/", "~") or ".." in written  # may over-select ("a..b.mp4"): `outside_root` decides


def outside_root(root: Path, written: str, *, follow_links: bool = True) -> str | None:
    """Why media path `written` lies outside `root` (the data folder relative paths are joined to), or None:
    an absolute path elsewhere, a `..` that climbs out, or (with `follow_links`) a symlink that resolves out."""
    path = resolve_media_path(root, written)
    base = os.path.abspath(root)
    if os.path.commonpath([os.path.abspath(path), base]) != base:
        kind = "an absolute path" if os.path.isabs(os.path.expanduser(written)) else "a `..` path"
        return f"{written!r} is {kind} outside {root}"
    if follow_links and os.path.lexists(path):
        real, real_base = os.path.realpath(path), os.path.realpath(base)
        if os.path.commonpath([real, real_base]) != real_base:
            return f"{written!r} links to {real}, outside {root}"
    return None


OUTSIDE_FIX = (
    "move the media inside the data folder (or point --train_data_dir at the folder that holds them), or pass "
    "--allow_outside_data_dir if you keep media elsewhere on purpose"
)


def outside_report(root: Path, paths: Iterable[tuple[int, str]], *, follow_links: bool = True) -> str | None:
    """The message naming the `(entry index, media path)` pairs that lie outside `root` (the first few, the
    count and the fix), or None when all are inside: what plan-buckets and train refuse with."""
    outside = [(i, why) for i, w in paths if (why := outside_root(root, w, follow_links=follow_links))]
    if not outside:
        return None
    shown = "; ".join(f"entry {i}: {why}" for i, why in outside[:3])
    return f"{len(outside)} media paths lie outside the data folder ({shown}): {OUTSIDE_FIX}"


def metadata_hash(path: Path) -> str:
    """sha256 (hex) of the metadata file's bytes: plan files record it to notice a changed metadata file."""
    return file_sha256(path)
