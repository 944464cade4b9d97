"""The planning reader of `plan-buckets`: every entry's probe facts as columns, without `MetadataEntry` objects.

JSON Lines and JSON go through a typed msgspec decoder that builds only the four numbers planning reads (and the
two paths, for the data-folder rule); what it does not take is read by `metadata.iter_raw_entries`' own code, so
the facts and the errors are the same as theirs.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from fantasytalk_cli.data.metadata import may_leave
from fantasytalk_cli.data.metadata_file import (
    empty_file_error,
    is_utf8,
    iter_raw_entries,
    jsonl_chunks,
    jsonl_entries,
    line_count,
    metadata_format,
    read_without_bom,
)
from fantasytalk_cli.data.probe_facts import PROBE_KEY


def stored_plan_facts(raw: Any) -> tuple[int, int, int, float] | None:
    """The probe facts planning reads (width, height, num_frames, fps) stored in a raw entry, or None."""
    facts: Any = raw.get(PROBE_KEY) if isinstance(raw, dict) else None
    try:
        return int(facts["width"]), int(facts["height"]), int(facts["num_frames"]), float(facts["fps"])
    except (KeyError, TypeError, ValueError):
        return None


PLAN_FACT_FIELDS = ("width", "height", "num_frames", "fps")
"""The probe facts planning reads, in the order `stored_plan_facts` gives them."""
_PLAN_FACT_DTYPES = (np.int32, np.int32, np.int32, np.float64)


class PlanFacts:
    """Every entry's planning facts as columns (entry i = position i; 0 where an entry has none), built chunk by
    chunk, and the raw entries without usable facts."""

    def __init__(self) -> None:
        self.count = 0
        self.missing: list[tuple[int, Any]] = []
        """`(index, raw entry)` of the entries without usable probe facts."""
        self.may_leave: list[tuple[int, str]] = []
        """`(index, media path)` written absolute or with `..` (checked against the data folder by the caller)."""
        self._parts: list[list[np.ndarray]] = []
        self._rows: list[tuple[int, int, int, float]] = []

    def _paths(self, index: int, paths: Iterable[Any]) -> None:
        for written in paths:
            if isinstance(written, str) and may_leave(written):
                self.may_leave.append((index, written))

    def add(self, raw: Any) -> None:
        """Append one raw entry."""
        if isinstance(raw, dict):
            self._paths(self.count, (raw.get("file_path"), raw.get("audio_path")))
        facts = stored_plan_facts(raw)
        if facts is None:
            self.missing.append((self.count, raw))
            facts = (0, 0, 0, 0.0)
        self._rows.append(facts)
        self.count += 1

    def add_typed(self, entries: list[_TypedEntry]) -> None:
        """Append entries decoded by the typed fast path (all with facts), straight into arrays."""
        self._flush()
        for offset, entry in enumerate(entries):
            if may_leave(entry.file_path) or may_leave(entry.audio_path):  # rare: the loop stays cheap
                self._paths(self.count + offset, (entry.file_path, entry.audio_path))
        probes = [entry.probe for entry in entries]
        self._parts.append(
            [
                np.fromiter(map(attrgetter(name), probes), dtype=dtype, count=len(probes))
                for name, dtype in zip(PLAN_FACT_FIELDS, _PLAN_FACT_DTYPES, strict=True)
            ]
        )
        self.count += len(probes)

    def _flush(self) -> None:
        if self._rows:
            columns = zip(*self._rows, strict=True)
            self._parts.append([np.asarray(c, dtype=t) for c, t in zip(columns, _PLAN_FACT_DTYPES, strict=True)])
            self._rows = []

    def arrays(self) -> dict[str, np.ndarray]:
        """The columns (`PLAN_FACT_FIELDS` -> array of one value per entry)."""
        self._flush()
        return {
            name: np.concatenate([part[i] for part in self._parts]) if self._parts else np.zeros(0, dtype=dtype)
            for i, (name, dtype) in enumerate(zip(PLAN_FACT_FIELDS, _PLAN_FACT_DTYPES, strict=True))
        }


class _TypedProbe(msgspec.Struct, gc=False):
    width: int
    height: int
    num_frames: int
    fps: float


class _TypedEntry(msgspec.Struct, gc=False):
    """The fields of an entry planning reads (its facts, and its paths for the data-folder rule); the decoder
    checks the rest of the line but builds nothing."""

    probe: _TypedProbe | None = msgspec.field(default=None, name=PROBE_KEY)
    file_path: str = ""
    audio_path: str = ""


_ENTRY_DECODER = msgspec.json.Decoder(_TypedEntry)
_LIST_DECODER = msgspec.json.Decoder(list[_TypedEntry])


def _typed_entries(data: bytes, *, lines: bool) -> list[_TypedEntry] | None:
    """The facts of every entry of `data` (a chunk of JSON Lines, or a whole JSON file) by the typed decoder, or
    None where its answer could differ from `json.loads` + `stored_plan_facts`, for the caller to read the
    ordinary way: an entry without facts or with other types (a float width), anything the decoder rejects (NaN,
    a syntax error; in JSON Lines also a blank line), non-UTF-8 bytes (it does not check the strings it skips), a
    lone CR (a line end in a text file)."""
    if not is_utf8(data) or (lines and b"\r" in data and data.count(b"\r") != data.count(b"\r\n")):
        return None
    try:
        if lines:
            rows = data.split(b"\n")
            if not rows[-1]:  # the chunk ends with its last line's LF
                rows.pop()
            entries = [_ENTRY_DECODER.decode(row) for row in rows]
        else:
            entries = _LIST_DECODER.decode(data)
    except Exception:  # msgspec's DecodeError / ValidationError, or deep nesting
        return None
    return entries if entries and all(entry.probe for entry in entries) else None  # no entry without facts


def read_plan_facts(path: Path) -> PlanFacts:
    """The planning facts of every entry, without `MetadataEntry` objects. JSON Lines and JSON go through a typed
    msgspec decoder that builds only the four numbers (several times faster than `json.loads`, and no dicts);
    what it does not take (entries without facts, other types, errors) is read by `iter_raw_entries`' own code, so
    the facts and the errors are the same as theirs."""
    path = Path(path)
    facts = PlanFacts()
    fmt = metadata_format(path)
    if fmt == "jsonl":
        lineno = 0
        for chunk in jsonl_chunks(path):
            typed = _typed_entries(chunk, lines=True)
            if typed is not None:  # one entry per line, no blank line
                facts.add_typed(typed)
                lineno += len(typed)
                continue
            for _, raw in jsonl_entries(path, chunk, lineno, facts.count):
                facts.add(raw)
            lineno += line_count(chunk)
        if facts.count == 0:
            raise empty_file_error(path, "the file holds no JSON lines")
        return facts
    if fmt == "json":
        try:
            typed = _typed_entries(read_without_bom(path), lines=False)
        except OSError:
            typed = None  # `iter_raw_entries` says why
        if typed is not None:
            facts.add_typed(typed)
            return facts
    for _, raw in iter_raw_entries(path):
        facts.add(raw)
    return facts
