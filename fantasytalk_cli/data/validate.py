"""`ftalk validate-metadata`: check every entry of the metadata by really decoding it, before a GPU hour is spent.

One pass over the (streamed) metadata: schema checks, path checks and caption checks run in this process;
video and audio probes (`data/probe.py`) run in worker processes in chunks and are cached by file identity,
so a re-run probes only what changed. Checks that depend on the config (frame rate, size, frame count,
audio length) are computed here from the probe facts, so changing the config never re-probes.

Memory stays flat in the number of entries: findings stream to the `--json` report and clean entries to
`--write-clean` as they complete (in input order); only counters and the N worst entries are kept (plus
one key per video path for duplicates, and the probe cache's index).
Codes, severities and fixes: see `data/findings.py`.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fantasytalk_cli.config.schema import BucketConfig, DataConfig
from fantasytalk_cli.data.buckets import DROP_TOO_SHORT, DROP_TOO_SMALL, eligibility, level_grid
from fantasytalk_cli.data.captions import TokenCounter, TokenizerError, text_checks
from fantasytalk_cli.data.findings import CODES, Finding, finding
from fantasytalk_cli.data.metadata import MetadataEntry, metadata_hash, outside_root, parse_entry, resolve_media_path
from fantasytalk_cli.data.metadata_file import MetadataError, count_entries, iter_raw_entries
from fantasytalk_cli.data.metadata_write import EntryWriter
from fantasytalk_cli.data.probe import ProbeCache, ProbeJob
from fantasytalk_cli.data.probe_facts import PROBE_KEY, ProbeFacts
from fantasytalk_cli.data.probing import (
    ProbeItem,
    ProbePipeline,
    available_cores,
    default_cache_path,
    probe_jobs,
)
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.fileio import AtomicFile

MAX_FPS = 240.0
"""A frame rate above this is taken for a broken header."""
AUDIO_RATE = 16000
"""wav2vec2's sample rate."""


class ValidateUsageError(FtalkUsageError, ValueError):
    """The validation cannot run as asked (missing metadata option, output over the input, bad tokenizer)."""


@dataclass(frozen=True)
class ValidateOptions:
    """Options of one validation run (the command-line options of `ftalk validate-metadata`)."""

    json_path: Path | None = None
    """Write every finding and per-entry probe facts here (JSON, streamed)."""
    clean_path: Path | None = None
    """Write the entries without errors, with their probe facts, here (format from the suffix)."""
    workers: int = 0
    """Probe processes; 0 = one per CPU core, 1 = probe in this process."""
    cache_path: Path | None = None
    """Probe cache; default `.ftalk-probe-cache.jsonl` in the metadata file's folder."""
    use_cache: bool = True
    hash_duplicates: bool = False
    """Also hash every video's bytes to find the same clip under two names (reads every byte)."""
    tokenizer: Path | None = None
    """Tokenizer folder for exact caption token counts; else the model folder's, else an approximation."""
    silence_db: float = -60.0
    """Audio whose RMS is below this (dBFS) is reported as silent."""
    audio_short_tolerance_s: float = 0.1
    """Audio may end this much before the video without an error."""
    audio_long_warning_s: float = 1.0
    """Audio lasting this much longer than the video is a warning."""
    thorough: bool = False
    """Decode the real last frame of every clip with decord (up to one GOP of decoding per clip)."""
    chunk_size: int = 8
    """Files per task sent to a worker."""
    top_n: int = 10
    """Worst entries kept for the summary."""


@dataclass(frozen=True)
class WorstEntry:
    index: int
    path: str
    errors: int
    warnings: int
    codes: tuple[str, ...]
    message: str


