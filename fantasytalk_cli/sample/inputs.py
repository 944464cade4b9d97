"""What `ftalk sample` is given, checked and prepared before any model loads: the requests (one from the command
line or many from a batch file), their images, audio and output paths, and the geometry upstream inference
derives from them (`docs/inference.md#inputs-and-image-size`, `#frame-count-and-audio-cut`).

Everything here is cheap: image headers (Pillow), audio headers (`soundfile.info`), folder permissions. Every
problem of every request is collected and raised as one `SampleInputError`, so a batch of fifty requests fails
once, before minutes of model loading, with every line to fix.

Public API:
- `SampleRequest`, `read_batch_file(path, *, default_prompt)`: the requests, from a JSON Lines or CSV file.
- `video_size`, `longest_edge_size`, `num_frames_for_audio`, `audio_samples_for_frames`: upstream's geometry.
- `check_request`, `check_requests` -> `CheckedRequest`: the facts a request is sampled with, and notes.
- `load_image(path, size, *, image_size)`: the conditioning image resized exactly as upstream resizes it.

This module deliberately imports neither torch nor the models, so the checks run in a second.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
from PIL import Image

from fantasytalk_cli.errors import FtalkUsageError

__all__ = [
    "AUDIO_RATE",
    "BATCH_KEYS",
    "CheckedRequest",
    "InputProblem",
    "SampleInputError",
    "SampleRequest",
    "audio_samples_for_frames",
    "batch_format",
    "check_request",
    "check_requests",
    "load_image",
    "longest_edge_size",
    "max_frames_4k1",
    "num_frames_for_audio",
    "read_batch_file",
    "round_up",
    "video_size",
]

AUDIO_RATE = 16000
"""The rate the audio is resampled to for wav2vec2 (the same value as `models.audio.SAMPLE_RATE`, repeated here
so that checking inputs does not import torch)."""

SIZE_MULTIPLE = 16
"""Upstream's pipeline rounds the video's width and height up to a multiple of 16 (`check_resize_height_width`)."""

FRAMES_PER_LATENT = 4
"""The VAE's temporal stride: a video has 4k+1 frames, (num_frames - 1) // 4 + 1 latent frames."""

MIN_NUM_FRAMES = 5
"""The shortest video upstream's formula makes: int(fps * d // 4) * 4 + 5 with d near 0."""

MIN_SIDE = 32
"""The smallest image side, and the smallest video side, a request may have (2 latent pixels after patching)."""

BATCH_KEYS = ("image", "audio", "prompt", "out")
"""The keys (JSON Lines) or columns (CSV) of a batch file, in the order the messages list them."""

REQUIRED_KEYS = ("image", "audio", "out")
"""What every request must name; `prompt` falls back to the default prompt."""

