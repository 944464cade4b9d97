"""Reading `ftalk sample --batch` files: the requests of a JSON Lines or CSV file, one per line or row.

Every problem of the file (its suffix, encoding, malformed lines, missing, empty or unknown keys, two requests
writing the same `out`) is collected and raised as one `SampleInputError` naming the file, the line and the fix. The
files a request names are not opened here: `inputs.check_requests` checks them.

Public API:
- `read_batch_file(path, *, default_prompt)` -> `SampleRequest`s; `batch_format(path)`: the format from the suffix.
- `BATCH_KEYS`: the keys (JSON Lines) or columns (CSV) a batch file may have.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fantasytalk_cli.sample.inputs import InputProblem, SampleInputError, SampleRequest

__all__ = ["BATCH_KEYS", "batch_format", "read_batch_file"]

BATCH_KEYS = ("image", "audio", "prompt", "out")
"""The keys (JSON Lines) or columns (CSV) of a batch file, in the order the messages list them."""

REQUIRED_KEYS = ("image", "audio", "out")
"""What every request must name; `prompt` falls back to the default prompt."""

BATCH_FORMATS = {".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
"""Batch file suffixes (case-insensitive) and the format each is read as."""

_BATCH_EXAMPLE = '{"image": "face.png", "audio": "speech.wav", "prompt": "A woman is talking.", "out": "face.mp4"}'


def batch_format(path: Path) -> str:
    """The batch file's format from its suffix (`BATCH_FORMATS`); `SampleInputError` for any other suffix."""
    fmt = BATCH_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        suffixes = ", ".join(BATCH_FORMATS)
        raise SampleInputError(
            [
                InputProblem(
                    path,
                    "batch file",
                    f"unknown batch file format (suffix {Path(path).suffix or '(none)'!r})",
                    f"name it with one of the suffixes {suffixes} (JSON Lines: one object per line; CSV: a header "
                    f"row {','.join(BATCH_KEYS)})",
                )
            ]
        )
    return fmt


def read_batch_file(path: Path, *, default_prompt: str) -> list[SampleRequest]:
    """The requests of a JSON Lines (.jsonl, .json-lines, .ndjson) or CSV (.csv, header row) batch file.

    Keys/columns: `image`, `audio`, `out` (required) and `prompt` (optional: missing, null or empty means
    `default_prompt`). Relative paths (and `~`) are resolved against the batch file's folder; blank lines are
    skipped. Raises `SampleInputError` listing every problem (the file, the line, the key, the fix): unknown
    suffix, unreadable or non-UTF-8 file, malformed JSON line or CSV row, missing or empty required key, unknown
    key, two requests writing the same `out`, no requests at all. The files themselves are checked later, by
    `check_requests`."""
    path = Path(path)
    fmt = batch_format(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _batch_error(path, None, f"not UTF-8 text (byte {exc.start})", "save the file as UTF-8") from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        fix = "check the batch file path" if isinstance(exc, FileNotFoundError) else "give a readable file"
        raise _batch_error(path, None, f"cannot read the batch file ({reason})", fix) from exc

    rows, problems = _jsonl_rows(path, text) if fmt == "jsonl" else _csv_rows(path, text)
    requests: list[SampleRequest] = []
    first_line_of_out: dict[str, int] = {}
    for line, row in rows:
        request, row_problems = _row_request(path, line, row, default_prompt)
        problems.extend(row_problems)
        if request is None:
            continue
        key = os.path.realpath(request.out)
        if key in first_line_of_out:
            problems.append(
                InputProblem(
                    path,
                    "out",
                    f"writes the same file as line {first_line_of_out[key]} ({request.out})",
                    "give each request its own out path",
                    line=line,
                )
            )
        else:
            first_line_of_out[key] = line
        requests.append(request)
    if not rows and not problems:
        how = f"one JSON object per line, e.g. {_BATCH_EXAMPLE}" if fmt == "jsonl" else _csv_shape()
        problems.append(InputProblem(path, "batch file", "no requests: the file is empty", f"write {how}"))
    if problems:
        raise SampleInputError(problems)
    return requests


def _batch_error(path: Path, line: int | None, message: str, fix: str) -> SampleInputError:
    return SampleInputError([InputProblem(path, "batch file", message, fix, line=line)])


def _csv_shape() -> str:
    return f"a header row {','.join(BATCH_KEYS)} and one row per request"


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"the key(s) {', '.join(map(repr, repeated))} appear more than once")
    return dict(pairs)


