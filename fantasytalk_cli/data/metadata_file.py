"""The metadata file as raw entries: its format (from the suffix), its bytes (UTF-8, a byte-order mark allowed), and
streaming reads of the three formats, with errors that name the file, the line and column, and the fix.

- `.jsonl` / `.ndjson`: JSON Lines, one entry object per line (blank lines skipped); streamed in chunks.
- `.csv`: a header row with `file_path,audio_path,text,type` and any extra columns; streamed. Probe facts are flat
  columns `probe.width`, `probe.height`, ... (`probe.` + each `ProbeFacts` field); a row whose probe columns are all
  empty has no probe facts. Every other CSV value is a string.
- anything else (the seed's `metadata_control.json`): one JSON list of entry objects, parsed once.

`metadata.py` checks the raw entries against the schema; `metadata_facts.py` reads only the facts planning needs
through the same public readers (`jsonl_chunks`, `jsonl_entries`, `read_without_bom`, ...).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import msgspec

from fantasytalk_cli.data.findings import CODES, Finding, finding
from fantasytalk_cli.data.probe_facts import PROBE_KEY, ProbeFacts
from fantasytalk_cli.errors import FtalkError

Format = Literal["json", "jsonl", "csv"]

REQUIRED_FIELDS = ("file_path", "audio_path", "text")
KNOWN_FIELDS = (*REQUIRED_FIELDS, "type", PROBE_KEY)
CSV_PROBE_PREFIX = f"{PROBE_KEY}."
PROBE_FIELD_TYPES = {f.name: f.type for f in fields(ProbeFacts)}
"""Each `ProbeFacts` field's declared type (CSV cells are parsed to it; the schema checks stored facts by it)."""


class MetadataError(FtalkError, ValueError):
    """A metadata file problem: names the file, the position (line/column or entry) and the fix."""

    def __init__(
        self,
        path: Path,
        message: str,
        *,
        code: str,
        line: int | None = None,
        column: int | None = None,
        index: int | None = None,
        fix: str = "",
    ) -> None:
        self.path = Path(path)
        self.message = message
        self.code = code
        self.line = line
        self.column = column
        self.index = index
        self.fix = fix or CODES[code][1]
        super().__init__(str(self))

    def __str__(self) -> str:
        where = str(self.path)
        if self.line is not None:
            where += f", line {self.line}"
            if self.column is not None:
                where += f", column {self.column}"
        if self.index is not None:
            where += f", entry {self.index}"
        return f"{where}: {self.message} [{self.code} {CODES[self.code][0]}]; fix: {self.fix}"

    def to_finding(self) -> Finding:
        """The same problem as a validation finding (file-level unless it names an entry)."""
        pos = ""
        if self.line is not None:
            pos = f"line {self.line}" + (f", column {self.column}" if self.column is not None else "") + ": "
        return finding(self.code, pos + self.message, index=self.index, path=str(self.path), fix=self.fix)


