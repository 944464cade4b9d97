"""What `ftalk sample` is given and checked before any model loads: the requests (one from the command line, or
many from a batch file, see `batch_file`), their images, audio and output paths, and the problems found in them.

Everything here is cheap: image headers (Pillow), audio headers (`soundfile.info`), folder permissions. Every
problem of every request is collected and raised as one `SampleInputError`, so a batch of fifty requests fails
once, before minutes of model loading, with every line to fix.

Public API:
- `SampleRequest`: one video to make; `InputProblem`, `SampleInputError`: what is wrong with the inputs.
- `check_request`, `check_requests` -> `CheckedRequest`: the facts a request is sampled with, and notes.

This module deliberately imports neither torch nor the models, so the checks run in a second.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.sample.geometry import (
    FRAMES_PER_LATENT,
    MIN_NUM_FRAMES,
    longest_edge_size,
    max_frames_4k1,
    num_frames_for_audio,
    video_size,
)

__all__ = [
    "CheckedRequest",
    "InputProblem",
    "SampleInputError",
    "SampleRequest",
    "check_request",
    "check_requests",
    "load_image",
]

MIN_SIDE = 32
"""The smallest image side, and the smallest video side, a request may have (2 latent pixels after patching)."""

_CONVERT_AUDIO = "convert it to WAV: ffmpeg -i IN -ar 16000 -ac 1 OUT.wav"


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
    except Exception as exc:  # as in inputs._image_facts: Pillow raises many types for a bad file
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