def _jsonl_rows(path: Path, text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[InputProblem]]:
    """(line, object) of each non-blank line, and a problem for each line that is not a JSON object."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[InputProblem] = []
    # split on "\n" only: str.splitlines would also split on U+2028, which JSON allows inside strings
    for line, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            problems.append(
                InputProblem(
                    path,
                    "batch file",
                    f"not valid JSON ({exc.msg} at column {exc.colno})",
                    f"write one JSON object per line, e.g. {_BATCH_EXAMPLE}",
                    line=line,
                )
            )
            continue
        except ValueError as exc:  # a repeated key, from _no_duplicate_keys
            problems.append(InputProblem(path, "batch file", str(exc), "give each key once", line=line))
            continue
        if not isinstance(value, dict):
            problems.append(
                InputProblem(
                    path,
                    "batch file",
                    f"the line is a JSON {type(value).__name__}, not an object",
                    f"write one JSON object per line, e.g. {_BATCH_EXAMPLE}",
                    line=line,
                )
            )
            continue
        problems.extend(_key_problems(path, line, list(value)))
        rows.append((line, value))
    return rows, problems


def _csv_rows(path: Path, text: str) -> tuple[list[tuple[int, dict[str, Any]]], list[InputProblem]]:
    """(line, {column: cell}) of each non-blank row after the header, and the header's and rows' problems.

    A bad header (unknown, repeated or missing columns) stops the reading: every row would repeat it."""
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[InputProblem] = []
    reader = csv.reader(io.StringIO(text, newline=""), strict=True, skipinitialspace=True)
    start = 1
    try:
        header = next(reader, None)
        while header is not None and not any(cell.strip() for cell in header):
            header = next(reader, None)  # blank lines before the header
        if header is None:
            return rows, []
        header_line = reader.line_num
        header = [cell.strip() for cell in header]
        problems.extend(_key_problems(path, header_line, header))
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            problems.append(
                InputProblem(
                    path,
                    "batch file",
                    f"the header repeats the column(s) {', '.join(repeated)}",
                    "give each column once",
                    line=header_line,
                )
            )
        missing = [name for name in REQUIRED_KEYS if name not in header]
        if missing:
            problems.append(
                InputProblem(
                    path,
                    ", ".join(missing),
                    f"the header lacks the required column(s) {', '.join(missing)}",
                    f"start the file with {_csv_shape()}",
                    line=header_line,
                )
            )
        if problems:
            return rows, problems
        while True:
            start = reader.line_num + 1  # the line this record starts on
            row = next(reader, None)
            if row is None:
                break
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                problems.append(
                    InputProblem(
                        path,
                        "batch file",
                        f"the row has {len(row)} fields but the header has {len(header)}",
                        'put a value (or nothing) for every column; quote fields that contain commas with "..."',
                        line=start,
                    )
                )
                continue
            rows.append((start, dict(zip(header, row, strict=True))))
    except csv.Error as exc:
        problems.append(InputProblem(path, "batch file", f"not valid CSV ({exc})", "fix the quoting", line=start))
    return rows, problems


def _key_problems(path: Path, line: int, keys: Sequence[str]) -> list[InputProblem]:
    """A problem for each key that is not a batch key, with the nearest allowed one when it looks like a typo."""
    problems = []
    for key in keys:
        if key in BATCH_KEYS:
            continue
        near = difflib.get_close_matches(key, BATCH_KEYS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        problems.append(
            InputProblem(
                path,
                str(key),
                f"unknown key {key!r}",
                f"{hint}the allowed keys are {', '.join(BATCH_KEYS)} (prompt is optional)",
                line=line,
            )
        )
    return problems


def _row_request(
    path: Path, line: int, row: dict[str, Any], default_prompt: str
) -> tuple[SampleRequest | None, list[InputProblem]]:
    """The request a row names, or None and the problems of its required keys and prompt."""
    problems: list[InputProblem] = []
    values: dict[str, str] = {}
    for key in REQUIRED_KEYS:
        value = row.get(key)
        if value is None or value == "":
            what = "missing" if key not in row else "empty"
            problems.append(
                InputProblem(
                    path,
                    key,
                    f"the required key {key!r} is {what}",
                    "give every request image, audio and out (prompt is optional)",
                    line=line,
                )
            )
        elif not isinstance(value, str):
            problems.append(
                InputProblem(
                    path, key, f"{key!r} is a {type(value).__name__}, not a path", "write it as a string", line=line
                )
            )
        else:
            values[key] = value
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        problems.append(
            InputProblem(
                path, "prompt", f"'prompt' is a {type(prompt).__name__}, not text", "write it as a string", line=line
            )
        )
    if problems:
        return None, problems
    base = path.parent
    return (
        SampleRequest(
            image=_resolve(base, values["image"]),
            audio=_resolve(base, values["audio"]),
            prompt=prompt if prompt else default_prompt,
            out=_resolve(base, values["out"]),
            origin=f"{path}, line {line}",
        ),
        [],
    )


def _resolve(base: Path, written: str) -> Path:
    """A batch file's path: `~` expanded, a relative one taken from the batch file's folder."""
    candidate = Path(written).expanduser()
    return candidate if candidate.is_absolute() else base / candidate
