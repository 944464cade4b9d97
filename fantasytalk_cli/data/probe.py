"""Cheap, real decoding probes of one video or audio file, and the cache that makes re-runs free.

A video probe opens the clip with decord (the decoder training uses: opening reads every packet, so a
file cut short fails here), decodes the first frame, and asks PyAV for the container's claims (sample
count, duration). The last frame is checked by decoding the stream's final packets on their own
(PyAV, bitstream error detection, missing references concealed): that proves the tail of the bitstream is
present and parses without decoding the whole last GOP, which for a typical clip (often one keyframe)
costs about as much as a full decode. Where the last GOP is short, or `thorough` is set, or the fast check
fails, decord decodes the real last frame (`vr[len - 1]`), so an error is never reported on the fast
check alone; damage the decoder conceals (no error raised) is not reported by either. An audio probe reads the
header with soundfile and streams the samples in blocks for NaN/inf and RMS.

Every decoder or container open goes through `open_decoder`, so tests can count them. Probe results
are plain dicts (JSON-ready, cacheable, picklable); `problems` lists `[code, message]` pairs for the
config-independent E401-E403, W404, E501-E503 findings.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fantasytalk_cli.fileio import atomic_file, file_sha256

PROBE_VERSION = 1
"""Bumped when probe results change meaning; cached results of another version are ignored."""

DecoderKind = Literal["decord", "pyav", "soundfile"]
Kind = Literal["video", "audio"]

_SHORT_TAIL_FRAMES = 8
"""A last GOP at most this long is decoded exactly with decord (cheap enough)."""
_TAIL_PACKETS = 4
"""Packets at the end of the stream the fast last-frame check decodes on their own."""
_AUDIO_BLOCK = 1 << 16


def open_decoder(kind: DecoderKind, path: Path) -> Any:
    """Open a decoder or container: every media open of a probe goes through here (tests count them)."""
    if kind == "decord":
        import decord

        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    if kind == "pyav":
        import av

        return av.open(str(path))
    import soundfile

    return soundfile.SoundFile(str(path))


_DEVNULL: int | None = None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Point the process's stderr (fd 2) at /dev/null while native decoders run.

    FFmpeg and decord print straight to fd 2 (and from decoder threads); a broken corpus would flood the
    terminal and the progress bar. Their errors still reach us as exceptions, which become findings.
    """
    global _DEVNULL
    try:
        if _DEVNULL is None:
            _DEVNULL = os.open(os.devnull, os.O_WRONLY)
        saved = os.dup(2)
    except OSError:  # no fd 2 (some embedded interpreters)
        yield
        return
    os.dup2(_DEVNULL, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _short(exc: BaseException | str, limit: int = 160) -> str:
    """The useful part of a native error message, on one line."""
    text = " ".join(str(exc).split())
    for marker in ("Error: ", "ERROR ", "Check failed: "):
        if marker in text:
            text = text[text.index(marker) :]
            break
    return text[:limit]


def mp4_overrun(path: Path) -> str | None:
    """If `path` is an MP4/MOV whose top-level box runs past the end of the file, say which (a cut-short file).

    Reads only box headers (a few bytes per box). None for a complete file or another container.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8 or head[4:8] != b"ftyp":
                return None
            offset = 0
            while offset + 8 <= size:
                handle.seek(offset)
                header = handle.read(16)
                box_size, box_type = struct.unpack(">I4s", header[:8])
                if box_size == 1 and len(header) >= 16:
                    box_size = struct.unpack(">Q", header[8:16])[0]
                elif box_size == 0:  # extends to the end of the file
                    return None
                if box_size < 8:
                    return f"box at byte {offset} has an invalid size {box_size}"
                if offset + box_size > size:
                    name = box_type.decode("latin-1")
                    return f"the file ends inside its '{name}' box ({size} of {offset + box_size} bytes present)"
                offset += box_size
    except OSError:
        return None
    return None


def _container_claims(path: Path, thorough_tail: bool) -> tuple[dict[str, Any], str | None]:
    """PyAV: the container's frame claims, and whether the final packets decode on their own.

    Returns ({"claimed_frames", "claimed_duration_frames"}, tail error or None).
    """
    import av

    claims: dict[str, Any] = {"claimed_frames": None, "claimed_duration_frames": None}
    with open_decoder("pyav", path) as container:
        if not container.streams.video:
            return claims, None
        stream = container.streams.video[0]
        if stream.frames:
            claims["claimed_frames"] = int(stream.frames)
        rate = stream.average_rate or stream.guessed_rate
        if stream.duration and stream.time_base and rate:
            seconds = Fraction(stream.duration) * stream.time_base
            claims["claimed_duration_frames"] = round(seconds * Fraction(rate))
        if thorough_tail:
            return claims, None
        start = stream.start_time or 0
        end = start + (stream.duration or 0)
        back = 0
        if rate and stream.time_base:  # a few frames before the end, so reordered (B-)frames are included
            back = int(_TAIL_PACKETS / (Fraction(rate) * stream.time_base))
        ctx = stream.codec_context
        ctx.thread_count = 1  # a few packets: decoder threads would cost more than they save
        # not `explode`: frames whose references lie before the seek point would then fail on a sound file
        ctx.options = {"flags2": "+showall", "err_detect": "crccheck+bitstream+buffer"}
        try:
            container.seek(max(start, end - back), stream=stream, backward=True, any_frame=True)
            packets = [p for p in container.demux(stream) if p.size]
            if not packets:
                return claims, "no packet at the end of the stream"
            for packet in packets[-2 * _TAIL_PACKETS :]:
                ctx.decode(packet)
            ctx.decode(None)
        except (av.FFmpegError, ValueError) as exc:
            return claims, _short(exc)
    return claims, None


def probe_video(path: Path, *, thorough: bool = False, want_hash: bool = False) -> dict[str, Any]:
    """Probe one video file: decoded facts, container claims and E401-E403/W404 problems."""
    with _quiet_stderr():  # decord's decoder thread may still print while the reader closes
        return _probe_video(Path(path), thorough, want_hash)


def _probe_video(path: Path, thorough: bool, want_hash: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": "video", "problems": [], "thorough": thorough}
    problems: list[list[str]] = out["problems"]
    if want_hash:
        out["sha256"] = file_sha256(path)
    if path.stat().st_size == 0:
        problems.append(["E401", "the file is empty (0 bytes)"])
        return out
    try:
        reader = open_decoder("decord", path)
    except Exception as exc:  # decord raises DECORDError / RuntimeError with native text
        _diagnose_unopenable(path, exc, problems)
        return out
    num_frames = len(reader)
    fps = float(reader.get_avg_fps())
    out.update(num_frames=num_frames, fps=fps if math.isfinite(fps) else 0.0)
    if num_frames == 0:
        problems.append(["E402", "decord finds no frames in the video stream"])
        return out
    try:
        first = reader[0]
        out["height"], out["width"] = int(first.shape[0]), int(first.shape[1])
    except Exception as exc:
        # decord decodes ahead in a thread, so a bad packet anywhere in the first GOP can surface here
        problems.append(["E403", f"frames do not decode (reading frame 0 failed: {_short(exc)})"])
        return out
    try:
        keys = list(reader.get_key_indices())
    except Exception:
        keys = []
    exact_tail = thorough or bool(keys and num_frames - 1 - keys[-1] <= _SHORT_TAIL_FRAMES)
    try:
        claims, tail_error = _container_claims(path, thorough_tail=exact_tail)
    except Exception as exc:  # PyAV cannot read what decord could: keep decord's facts, check the tail exactly
        claims, tail_error = {}, _short(exc)
    out.update(
        claimed_frames=claims.get("claimed_frames"), claimed_duration_frames=claims.get("claimed_duration_frames")
    )
    if exact_tail or tail_error:
        try:
            reader[num_frames - 1]
        except Exception as exc:
            problems.append(["E403", f"the last frame ({num_frames - 1}) does not decode ({_short(exc)})"])
            return out
    del reader
    for label, claim in (("frame count", out["claimed_frames"]), ("duration x fps", out["claimed_duration_frames"])):
        if claim is not None and abs(claim - num_frames) > 1:
            problems.append(["W404", f"{num_frames} frames decode but the container's {label} claims {claim}"])
            break
    return out


def _diagnose_unopenable(path: Path, exc: BaseException, problems: list[list[str]]) -> None:
    """decord could not open the file: tell a cut-short file and an empty stream from an unreadable one."""
    overrun = mp4_overrun(path)
    if overrun:
        problems.append(["E403", f"truncated: {overrun}"])
        return
    try:
        with open_decoder("pyav", path) as container:
            streams = container.streams.video
            if not streams:
                problems.append(["E402", "the container holds no video stream"])
                return
            if streams[0].frames == 0 and not any(p.size for p in container.demux(streams[0])):
                problems.append(["E402", "the video stream holds no frames"])
                return
    except Exception:
        pass
    problems.append(["E401", f"decord cannot open it ({_short(exc)})"])


def probe_audio(path: Path) -> dict[str, Any]:
    """Probe one audio file: rate, channels, length, NaN/inf count, RMS and peak (E501-E503 problems)."""
    out: dict[str, Any] = {"kind": "audio", "problems": []}
    problems: list[list[str]] = out["problems"]
    try:
        handle = open_decoder("soundfile", Path(path))
    except Exception as exc:
        problems.append(["E501", f"soundfile cannot open it ({_short(exc)})"])
        return out
    with handle:
        out.update(sample_rate=int(handle.samplerate), channels=int(handle.channels), frames=int(handle.frames))
        if handle.frames <= 0:
            problems.append(["E502", "the audio holds no samples"])
            return out
        may_be_nonfinite = handle.subtype in ("FLOAT", "DOUBLE") or not handle.subtype.startswith("PCM")
        buffer = np.empty((min(_AUDIO_BLOCK, handle.frames), handle.channels), dtype=np.float32)
        total = 0
        square_sum = 0.0
        nonfinite = 0
        peak = 0.0
        try:
            while True:
                got = handle.read(out=buffer)
                if len(got) == 0:
                    break
                flat = got.reshape(-1)
                if may_be_nonfinite:
                    finite = np.isfinite(flat)
                    if not finite.all():
                        nonfinite += int(flat.size - finite.sum())
                        flat = np.where(finite, flat, np.float32(0))
                square_sum += float(np.dot(flat, flat))
                peak = max(peak, float(np.abs(flat).max(initial=0.0)))
                total += len(got)
        except Exception as exc:
            problems.append(["E501", f"reading the samples fails after {total} frames ({_short(exc)})"])
            return out
    # RMS over all channels' samples (a silent track is silent in every channel)
    rms = math.sqrt(square_sum / (total * int(out["channels"]))) if total else 0.0
    out.update(frames=total, nonfinite=nonfinite, rms=rms, peak=peak)
    if total == 0:
        problems.append(["E502", "the audio holds no samples"])
    elif nonfinite:
        problems.append(["E503", f"{nonfinite} NaN/inf sample values"])
    return out


@dataclass(frozen=True)
class ProbeJob:
    """One file to probe (picklable, sent to worker processes in chunks)."""

    kind: Kind
    path: str
    thorough: bool = False
    want_hash: bool = False


def run_job(job: ProbeJob) -> dict[str, Any]:
    """Probe one file; an unexpected failure becomes an 'unreadable' problem, never a crash."""
    try:
        if job.kind == "video":
            return probe_video(Path(job.path), thorough=job.thorough, want_hash=job.want_hash)
        return probe_audio(Path(job.path))
    except Exception as exc:
        code = "E401" if job.kind == "video" else "E501"
        return {"kind": job.kind, "problems": [[code, f"probe failed: {type(exc).__name__}: {_short(exc)}"]]}


def probe_chunk(jobs: list[ProbeJob]) -> list[dict[str, Any]]:
    """Worker entry point: probe a chunk of files (chunks amortise inter-process overhead)."""
    return [run_job(job) for job in jobs]


# ------------------------------------------------------------------------------------------------ cache


def file_signature(path: Path) -> tuple[str, int, int]:
    """(resolved path, size, mtime_ns): the cache key of a file; changes when the file does."""
    resolved = os.path.realpath(path)
    info = os.stat(resolved)
    return resolved, info.st_size, info.st_mtime_ns


class ProbeCache:
    """Probe results keyed by (kind, resolved path, size, mtime_ns), appended as JSON Lines.

    Loaded lazily on the first lookup; new results are appended (flushed on `close`); a file holding many
    superseded lines is compacted on close. A corrupt line is skipped, an unreadable cache is ignored.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._entries: dict[tuple[str, str, int, int], dict[str, Any]] | None = None
        self._lines = 0
        self._pending: list[str] = []
        self.hits = 0
        self.misses = 0
        self.write_error: str | None = None

    def _load(self) -> dict[tuple[str, str, int, int], dict[str, Any]]:
        if self._entries is None:
            self._entries = {}
            try:
                with open(self.path, encoding="utf-8") as handle:
                    for line in handle:
                        self._lines += 1
                        try:
                            rec = json.loads(line)
                            if rec.get("v") != PROBE_VERSION:
                                continue
                            key = (rec["kind"], rec["path"], int(rec["size"]), int(rec["mtime_ns"]))
                            self._entries[key] = rec["result"]
                        except (ValueError, KeyError, TypeError):
                            continue
            except OSError:
                pass
        return self._entries

    def get(
        self, kind: Kind, signature: tuple[str, int, int], need_hash: bool = False, need_thorough: bool = False
    ) -> dict[str, Any] | None:
        """The cached result, or None where there is none or it was probed with less than is asked now."""
        result = self._load().get((kind, *signature))
        if result is None or (need_hash and "sha256" not in result) or (need_thorough and not result.get("thorough")):
            self.misses += 1
            return None
        self.hits += 1
        return result

    def put(self, kind: Kind, signature: tuple[str, int, int], result: dict[str, Any]) -> None:
        self._load()[(kind, *signature)] = result
        path, size, mtime_ns = signature
        rec = {"v": PROBE_VERSION, "kind": kind, "path": path, "size": size, "mtime_ns": mtime_ns, "result": result}
        self._pending.append(json.dumps(rec))
        if len(self._pending) >= 256:
            self.flush()

    def flush(self) -> None:
        if not self._pending or self.write_error:
            self._pending.clear()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write("\n".join(self._pending) + "\n")
            self._lines += len(self._pending)
        except OSError as exc:
            self.write_error = f"cannot write the probe cache {self.path} ({exc.strerror or exc})"
        self._pending.clear()

    def close(self) -> None:
        self.flush()
        entries = self._entries
        if entries is None or self.write_error or self._lines <= 2 * len(entries) + 1000:
            return
        with atomic_file(self.path) as handle:
            for (kind, path, size, mtime_ns), result in entries.items():
                rec = {"v": PROBE_VERSION, "kind": kind, "path": path, "size": size, "mtime_ns": mtime_ns}
                handle.write(json.dumps({**rec, "result": result}) + "\n")  # type: ignore[call-overload]
        self._lines = len(entries)
