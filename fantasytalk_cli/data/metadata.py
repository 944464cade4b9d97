"""Read the training metadata: which clip, which audio, which caption.

Three formats, chosen by the file suffix:

- `.jsonl` / `.ndjson`: JSON Lines, one entry object per line (blank lines skipped); streamed.
- `.csv`: a header row with `file_path,audio_path,text,type` and any extra columns; streamed. Probe
  facts are flat columns `probe.width`, `probe.height`, ... (`probe.` + each `ProbeFacts` field); a row
  whose probe columns are all empty has no probe facts. Every other CSV value is a string.
- anything else (the seed's `metadata_control.json`): one JSON list of entry objects, parsed once.

A UTF-8 byte-order mark is accepted in every format. An entry is
`{"file_path": str, "audio_path": str, "text": str, "type": "video", "probe": {...}?}`; other keys are
kept in `MetadataEntry.extra`. The schema checks (`entry_problems`) are shared by `load_entries`
(strict: the first problem raises) and `ftalk validate-metadata` (every problem is a finding).
`metadata_facts.read_plan_facts` reads only the probe facts planning needs (with a typed decoder where the answer
is the same), `metadata_write.EntryWriter` writes metadata files.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import msgspec

from fantasytalk_cli.data.findings import CODES, Finding, finding
from fantasytalk_cli.data.probe_facts import PROBE_KEY, ProbeFacts
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import file_sha256

Format = Literal["json", "jsonl", "csv"]

REQUIRED_FIELDS = ("file_path", "audio_path", "text")
KNOWN_FIELDS = (*REQUIRED_FIELDS, "type", PROBE_KEY)
ALLOWED_TYPES = ("video",)
CSV_PROBE_PREFIX = f"{PROBE_KEY}."
_PROBE_FIELDS = {f.name: f.type for f in fields(ProbeFacts)}
_LENIENT_CODES = {"W206", "I208"}  # problems load_entries tolerates: extra fields, missing type


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


def metadata_format(path: Path) -> Format:
    """The format a metadata path is read and written in, from its suffix."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    return "json"


# ---------------------------------------------------------------------------------------------- reading


def _unreadable(path: Path, exc: BaseException) -> MetadataError:
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


def _empty(path: Path, what: str) -> MetadataError:
    return MetadataError(path, f"no entries: {what}", code="E104")


def _is_utf8(data: bytes) -> bool:
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_without_bom(path: Path) -> bytes:
    """The file's bytes, a UTF-8 byte-order mark dropped (OSError is the caller's to report)."""
    return path.read_bytes().removeprefix(codecs.BOM_UTF8)


_RAW_LIST = msgspec.json.Decoder(list[msgspec.Raw])
"""A JSON list as undecoded slices of its elements: the syntax checked, no Python objects built."""


def _json_list_slices(data: bytes) -> list[msgspec.Raw] | None:
    """The elements of a well-formed, UTF-8, non-empty top-level JSON list, undecoded; None otherwise (the
    standard reader then names the problem with its line and column)."""
    if not _is_utf8(data):
        return None
    try:
        slices = _RAW_LIST.decode(data)
    except Exception:  # msgspec's DecodeError / ValidationError (not a list, NaN literals, ...), deep nesting
        return None
    return slices or None


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        data = _read_without_bom(path)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    # Memory stays near the file's size: each element is decoded when it is reached, not all up front.
    slices = _json_list_slices(data)
    if slices is not None:
        del data
        for index, raw in enumerate(slices):
            yield index, json.loads(bytes(raw))
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _unreadable(path, exc) from exc
    if not text.strip():
        raise _empty(path, "the file is empty")
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
        raise _empty(path, "the list is empty")
    yield from enumerate(data)


def _open_text(path: Path) -> io.TextIOWrapper:
    try:
        return open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 (closed by the caller)
    except OSError as exc:
        raise _unreadable(path, exc) from exc


_CHUNK_BYTES = 1 << 22
"""JSON Lines are read in chunks of about this many bytes, each ending at a line end."""


def _jsonl_chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks that end at a line end (LF), the UTF-8 byte-order mark dropped."""
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    with handle:
        first = True
        while chunk := handle.read(_CHUNK_BYTES):
            chunk += handle.readline()
            if first:
                chunk, first = chunk.removeprefix(codecs.BOM_UTF8), False
            yield chunk


def _line_count(chunk: bytes) -> int:
    """Lines in a chunk as a text file opened with `newline=""` splits them (at LF, CRLF or a lone CR)."""
    ends = chunk.count(b"\n")
    if b"\r" in chunk:
        ends += chunk.count(b"\r") - chunk.count(b"\r\n")
    return ends + (bool(chunk) and not chunk.endswith((b"\n", b"\r")))


def _jsonl_entries(path: Path, chunk: bytes, lineno: int, index: int) -> Iterator[tuple[int, Any]]:
    """`(index, JSON value)` of each non-blank line of a chunk that starts after line `lineno`, the first one
    numbered `index`; a syntax error or non-UTF-8 text is raised (naming its line) after the lines before it."""
    try:
        text, bad = chunk.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        start = max(chunk.rfind(b"\n", 0, exc.start), chunk.rfind(b"\r", 0, exc.start)) + 1
        text, bad = chunk[:start].decode("utf-8"), lineno + _line_count(chunk[:start]) + 1
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
    for chunk in _jsonl_chunks(path):
        for entry in _jsonl_entries(path, chunk, lineno, count):
            yield entry
            count += 1
        lineno += _line_count(chunk)
    if count == 0:
        raise _empty(path, "the file holds no JSON lines")


def _csv_value(name: str, value: str) -> Any:
    """A probe column's value as its `ProbeFacts` type (left as text when it does not parse)."""
    kind = _PROBE_FIELDS.get(name)
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
                raise _empty(path, "the file is empty")
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
        raise _empty(path, "the CSV has a header but no rows")


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


# ---------------------------------------------------------------------------------------------- schema


def _probe_problem(raw: Any) -> str | None:
    """Why stored probe facts are unusable, or None when they are fine."""
    if not isinstance(raw, dict):
        return f"`{PROBE_KEY}` must be an object, not {type(raw).__name__}"
    try:
        facts = ProbeFacts.from_dict(raw)
    except (KeyError, TypeError) as exc:
        return str(exc.args[0] if exc.args else exc)
    for name, kind in _PROBE_FIELDS.items():
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


def count_entries(path: Path) -> int | None:
    """Number of entries (for progress bars), or None when the file cannot be read; JSON is parsed for it,
    JSON Lines and CSV are only scanned. Problems are left to `iter_raw_entries` to report."""
    try:
        fmt = metadata_format(path)
        if fmt == "json":
            data = _read_without_bom(Path(path))
            slices = _json_list_slices(data)
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