BATCH_FORMATS = {".jsonl": "jsonl", ".json-lines": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
"""Batch file suffixes (case-insensitive) and the format each is read as."""

_CONVERT_AUDIO = "convert it to WAV: ffmpeg -i IN -ar 16000 -ac 1 OUT.wav"
_BATCH_EXAMPLE = '{"image": "face.png", "audio": "speech.wav", "prompt": "A woman is talking.", "out": "face.mp4"}'


# ------------------------------------------------------------------------------------------------------ errors


@dataclass(frozen=True)
class InputProblem:
    """One thing wrong with an input: the file (and line of a batch file), the field, what is wrong, the fix.

    `path` is None for a setting (image_size, fps, max_num_frames); `origin` names the batch file line a request
    came from, when it came from one."""

    path: Path | None
    field_name: str
    message: str
    fix: str
    line: int | None = None
    origin: str = ""

    def __str__(self) -> str:
        where = "" if self.path is None else str(self.path)
        if self.line is not None:
            where += f", line {self.line}"
        head = f"{where}: {self.field_name}" if where else self.field_name
        tail = f" [request from {self.origin}]" if self.origin else ""
        return f"{head}: {self.message}; fix: {self.fix}{tail}"


class SampleInputError(FtalkUsageError):
    """What `ftalk sample` was given cannot be sampled: every problem found, one per line (exit 2).

    `problems` holds them as `InputProblem`s for a caller that renders them itself."""

    def __init__(self, problems: Sequence[InputProblem]) -> None:
        self.problems: tuple[InputProblem, ...] = tuple(problems)
        if len(self.problems) == 1:
            message = str(self.problems[0])
        else:
            lines = "\n".join(f"  - {problem}" for problem in self.problems)
            message = f"{len(self.problems)} problems with the sample inputs (nothing was loaded):\n{lines}"
        super().__init__(message)


# ---------------------------------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class SampleRequest:
    """One video to make: the portrait, the speech, the text prompt and the .mp4 to write.

    `origin` ("batch.jsonl, line 3") only labels messages; it takes no part in equality."""

    image: Path
    audio: Path
    prompt: str
    out: Path
    origin: str = field(default="", compare=False)


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


# ---------------------------------------------------------------------------------------------------- geometry


def longest_edge_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """Upstream's `resize_image_by_longest_edge` size: scale = image_size / max(w, h), then
    (int(w * scale), int(h * scale)), in floating point exactly as upstream computes it."""
    if width <= 0 or height <= 0 or image_size <= 0:
        raise ValueError(f"sizes must be positive, got {width}x{height} at image_size {image_size}")
    scale = image_size / max(width, height)
    return int(width * scale), int(height * scale)


def round_up(value: int, multiple: int = SIZE_MULTIPLE) -> int:
    """`value` rounded up to a multiple of `multiple` (the pipeline's `check_resize_height_width`)."""
    return (value + multiple - 1) // multiple * multiple


def video_size(width: int, height: int, image_size: int) -> tuple[int, int]:
    """(width, height) of the video upstream makes from a `width` x `height` image: the longest-edge size
    (`longest_edge_size`), each side then rounded UP to a multiple of 16, as the pipeline does. A 1024x1536 image at
    image_size 512 gives (341, 512), then (352, 512)."""
    resized_w, resized_h = longest_edge_size(width, height, image_size)
    return round_up(resized_w), round_up(resized_h)


def max_frames_4k1(max_num_frames: int) -> int:
    """`max_num_frames` rounded DOWN to the nearest 4k+1 (81 stays 81, 80 becomes 77)."""
    if max_num_frames < MIN_NUM_FRAMES:
        raise ValueError(f"max_num_frames must be at least {MIN_NUM_FRAMES}, got {max_num_frames}")
    return (max_num_frames - 1) // FRAMES_PER_LATENT * FRAMES_PER_LATENT + 1


def num_frames_for_audio(duration_s: float, fps: float, max_num_frames: int) -> int:
    """Frames of the video for `duration_s` seconds of audio: upstream's
    `min(int(fps * d // 4) * 4 + 5, max_num_frames)`. 3.0 s at 23 fps gives 73, 2.9 s gives 69, 10 s gives 81.

    The result is always 4k+1. Upstream's formula is 4k+1 except when `max_num_frames` is not; its pipeline then
    rounds that count UP to the next 4k+1 (while the audio is cut for the smaller count). Here a `max_num_frames`
    that is not 4k+1 is rounded DOWN to 4k+1 instead (80 -> 77), so the video never has frames without audio
    features. `ValueError` for a negative or non-finite duration, fps <= 0, or max_num_frames < 5 (`check_requests`
    reports those as `SampleInputError` first)."""
    if not math.isfinite(duration_s) or duration_s < 0:
        raise ValueError(f"the audio duration must be a finite number of seconds >= 0, got {duration_s}")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return min(int(fps * duration_s // 4) * 4 + 5, max_frames_4k1(max_num_frames))


def audio_samples_for_frames(num_frames: int, fps: float, rate: int = AUDIO_RATE) -> int:
    """How many samples (at `rate`) upstream cuts from the start of the audio for `num_frames` frames:
    `int(num_frames / fps * rate)`; 81 frames at 23 fps give 56347 samples at 16 kHz."""
    return int(num_frames / fps * rate)


# ------------------------------------------------------------------------------------------------------ checks


@dataclass(frozen=True)
class CheckedRequest:
    """A request that passed every check, with the facts it will be sampled with.

    `image_wh`, `resized_wh`, `video_wh` are (width, height): the file's size, upstream's longest-edge size, and
    the video's size (the longest-edge size rounded up to multiples of 16). `audio_used_seconds` is
    num_frames / fps capped by the audio's duration. `notes` say what the user may not expect (audio cut short,
    an image scaled up, an alpha channel dropped...)."""

    request: SampleRequest
    image_wh: tuple[int, int]
    resized_wh: tuple[int, int]
    video_wh: tuple[int, int]
    num_frames: int
    audio_seconds: float
    audio_rate: int
    audio_channels: int
    audio_used_seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def latent_frames(self) -> int:
        """(num_frames - 1) // 4 + 1: the latent frames the DiT denoises."""
        return (self.num_frames - 1) // FRAMES_PER_LATENT + 1


@dataclass(frozen=True)
class _ImageFacts:
    width: int
    height: int
    mode: str
    orientation: int
    has_alpha: bool


@dataclass(frozen=True)
class _AudioFacts:
    frames: int
    rate: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.rate


def check_request(
    req: SampleRequest, *, image_size: int, fps: float, max_num_frames: int, overwrite: bool = False
) -> CheckedRequest:
    """The facts of one request, or `SampleInputError` listing all its problems (see `check_requests`)."""
    return check_requests([req], image_size=image_size, fps=fps, max_num_frames=max_num_frames, overwrite=overwrite)[0]


def check_requests(
    requests: Sequence[SampleRequest],
    *,
    image_size: int,
    fps: float,
    max_num_frames: int,
    overwrite: bool = False,
) -> list[CheckedRequest]:
    """Check every request before any model loads; `SampleInputError` lists every problem of every request.

    Settings first (image_size >= 32, fps > 0, max_num_frames >= 5; a bad setting stops here). Then per request:
    the image exists, is a file Pillow can open and verify, has a shorter side of at least 32 px and gives a video
    of at least 32 px a side; the audio exists, is a file soundfile can read, is not empty and lasts at least one
    latent frame (4 / fps seconds); the out path ends in .mp4, is neither the image nor the audio, is not an
    existing file unless `overwrite` (never a folder), and its folder exists or can be created. Across requests,
    no two write the same out. Returns the `CheckedRequest`s in the requests' order."""
    problems = _settings_problems(image_size, fps, max_num_frames)
    if not problems and not requests:
        problems.append(
            InputProblem(None, "requests", "nothing to sample", "give an image and an audio, or a batch file")
        )
    if problems:
        raise SampleInputError(problems)
    checked: list[CheckedRequest] = []
    for req in requests:
        result, req_problems = _check_one(
            req, image_size=image_size, fps=fps, max_num_frames=max_num_frames, overwrite=overwrite
        )
        problems.extend(req_problems)
        if result is not None:
            checked.append(result)
    problems.extend(_cross_request_problems(requests))
    if problems:
        raise SampleInputError(problems)
    return checked


def _cross_request_problems(requests: Sequence[SampleRequest]) -> list[InputProblem]:
    """Two requests writing the same out, or one request's out replacing another request's image or audio (its
    own image or audio is `_out_problems`' business)."""
    problems: list[InputProblem] = []
    writers: dict[str, int] = {}
    inputs: dict[str, tuple[str, int]] = {}
    for index, req in enumerate(requests):
        inputs.setdefault(os.path.realpath(req.image), ("image", index))
        inputs.setdefault(os.path.realpath(req.audio), ("audio", index))
    for index, req in enumerate(requests):
        key = os.path.realpath(req.out)
        first = writers.setdefault(key, index)
        if first != index:
            other = requests[first]
            problems.append(
                _problem(
                    req,
                    req.out,
                    "out",
                    f"another request ({other.origin or other.image}) writes the same file",
                    "give each request its own out path",
                )
            )
        kind, owner = inputs.get(key, ("", index))
        own_inputs = {os.path.realpath(req.image), os.path.realpath(req.audio)}
        if owner != index and key not in own_inputs:
            other = requests[owner]
            problems.append(
                _problem(
                    req,
                    req.out,
                    "out",
                    f"out is the {kind} of another request ({other.origin or other.image})",
                    "choose an out path that is no request's input",
                )
            )
    return problems


def _settings_problems(image_size: int, fps: float, max_num_frames: int) -> list[InputProblem]:
    problems = []
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < MIN_SIDE:
        problems.append(
            InputProblem(
                None,
                "image_size",
                f"{image_size!r} is not a whole number of pixels >= {MIN_SIDE}",
                "set image_size to the video's longest side in pixels (upstream's default: 512)",
            )
        )
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        problems.append(InputProblem(None, "fps", f"{fps!r} is not a positive frame rate", "set fps (upstream: 23)"))
    if isinstance(max_num_frames, bool) or not isinstance(max_num_frames, int) or max_num_frames < MIN_NUM_FRAMES:
        problems.append(
            InputProblem(
                None,
                "max_num_frames",
                f"{max_num_frames!r} is fewer than {MIN_NUM_FRAMES} frames (the shortest video: 2 latent frames)",
                f"set max_num_frames to a 4k+1 number >= {MIN_NUM_FRAMES} (upstream's default: 81)",
            )
        )
    return problems


def _problem(req: SampleRequest, path: Path, field_name: str, message: str, fix: str) -> InputProblem:
    return InputProblem(path, field_name, message, fix, origin=req.origin)


def _seconds(value: float) -> str:
    """3.52 -> "3.52", 9.10 -> "9.1", 3.0 -> "3"."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _check_one(
    req: SampleRequest, *, image_size: int, fps: float, max_num_frames: int, overwrite: bool
) -> tuple[CheckedRequest | None, list[InputProblem]]:
    problems: list[InputProblem] = []
    notes: list[str] = []

    image = _image_facts(req, problems)
    resized = video = None
    if image is not None:
        resized, video = _image_geometry(req, image, image_size, problems, notes)

    audio = _audio_facts(req, problems)
    num_frames = used = 0
    if audio is not None:
        min_seconds = FRAMES_PER_LATENT / fps
        if audio.seconds < min_seconds:
            problems.append(
                _problem(
                    req,
                    req.audio,
                    "audio",
                    f"the audio lasts {audio.seconds:.3f} s, shorter than one latent frame "
                    f"({FRAMES_PER_LATENT} frames at {fps:g} fps = {min_seconds:.3f} s)",
                    f"use a recording of at least {min_seconds:.3f} s",
                )
            )
        else:
            num_frames = num_frames_for_audio(audio.seconds, fps, max_num_frames)
            used = min(num_frames / fps, audio.seconds)
            notes.extend(_audio_notes(audio, num_frames, fps, max_num_frames))

    problems.extend(_out_problems(req, overwrite))
    if problems or image is None or audio is None or resized is None or video is None:
        return None, problems
    return (
        CheckedRequest(
            request=req,
            image_wh=(image.width, image.height),
            resized_wh=resized,
            video_wh=video,
            num_frames=num_frames,
            audio_seconds=audio.seconds,
            audio_rate=audio.rate,
            audio_channels=audio.channels,
            audio_used_seconds=used,
            notes=notes,
        ),
        [],
    )


def _missing_or_not_file(req: SampleRequest, path: Path, field_name: str, kind: str) -> InputProblem | None:
    where = " (a batch file's relative paths start from its folder)" if req.origin else ""
    if not os.path.lexists(path):
        return _problem(req, path, field_name, f"the {kind} file does not exist", f"check the path{where}")
    if not os.path.isfile(path):
        what = "a folder" if os.path.isdir(path) else "not a regular file (a broken link?)"
        return _problem(req, path, field_name, f"is {what}", f"give the path of the {kind} file")
    return None


def _image_facts(req: SampleRequest, problems: list[InputProblem]) -> _ImageFacts | None:
    """Size, mode and EXIF orientation from the header: open + verify, then reopen (verify spends the file)."""
    missing = _missing_or_not_file(req, req.image, "image", "image")
    if missing is not None:
        problems.append(missing)
        return None
    try:
        with Image.open(req.image) as im:
            im.verify()
        with Image.open(req.image) as im:
            width, height = im.size
            mode = im.mode
            orientation = int(im.getexif().get(0x0112, 1) or 1)
            has_alpha = "A" in im.mode or "transparency" in im.info
    except Exception as exc:  # Pillow raises many types for a bad file (OSError, SyntaxError, struct.error...)
        problems.append(
            _problem(
                req,
                req.image,
                "image",
                f"Pillow cannot read it as an image ({type(exc).__name__}: {exc})",
                "convert it to PNG or JPEG (or check that you can read it)",
            )
        )
        return None
    return _ImageFacts(width, height, mode, orientation, has_alpha)


def _image_geometry(
    req: SampleRequest, image: _ImageFacts, image_size: int, problems: list[InputProblem], notes: list[str]
) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """The longest-edge and video sizes, with a problem for an image or video too small, and notes."""
    if min(image.width, image.height) < MIN_SIDE:
        problems.append(
            _problem(
                req,
                req.image,
                "image",
                f"the image is {image.width}x{image.height} px; its shorter side must be at least {MIN_SIDE} px",
                "use a larger portrait (upstream works at 512 px on the longest side)",
            )
        )
        return None, None
    resized = longest_edge_size(image.width, image.height, image_size)
    video = video_size(image.width, image.height, image_size)
    if min(video) < MIN_SIDE:
        problems.append(
            _problem(
                req,
                req.image,
                "image",
                f"at image_size {image_size} the {image.width}x{image.height} px image gives a {video[0]}x{video[1]} "
                f"video, smaller than {MIN_SIDE} px on a side",
                "crop the image to a less elongated shape, or raise image_size",
            )
        )
        return None, None
    if max(image.width, image.height) < image_size:
        notes.append(
            f"the image is {image.width}x{image.height} px; it is scaled up to {resized[0]}x{resized[1]} "
            f"(image_size {image_size}), which can look soft"
        )
    if image.orientation != 1:
        notes.append(
            f"the image has EXIF orientation {image.orientation}; like upstream it is used as stored, not rotated "
            "(rotate the pixels if the face is sideways)"
        )
    if image.has_alpha:
        notes.append(
            f"the image has transparency ({image.mode}); like upstream it is dropped, not composited on a background"
        )
    return resized, video


def _audio_facts(req: SampleRequest, problems: list[InputProblem]) -> _AudioFacts | None:
    missing = _missing_or_not_file(req, req.audio, "audio", "audio")
    if missing is not None:
        problems.append(missing)
        return None
    try:
        info = soundfile.info(str(req.audio))
    except (RuntimeError, OSError, ValueError, TypeError) as exc:  # soundfile.LibsndfileError is a RuntimeError
        problems.append(_problem(req, req.audio, "audio", f"soundfile cannot read it as audio ({exc})", _CONVERT_AUDIO))
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        problems.append(
            _problem(
                req,
                req.audio,
                "audio",
                f"the audio is empty ({info.frames} samples at {info.samplerate} Hz)",
                "use a recording with speech in it",
            )
        )
        return None
    return _AudioFacts(frames=int(info.frames), rate=int(info.samplerate), channels=int(info.channels))


def _audio_notes(audio: _AudioFacts, num_frames: int, fps: float, max_num_frames: int) -> list[str]:
    notes = []
    video_seconds = num_frames / fps
    cap = max_frames_4k1(max_num_frames)
    if num_frames == cap and audio.seconds > video_seconds:
        notes.append(
            f"audio is {_seconds(audio.seconds)} s; only the first {_seconds(video_seconds)} s are used "
            f"(max_num_frames {cap} at {fps:g} fps)"
        )
    if num_frames == cap and cap != max_num_frames:
        notes.append(f"max_num_frames {max_num_frames} is not 4k+1; the video has at most {cap} frames")
    return notes


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def _out_problems(req: SampleRequest, overwrite: bool) -> list[InputProblem]:
    """The .mp4 suffix, not an input, no silent overwrite, a folder that exists or can be made."""
    out = req.out
    problems = []
    if out.suffix.lower() != ".mp4":
        problems.append(
            _problem(req, out, "out", "the output must be an .mp4 file", f"name it {out.stem or 'video'}.mp4")
        )
    for kind, source in (("image", req.image), ("audio", req.audio)):
        if _same_file(out, source):
            problems.append(
                _problem(
                    req,
                    out,
                    "out",
                    f"out is the request's {kind} file; writing it would destroy the input",
                    "choose another out path",
                )
            )
            return problems
    if os.path.isdir(out):
        problems.append(
            _problem(req, out, "out", "out is a folder", f"give a file path inside it, e.g. {out / 'video.mp4'}")
        )
        return problems
    if os.path.lexists(out) and not overwrite:
        problems.append(
            _problem(
                req,
                out,
                "out",
                "the file exists and would be replaced",
                "pass --overwrite to replace it, or choose another out path",
            )
        )
    folder = Path(os.path.abspath(out)).parent
    existing = folder
    while not os.path.exists(existing) and existing != existing.parent:
        existing = existing.parent
    if not os.path.isdir(existing):
        problems.append(
            _problem(
                req,
                out,
                "out",
                f"its folder {folder} cannot be created: {existing} is not a folder",
                "choose an out path inside a folder",
            )
        )
    elif not os.access(existing, os.W_OK | os.X_OK):
        verb = "write in" if existing == folder else f"create {folder} in"
        problems.append(
            _problem(
                req,
                out,
                "out",
                f"cannot {verb} {existing} (permission denied)",
                "choose an out folder you can write to",
            )
        )
    return problems


# ------------------------------------------------------------------------------------------------------- image


def load_image(path: Path, size: tuple[int, int], *, image_size: int) -> np.ndarray:
    """The conditioning image as RGB uint8 [H, W, 3] at `size` = (width, height), resized as upstream does.

    Upstream opens the file, converts it to RGB and resizes it with LANCZOS to the longest-edge size for
    `image_size` (`resize_image_by_longest_edge`); its pipeline then resizes that image to the 16-rounded video
    size when it encodes it, with `Image.resize((width, height))` and no filter named, i.e. Pillow's default
    BICUBIC. Both steps are repeated here (no EXIF rotation, alpha dropped, as upstream). `size` must be
    `video_size` of the file's size at `image_size` (what `check_requests` reported); `SampleInputError` when the
    file cannot be read or no longer gives that size."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
    except Exception as exc:  # as in _image_facts: Pillow raises many types for a bad file
        raise SampleInputError(
            [
                InputProblem(
                    path, "image", f"Pillow cannot read it ({type(exc).__name__}: {exc})", "convert it to PNG or JPEG"
                )
            ]
        ) from exc
    expected = video_size(rgb.width, rgb.height, image_size)
    if tuple(size) != expected:
        raise SampleInputError(
            [
                InputProblem(
                    path,
                    "image",
                    f"the {rgb.width}x{rgb.height} px image gives a {expected[0]}x{expected[1]} video at image_size "
                    f"{image_size}, not the {size[0]}x{size[1]} it was checked for (did the file change?)",
                    "run the command again",
                )
            ]
        )
    resized = rgb.resize(longest_edge_size(rgb.width, rgb.height, image_size), Image.Resampling.LANCZOS)
    final = resized.resize(expected, Image.Resampling.BICUBIC)
    return np.array(final, dtype=np.uint8)