@dataclass
class ValidationReport:
    """What a validation found: counts per code, file-level findings, the worst entries, where outputs went."""

    metadata: Path
    entries: int = 0
    clean: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    file_findings: list[Finding] = field(default_factory=list)
    worst: list[WorstEntry] = field(default_factory=list)
    probed_files: int = 0
    cache_hits: int = 0
    json_path: Path | None = None
    clean_path: Path | None = None
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    def count(self, severity: str) -> int:
        return sum(n for code, n in self.codes.items() if code[0] == severity[0].upper())

    @property
    def errors(self) -> int:
        return self.count("error")

    @property
    def warnings(self) -> int:
        return self.count("warning")

    @property
    def ok(self) -> bool:
        return self.errors == 0

    def summary_dict(self) -> dict[str, Any]:
        return {
            "metadata": str(self.metadata),
            "entries": self.entries,
            "clean": self.clean,
            "errors": self.errors,
            "warnings": self.warnings,
            "infos": self.count("info"),
            "codes": dict(sorted(self.codes.items())),
            "probed_files": self.probed_files,
            "cache_hits": self.cache_hits,
            "elapsed_s": round(self.elapsed_s, 3),
            "notes": self.notes,
        }

    def summary(self) -> Any:
        """A rich renderable: counts per code, file-level findings, the worst entries, the outputs."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        style = {"E": "red", "W": "yellow", "I": "blue"}
        parts: list[Any] = []
        head = Text(f"{self.metadata}: {self.entries} entries, {self.clean} without errors; ")
        head.append(f"{self.errors} errors", style="bold red" if self.errors else "green")
        head.append(f", {self.warnings} warnings, {self.count('info')} notes ")
        head.append(f"({self.probed_files} files probed, {self.cache_hits} from cache, {self.elapsed_s:.1f} s)")
        parts.append(head)
        if self.codes:
            table = Table(title="findings per code", title_justify="left")
            for col in ("code", "name", "count", "fix"):
                table.add_column(col, overflow="fold")
            for code, n in sorted(self.codes.items()):
                table.add_row(Text(code, style=style[code[0]]), CODES[code][0], str(n), CODES[code][1])
            parts.append(table)
        for item in self.file_findings:
            parts.append(Text(str(item), style=style[item.code[0]]))
        if self.worst:
            table = Table(title="worst entries", title_justify="left")
            for col in ("entry", "file", "codes", "first problem"):
                table.add_column(col, overflow="fold")
            for w in self.worst:
                table.add_row(str(w.index), w.path, " ".join(w.codes), w.message)
            parts.append(table)
        for note in self.notes:
            parts.append(Text(note, style="dim"))
        if self.json_path:
            parts.append(Text(f"every finding: {self.json_path}"))
        if self.clean_path:
            parts.append(Text(f"clean metadata ({self.clean} entries, with probe facts): {self.clean_path}"))
        return Group(*parts)


# ---------------------------------------------------------------------------------------------- config rules


class BucketRules:
    """The config's frame and size rules, taken from `data/buckets.py` (which owns them), so that what this
    check calls too short or too small is exactly what `plan-buckets` drops."""

    def __init__(self, buckets: BucketConfig) -> None:
        self.buckets = buckets
        self.grid = level_grid(buckets)

    def findings(self, index: int, video: dict[str, Any], path: str) -> list[Finding]:
        """E405 (frame rate), E407 (too few frames), E408 (too small) or W406 (upscaled) for decoded facts."""
        fps = float(video.get("fps") or 0.0)
        if not (0 < fps <= MAX_FPS) or not math.isfinite(fps):
            return [finding("E405", f"frame rate is {fps:g}", index=index, path=path)]
        width, height, frames = int(video["width"]), int(video["height"]), int(video["num_frames"])
        grid, cfg = self.grid, self.buckets
        elig = eligibility(
            np.array([width]), np.array([height]), np.array([frames]), np.array([fps]), cfg, grid, cfg.max_upscale
        )
        reason, stride, ratio = int(elig.drop_reason[0]), int(elig.stride[0]), int(elig.ratio_index[0])
        mask = int(elig.size_mask[0])
        if reason == DROP_TOO_SHORT:
            fewest = min(grid.frames)
            needed = (fewest - 1) * stride + 1
            detail = f"{fewest} frames at stride {stride} (fps {fps:g} / stride <= {cfg.max_fps_after_stride:g})"
            return [finding("E407", f"{frames} frames, one sample needs {needed}: {detail}", index=index, path=path)]
        size = next((j for j in range(len(grid.sizes)) if mask >> j & 1), 0)
        bucket_h, bucket_w = int(grid.heights[ratio, size]), int(grid.widths[ratio, size])
        upscale = max(bucket_h / height, bucket_w / width)
        shown = f"{width}x{height} must be upscaled x{upscale:.2f} to cover its {bucket_w}x{bucket_h} bucket"
        if reason == DROP_TOO_SMALL:
            limit = f"above max_upscale {cfg.max_upscale:g}: plan-buckets drops it"
            return [finding("E408", f"{shown}, {limit}", index=index, path=path)]
        if upscale > 1.0:
            return [finding("W406", shown, index=index, path=path)]
        return []


# ---------------------------------------------------------------------------------------------- captions


# ---------------------------------------------------------------------------------------------- entry state


@dataclass(kw_only=True)
class _Pending(ProbeItem):
    """One entry on its way through the pipeline, with what the in-process checks found."""

    raw: Any
    entry: MetadataEntry | None
    findings: list[Finding]


# ---------------------------------------------------------------------------------------------- outputs


class _JsonReport:
    """The `--json` report, streamed: `{"metadata": ..., "entries": [...], "file_findings": [...], "summary": ...}`."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.out = AtomicFile(Path(path)).open()
        assert self.out.handle is not None
        self.handle: Any = self.out.handle
        body = json.dumps(head, ensure_ascii=False)
        self.handle.write(body[:-1] + ', "entries": [')
        self.count = 0

    def entry(self, record: dict[str, Any]) -> None:
        self.handle.write(("\n" if self.count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self, file_findings: list[Finding], summary: dict[str, Any]) -> None:
        tail = {"file_findings": [f.to_dict() for f in file_findings], "summary": summary}
        self.handle.write("\n], " + json.dumps(tail, ensure_ascii=False)[1:] + "\n")
        self.out.commit()

    def abort(self) -> None:
        self.out.abort()


class _Tally:
    """Counters and the top-N worst entries (a bounded heap)."""

    def __init__(self, report: ValidationReport, top_n: int) -> None:
        self.report = report
        self.top_n = top_n
        self.heap: list[tuple[int, int, int, WorstEntry]] = []

    def add(self, index: int | None, path: str, findings: list[Finding]) -> None:
        self.report.codes.update(f.code for f in findings)
        errors = sum(f.code[0] == "E" for f in findings)
        warnings = sum(f.code[0] == "W" for f in findings)
        if index is None or not (errors or warnings):
            return
        first = next(f for f in findings if f.code[0] in "EW")
        worst = WorstEntry(index, path, errors, warnings, tuple(sorted({f.code for f in findings})), first.message)
        key = (errors, warnings, -index, worst)
        if len(self.heap) < self.top_n:
            heapq.heappush(self.heap, key)
        elif key[:3] > self.heap[0][:3]:
            heapq.heapreplace(self.heap, key)

    def worst(self) -> list[WorstEntry]:
        return [item[3] for item in sorted(self.heap, key=lambda k: k[:3], reverse=True)]


# ---------------------------------------------------------------------------------------------- checks


def _path_checks(
    index: int, entry: MetadataEntry, media_root: Path | None, allow_outside: bool
) -> tuple[list[Finding], Path, Path]:
    """E301 for the video and the audio path of one entry (joined to `media_root`), and E302 when it lies
    outside that folder (absolute, `..`, or a symlink resolving out) unless `allow_outside`."""
    found: list[Finding] = []
    paths = []
    for what, written in (("video", entry.file_path), ("audio", entry.audio_path)):
        path = resolve_media_path(media_root, written)
        paths.append(path)
        shown = str(path)
        if media_root is not None and not allow_outside:
            why = outside_root(media_root, written)
            if why is not None:
                found.append(finding("E302", f"{what}: {why}", index=index, path=shown))
                continue
        if not path.is_file():
            state = "is not a file" if path.exists() else "does not exist"
            found.append(finding("E301", f"{what} file {shown} {state}", index=index, path=shown))
    return found, paths[0], paths[1]


def _audio_checks(
    index: int, audio: dict[str, Any], video_span: float | None, options: ValidateOptions, path: str
) -> list[Finding]:
    """W504/I505/I506 from the audio facts; E507/W508 against the video span (num_frames / fps) when known."""
    found: list[Finding] = []
    rate, channels, frames = int(audio["sample_rate"]), int(audio["channels"]), int(audio["frames"])
    rms = float(audio.get("rms", 0.0))
    level = 20 * math.log10(rms) if rms > 0 else -math.inf
    if level < options.silence_db:
        found.append(
            finding("W504", f"RMS {level:.1f} dBFS is below {options.silence_db:g} dBFS", index=index, path=path)
        )
    if rate != AUDIO_RATE:
        found.append(finding("I505", f"{rate} Hz, resampled to {AUDIO_RATE} Hz when loading", index=index, path=path))
    if channels > 1:
        found.append(finding("I506", f"{channels} channels, downmixed to mono when loading", index=index, path=path))
    if video_span is not None:
        duration = frames / rate
        offset = duration - video_span
        lengths = f"audio lasts {duration:.3f} s, the video {video_span:.3f} s"
        if offset < -options.audio_short_tolerance_s:
            found.append(finding("E507", f"{lengths}: it ends {-offset:.3f} s early", index=index, path=path))
        elif offset > options.audio_long_warning_s:
            found.append(finding("W508", f"{lengths}: {offset:.3f} s longer", index=index, path=path))
    return found


def _probe_findings(index: int, result: dict[str, Any] | None, path: str) -> list[Finding]:
    return [finding(code, message, index=index, path=path) for code, message in (result or {}).get("problems", [])]


# ---------------------------------------------------------------------------------------------- the run


def _check_outputs(metadata: Path, options: ValidateOptions) -> None:
    meta = os.path.realpath(metadata)
    for label, out in (("--json", options.json_path), ("--write-clean", options.clean_path)):
        if out is not None and os.path.realpath(out) == meta:
            raise ValidateUsageError(f"{label} {out} is the input metadata file, which is never modified; pick another")
    if (
        options.json_path
        and options.clean_path
        and os.path.realpath(options.json_path) == os.path.realpath(options.clean_path)
    ):
        raise ValidateUsageError("--json and --write-clean name the same file; pick two different paths")
    if options.workers < 0:
        raise ValidateUsageError(f"--workers must be 0 (one per core) or more, got {options.workers}")


def validate_metadata(
    data: DataConfig,
    buckets: BucketConfig,
    options: ValidateOptions | None = None,
    *,
    model_dir: Path | None = None,
    progress: Callable[[int, int | None], None] | None = None,
) -> ValidationReport:
    """Validate `data.train_data_meta` against `buckets`; write the optional outputs; return the report.

    Raises `ValidateUsageError` when it cannot run as asked. Problems of the metadata itself (even an
    unreadable file) are findings in the report, never exceptions. `progress(done, total)` is called
    after each entry (`total` is None when unknown). The metadata file is only read.
    """
    options = options or ValidateOptions()
    if data.train_data_meta is None:
        raise ValidateUsageError("no metadata file: pass --train_data_meta PATH or set data.train_data_meta")
    metadata = Path(data.train_data_meta)
    _check_outputs(metadata, options)
    try:
        counter = TokenCounter(options.tokenizer, model_dir)
    except TokenizerError as exc:
        raise ValidateUsageError(str(exc)) from exc
    run = _Run(metadata, data, buckets, options, counter, progress)
    return run.execute()


class _Run:
    """The state of one validation: outputs, counters, what was seen (for duplicates)."""

    def __init__(
        self,
        metadata: Path,
        data: DataConfig,
        buckets: BucketConfig,
        options: ValidateOptions,
        counter: TokenCounter,
        progress: Callable[[int, int | None], None] | None,
    ) -> None:
        self.started = time.perf_counter()
        self.metadata = metadata
        self.buckets = buckets
        self.rules = BucketRules(buckets)
        self.options = options
        self.counter = counter
        self.progress = progress
        self.report = ValidationReport(metadata=metadata)
        self.tally = _Tally(self.report, options.top_n)
        self.media_root = data.media_root()
        # Without --train_data_dir, relative paths are read against the metadata file's folder: a clean file
        # written into another folder keeps the paths as written, and the report says which folder to name.
        clean_dir = Path(os.path.abspath(options.clean_path)).parent if options.clean_path is not None else None
        moved = clean_dir is not None and clean_dir != Path(os.path.abspath(metadata)).parent
        self.clean_needs_data_dir = moved and data.train_data_dir is None
        self.data_dir = Path(data.train_data_dir) if data.train_data_dir is not None else None
        self.allow_outside = data.allow_outside_data_dir
        self.cache = ProbeCache(options.cache_path or default_cache_path(metadata)) if options.use_cache else None
        self.seen_paths: dict[str, int] = {}
        self.seen_hashes: dict[str, int] = {}
        self.total = count_entries(metadata)
        self.done = 0
        self.json_out: _JsonReport | None = None
        self.clean_out: EntryWriter | None = None

    def _open_outputs(self) -> None:
        """Open `--json` / `--write-clean` before any probe: a path that cannot be written is a usage error."""
        options = self.options
        for label, path in (("--json", options.json_path), ("--write-clean", options.clean_path)):
            if path is None:
                continue
            try:
                if label == "--json":
                    self.json_out = _JsonReport(path, self._head())
                else:
                    self.clean_out = EntryWriter(path).open()
            except OSError as exc:
                raise ValidateUsageError(
                    f"{label} {path} cannot be written ({exc.strerror or exc}): pick a path in a writable folder"
                ) from exc

    def execute(self) -> ValidationReport:
        report, options = self.report, self.options
        workers = options.workers or available_cores()
        fatal = False
        try:
            self._open_outputs()
            with ProbePipeline(workers, options.chunk_size, self.cache) as pipeline:
                try:
                    for index, raw in iter_raw_entries(self.metadata):
                        report.entries += 1
                        for ready in pipeline.add(*self._prepare(index, raw)):
                            self._finish(ready)
                except MetadataError as exc:
                    fatal = True
                    report.file_findings.append(exc.to_finding())
                for ready in pipeline.drain():
                    self._finish(ready)
                report.probed_files = pipeline.probed
        except BaseException:
            if self.json_out is not None:
                self.json_out.abort()
            if self.clean_out is not None:
                self.clean_out.abort()
            raise
        finally:
            if self.cache is not None:
                self.cache.close()
        self.tally.add(None, "", report.file_findings)
        report.worst = self.tally.worst()
        if self.cache is not None:
            report.cache_hits = self.cache.hits
            if self.cache.write_error:
                report.notes.append(self.cache.write_error)
        report.notes.append(f"caption tokens: {self.counter.description}")
        if self.clean_out is not None:
            if fatal:
                self.clean_out.abort()
                report.notes.append("--write-clean: nothing written, the metadata file itself is broken")
            else:
                self.clean_out.commit()
                report.clean_path = options.clean_path
                if self.clean_needs_data_dir:
                    report.notes.append(
                        f"{options.clean_path} keeps the paths as written, relative to {self.metadata.parent}: "
                        f"train from it with --train_data_dir {self.metadata.parent}"
                    )
        report.elapsed_s = time.perf_counter() - self.started
        if self.json_out is not None:
            self.json_out.close(report.file_findings, report.summary_dict())
            report.json_path = options.json_path
        return report

    def _head(self) -> dict[str, Any]:
        meta = self.metadata
        return {
            "metadata": str(meta),
            "metadata_sha256": metadata_hash(meta) if meta.is_file() and os.access(meta, os.R_OK) else None,
            "train_data_dir": str(self.data_dir) if self.data_dir else None,
            "buckets": self.buckets.model_dump(mode="json"),
            "text_tokens": self.counter.description,
        }

    def _prepare(self, index: int, raw: Any) -> tuple[_Pending, list[tuple[str, ProbeJob]]]:
        """Schema, path and caption checks of one entry; the probe jobs it still needs (cache misses)."""
        entry, findings = parse_entry(index, raw)
        item = _Pending(index=index, raw=raw, entry=entry, findings=findings)
        if entry is None:
            return item, []
        path_findings, item.video_path, item.audio_path = _path_checks(
            index, entry, self.media_root, self.allow_outside
        )
        findings.extend(path_findings)
        findings.extend(text_checks(index, entry.text, self.counter, str(item.video_path)))
        if any(f.code[0] == "E" for f in path_findings):
            return item, []
        real_video = os.path.realpath(item.video_path)
        first = self.seen_paths.setdefault(real_video, index)
        if first != index:
            findings.append(
                finding("E303", f"same video as entry {first} ({real_video})", index=index, path=real_video)
            )
            return item, []
        jobs = probe_jobs(item, self.cache, thorough=self.options.thorough, want_hash=self.options.hash_duplicates)
        return item, jobs

    def _finish(self, item: _Pending) -> None:
        """Config-dependent checks from the probe facts; stream the entry to the outputs; count it."""
        findings, index = item.findings, item.index
        shown = str(item.video_path) if item.video_path is not None else ""
        facts: dict[str, Any] = {}
        span: float | None = None
        if item.video is not None:
            findings.extend(_probe_findings(index, item.video, shown))
            if not any(code[0] == "E" for code, _ in item.video["problems"]):
                findings.extend(self.rules.findings(index, item.video, shown))
                facts.update({k: item.video[k] for k in ("width", "height", "num_frames", "fps")})
                fps = float(item.video["fps"])
                span = int(item.video["num_frames"]) / fps if 0 < fps <= MAX_FPS else None
                digest = item.video.get("sha256")
                first = self.seen_hashes.setdefault(digest, index) if digest else index
                if first != index:
                    findings.append(
                        finding("E304", f"same bytes as the video of entry {first}", index=index, path=shown)
                    )
        if item.audio is not None:
            audio_shown = str(item.audio_path)
            findings.extend(_probe_findings(index, item.audio, audio_shown))
            if not item.audio["problems"]:
                findings.extend(_audio_checks(index, item.audio, span, self.options, audio_shown))
                rate = int(item.audio["sample_rate"])
                facts.update(
                    audio_duration=item.audio["frames"] / rate, sample_rate=rate, channels=int(item.audio["channels"])
                )
        has_error = any(f.code[0] == "E" for f in findings)
        if self.json_out is not None:
            raw = item.raw if isinstance(item.raw, dict) else {}
            record = {
                "index": index,
                "file_path": raw.get("file_path"),
                "audio_path": raw.get("audio_path"),
                "ok": not has_error,
                "probe": facts or None,
                "findings": [f.to_dict() for f in findings],
            }
            self.json_out.entry(record)
        if not has_error and item.entry is not None and self.clean_out is not None:
            clean = item.entry.to_dict()
            clean[PROBE_KEY] = ProbeFacts(**facts).to_dict()
            self.clean_out.write(clean)
        self.report.clean += not has_error
        self.tally.add(index, shown or f"entry {index}", findings)
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