def metadata_format(path: Path) -> Format:
    """The format a metadata path is read and written in, from its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "json"


def unreadable_error(path: Path, exc: BaseException) -> MetadataError:
    if isinstance(exc, UnicodeDecodeError):
        return MetadataError(
            path,
            f"not UTF-8 text (byte {exc.start} cannot be decoded)",
            code="E101",
            fix="save the file as UTF-8 (most editors: 'Save with encoding')",
        )
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    fix = "check the --train_data_meta path" if isinstance(exc, FileNotFoundError) else ""
    return MetadataError(path, f"cannot read the metadata file ({reason})", code="E101", fix=fix)


def empty_file_error(path: Path, what: str) -> MetadataError:
    return MetadataError(path, f"no entries: {what}", code="E104")


def is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_without_bom(path: Path) -> bytes:
    """The file's bytes, a UTF-8 byte-order mark dropped (OSError is the caller's to report)."""
    return path.read_bytes().removeprefix(codecs.BOM_UTF8)


_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])
"""A JSON list as undecoded slices of its elements: the syntax checked, no Python objects built."""


def json_list_slices(data: bytes) -> list[msgspec.Raw] | None:
    """The elements of a well-formed, UTF-8, non-empty top-level JSON list, undecoded; None otherwise (the
    standard reader then names the problem with its line and column)."""
    if not is_utf8(data):
        return None
    try:
        slices = _RAW_LIST.decode(data)
    except Exception:  # msgspec's DecodeError / ValidationError (not a list, NaN literals, ...), deep nesting
        return None
    return slices or None


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = read_without_bom(path)
    except OSError as exc:
        raise unreadable_error(path, exc) from exc
    # Memory stays near the file's size: each element is decoded when it is reached, not all up front.
    slices = json_list_slices(data)
    if slices is not None:
        del data
        for index, raw in enumerate(slices):
            yield index, json.loads(bytes(raw))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise unreadable_error(path, exc) from exc
    if not text.strip():
        raise empty_file_error(path, "the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(path, f"not valid JSON: {exc.msg}", code="E102", line=exc.lineno, column=exc.colno) from exc
    if not isinstance(data, list):
        hint = ""
        if isinstance(data, dict):
            lists = [k for k, v in data.items() if isinstance(v, list)]
            hint = f" (the list under {lists[0]!r} may be what you meant)" if lists else ""
        raise MetadataError(
            path,
            f"the top level is a {type(data).__name__}, not a list of entries{hint}",
            code="E103",
            line=1,
            column=1,
        )
    if not data:
        raise empty_file_error(path, "the list is empty")
    yield from enumerate(data)


def _open_text(path: Path) -> io.TextIOWrapper:
    try:
        return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 (closed by the caller)
    except OSError as exc:
        raise unreadable_error(path, exc) from exc


_CHUNK_BYTES = 1 << 22
"""JSON Lines are read in chunks of about this many bytes, each ending at a line end."""


def jsonl_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks that end at a line end (LF), the UTF-8 byte-order mark dropped."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise unreadable_error(path, exc) from exc
    with handle:
        first = True
        while chunk := handle.read(_CHUNK_BYTES):
            chunk += handle.readline()
            if first:
                chunk, first = chunk.removeprefix(codecs.BOM_UTF8), False
            yield chunk


def line_count(chunk: bytes) -> int:
    """Lines in a chunk as a text file opened with `newline=""` splits them (at LF, CRLF or a lone CR)."""
    ends = chunk.count(b"\n")
    if b"\r" in chunk:
        ends += chunk.count(b"\r") - chunk.count(b"\r\n")
    return ends + (bool(chunk) and not chunk.endswith((b"\n", b"\r")))


def jsonl_entries(path: Path, chunk: bytes, lineno: int, index: int) -> Iterator[tuple[int, Any]]:
    """`(index, JSON value)` of each non-blank line of a chunk that starts after line `lineno`, the first one
    numbered `index`; a syntax error or non-UTF-8 text is raised (naming its line) after the lines before it."""
    try:
        text, bad = chunk.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        start = max(chunk.rfind(b"\n", 0, exc.start), chunk.rfind(b"\r", 0, exc.start)) + 1
        text, bad = chunk[:start].decode("utf-8"), lineno + line_count(chunk[:start]) + 1
    for offset, line in enumerate(io.StringIO(text, newline=""), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetadataError(
                path, f"not valid JSON: {exc.msg}", code="E102", line=lineno + offset, column=exc.colno
            ) from exc
        yield index, value
        index += 1
    if bad is not None:
        raise MetadataError(path, "not UTF-8 text", code="E101", line=bad, fix="save the file as UTF-8")


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    count = lineno = 0
    for chunk in jsonl_chunks(path):
        for entry in jsonl_entries(path, chunk, lineno, count):
            yield entry
            count += 1
        lineno += line_count(chunk)
    if count == 0:
        raise empty_file_error(path, "the file holds no JSON lines")


def _csv_value(name: str, value: str) -> Any:
    """A probe column's value as its `ProbeFacts` type (left as text when it does not parse)."""
    kind = PROBE_FIELD_TYPES.get(name)
    try:
        if kind in ("int", int):
            return int(value)
        if kind in ("float", float):
            return float(value)
    except ValueError:
        pass
    return value


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    index = 0
    start = 1
    with _open_text(path) as handle:
        reader = csv.reader(handle, strict=True)
        header: list[str] | None = None
        try:
            header = next(reader, None)
            if header is None:
                raise empty_file_error(path, "the file is empty")
            header = [h.strip() for h in header]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise MetadataError(path, f"the header repeats column(s) {dupes}", code="E102", line=1)
            while True:
                start = reader.line_num + 1  # the line this record starts on
                row = next(reader, None)
                if row is None:
                    break
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                if len(row) != len(header):
                    raise MetadataError(
                        path,
                        f"row has {len(row)} fields but the header has {len(header)}",
                        code="E102",
                        line=start,
                        fix="quote fields that contain commas or newlines with double quotes",
                    )
                raw: dict[str, Any] = {}
                probe: dict[str, Any] = {}
                for name, value in zip(header, row, strict=True):
                    if name.startswith(CSV_PROBE_PREFIX):
                        if value.strip():
                            sub = name[len(CSV_PROBE_PREFIX) :]
                            probe[sub] = _csv_value(sub, value.strip())
                    elif value or name in KNOWN_FIELDS:  # an empty extra cell is an absent field
                        raw[name] = value
                if probe:
                    raw[PROBE_KEY] = probe
                yield index, raw
                index += 1
        except csv.Error as exc:
            where = f" in the record starting on line {start}" if header is not None else ""
            raise MetadataError(path, f"not valid CSV{where}: {exc}", code="E102", line=reader.line_num) from exc
        except UnicodeDecodeError as exc:
            raise MetadataError(
                path, "not UTF-8 text", code="E101", line=reader.line_num + 1, fix="save the file as UTF-8"
            ) from exc
    if index == 0:
        raise empty_file_error(path, "the CSV has a header but no rows")


def iter_raw_entries(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield `(index, raw entry)` in file order; JSON Lines and CSV are streamed.

    Raises `MetadataError` (E101-E104) for an unreadable file, a syntax error (with line and column),
    a top level that is not a list, or no entries. In streamed formats a syntax error is raised when
    its line is reached, after the entries before it were yielded.
    """
    path = Path(path)
    fmt = metadata_format(path)
    if fmt == "jsonl":
        return _iter_jsonl(path)
    if fmt == "csv":
        return _iter_csv(path)
    return _iter_json(path)


def count_entries(path: Path) -> int | None:
    """Number of entries (for progress bars), or None when the file cannot be read; JSON is parsed for it,
    JSON Lines and CSV are only scanned. Problems are left to `iter_raw_entries` to report."""
    try:
        fmt = metadata_format(path)
        if fmt == "json":
            data = read_without_bom(Path(path))
            slices = json_list_slices(data)
            if slices is not None:
                return len(slices)
            parsed = json.loads(data.decode("utf-8"))  # what only Python's reader accepts (NaN), or a problem
            return len(parsed) if isinstance(parsed, list) else None
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if fmt == "jsonl":
                return sum(1 for line in handle if line.strip())
            return max(0, sum(1 for row in csv.reader(handle) if row and any(c.strip() for c in row)) - 1)
    except (OSError, ValueError, csv.Error):
        return None
