"""Write metadata files (JSON list, JSON Lines, CSV) one entry at a time, atomically: the clean file of
`validate-metadata --write-clean` and the demo's metadata."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from fantasytalk_cli.data.metadata import MetadataEntry
from fantasytalk_cli.data.metadata_file import CSV_PROBE_PREFIX, PROBE_FIELD_TYPES, metadata_format
from fantasytalk_cli.data.probe_facts import PROBE_KEY, ProbeFacts
from fantasytalk_cli.fileio import AtomicFile, atomic_file


def _as_dict(entry: dict[str, Any] | MetadataEntry) -> dict[str, Any]:
    if isinstance(entry, MetadataEntry):
        return entry.to_dict()
    out = dict(entry)
    if isinstance(out.get(PROBE_KEY), ProbeFacts):
        out[PROBE_KEY] = out[PROBE_KEY].to_dict()
    return out


class EntryWriter:
    """Write entries one at a time to a metadata file, atomically (temp file + `os.replace` on `commit`).

    JSON and JSON Lines stream straight to the temp file; CSV (whose columns are known only at the
    end) streams to a JSON Lines spool and is converted on commit. Memory stays flat in both cases.
    As a context manager it commits on success and aborts (target untouched) on an exception.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.format = metadata_format(self.path)
        self.count = 0
        self._out = AtomicFile(self.path, suffix=".spool" if self.format == "csv" else ".tmp")
        self._handle: Any = None

    def open(self) -> EntryWriter:
        self._handle = self._out.open().handle
        if self.format == "json":
            self._handle.write("[")
        return self

    def write(self, entry: dict[str, Any] | MetadataEntry) -> None:
        assert self._handle is not None, "call open() first (or use EntryWriter as a context manager)"
        text = json.dumps(_as_dict(entry), ensure_ascii=False)
        if self.format == "json":
            self._handle.write(("\n  " if self.count == 0 else ",\n  ") + text)
        else:
            self._handle.write(text + "\n")
        self.count += 1

    def commit(self) -> None:
        """Finish the file and move it into place."""
        assert self._handle is not None
        if self.format == "json":
            self._handle.write("\n]\n")
        if self.format != "csv":
            self._out.commit()
            return
        try:
            self._spool_to_csv(self._out.finish_writing())
        finally:
            self._out.abort()  # the spool

    def abort(self) -> None:
        """Drop what was written; the target is left as it was."""
        self._out.abort()

    def __enter__(self) -> EntryWriter:
        return self.open()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _spool_to_csv(self, spool: Path) -> None:
        """Write the target as CSV from the JSON Lines spool (two passes: columns, then rows)."""
        base = ["file_path", "audio_path", "text", "type"]
        extra: dict[str, None] = {}
        with open(spool, encoding="utf-8") as handle:
            for line in handle:
                for key in json.loads(line):
                    if key not in base and key != PROBE_KEY:
                        extra.setdefault(key)
        columns = base + list(extra) + [CSV_PROBE_PREFIX + name for name in PROBE_FIELD_TYPES]
        with atomic_file(self.path) as out, open(spool, encoding="utf-8") as handle:
            writer = csv.writer(out)  # type: ignore[arg-type]
            writer.writerow(columns)
            for line in handle:
                entry = json.loads(line)
                probe = entry.pop(PROBE_KEY, None) or {}
                row = []
                for col in columns:
                    if col.startswith(CSV_PROBE_PREFIX):
                        value = probe.get(col[len(CSV_PROBE_PREFIX) :], "")
                    else:
                        value = entry.get(col, "")
                    row.append(value if isinstance(value, (str, int, float)) else json.dumps(value))
                writer.writerow(row)


def write_entries_atomic(path: Path, entries: Iterable[dict[str, Any] | MetadataEntry]) -> None:
    """Write entries (dicts or `MetadataEntry`) to `path` in the format of its suffix, atomically."""
    with EntryWriter(path) as writer:
        for entry in entries:
            writer.write(entry)
