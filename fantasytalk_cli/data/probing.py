"""Probing many entries at once: the parallel, cached pipeline that `validate-metadata`, `plan-buckets` and
`train` share, and the probe facts of entries whose metadata carries none (the seed's raw
`metadata_control.json`).

Every probe result goes through one `ProbeCache` keyed by file identity (`.ftalk-probe-cache.jsonl` beside
the metadata by default), so whichever command meets a clip first probes it and the others read it back.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fantasytalk_cli.data.metadata import resolve_media_path
from fantasytalk_cli.data.probe import ProbeCache, ProbeJob, file_signature, probe_chunk
from fantasytalk_cli.data.probe_facts import ProbeFacts

CACHE_NAME = ".ftalk-probe-cache.jsonl"


def default_cache_path(metadata: Path) -> Path:
    """`.ftalk-probe-cache.jsonl` in the metadata file's folder: shared by the metadata files there, so
    validating the `--write-clean` output written beside the input probes nothing again."""
    return Path(metadata).parent / CACHE_NAME


def available_cores() -> int:
    """CPU cores this process may use (the affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class ProbeItem:
    """One entry on its way through the pipeline: its two files, their cache keys and probe results."""

    index: int
    video_path: Path | None = None
    audio_path: Path | None = None
    video_sig: tuple[str, int, int] | None = None
    audio_sig: tuple[str, int, int] | None = None
    video: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    waiting: int = 0


def probe_jobs(
    item: ProbeItem, cache: ProbeCache | None, *, thorough: bool = False, want_hash: bool = False
) -> list[tuple[str, ProbeJob]]:
    """Fill `item`'s results from `cache`; the probe jobs of what the cache lacks (the item's paths set)."""
    jobs: list[tuple[str, ProbeJob]] = []
    for kind, path in (("video", item.video_path), ("audio", item.audio_path)):
        assert path is not None
        try:
            sig: tuple[str, int, int] | None = file_signature(path)
        except OSError:
            sig = None
        setattr(item, f"{kind}_sig", sig)
        need_hash = kind == "video" and want_hash
        need_thorough = kind == "video" and thorough
        cached = None
        if cache is not None and sig is not None:
            cached = cache.get(kind, sig, need_hash, need_thorough)  # type: ignore[arg-type]
        if cached is not None:
            setattr(item, kind, cached)
        else:
            job = ProbeJob(kind, str(path), thorough=thorough, want_hash=need_hash)  # type: ignore[arg-type]
            jobs.append((kind, job))
    return jobs


class ProbePipeline:
    """Probes entries in chunks (worker processes, or inline with one worker), hands them back in input order.

    At most `2 * workers` chunks are in flight, so memory does not grow with the file. Results are taken
    from the cache where it has them and written to it where it did not.
    """

    def __init__(self, workers: int, chunk_size: int, cache: ProbeCache | None) -> None:
        self.workers = workers
        self.chunk_size = max(1, chunk_size)
        self.cache = cache
        self.pending: deque[ProbeItem] = deque()
        self.batch: list[tuple[ProbeItem, str, ProbeJob]] = []
        self.inflight: deque[tuple[Future[list[dict[str, Any]]], list[tuple[ProbeItem, str, ProbeJob]]]] = deque()
        self.pool: ProcessPoolExecutor | None = None
        self.probed = 0

    def __enter__(self) -> ProbePipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def add(self, item: ProbeItem, jobs: list[tuple[str, ProbeJob]]) -> Iterator[ProbeItem]:
        self.pending.append(item)
        for slot, job in jobs:
            item.waiting += 1
            self.batch.append((item, slot, job))
        if len(self.batch) >= self.chunk_size or len(self.pending) > 64 * self.chunk_size:
            self._submit()
        while len(self.inflight) > 2 * max(1, self.workers):
            self._collect(self.inflight.popleft())
        while self.inflight and self.inflight[0][0].done():
            self._collect(self.inflight.popleft())
        yield from self._ready()

    def drain(self) -> Iterator[ProbeItem]:
        self._submit()
        while self.inflight:
            self._collect(self.inflight.popleft())
        yield from self._ready()

    def _submit(self) -> None:
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        jobs = [job for _, _, job in batch]
        if self.workers <= 1:
            future: Future[list[dict[str, Any]]] = Future()
            future.set_result(probe_chunk(jobs))
        else:
            if self.pool is None:
                import multiprocessing

                method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
                self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method))
            future = self.pool.submit(probe_chunk, jobs)
        self.inflight.append((future, batch))

    def _collect(self, done: tuple[Future[list[dict[str, Any]]], list[tuple[ProbeItem, str, ProbeJob]]]) -> None:
        future, batch = done
        results = future.result()
        for (item, slot, _job), result in zip(batch, results, strict=True):
            setattr(item, slot, result)
            sig = item.video_sig if slot == "video" else item.audio_sig
            if self.cache is not None and sig is not None:
                self.cache.put(slot, sig, result)  # type: ignore[arg-type]
            item.waiting -= 1
            self.probed += 1

    def _ready(self) -> Iterator[ProbeItem]:
        while self.pending and self.pending[0].waiting == 0:
            yield self.pending.popleft()


def _has_error(result: dict[str, Any] | None) -> bool:
    return result is None or any(str(code).startswith("E") for code, _ in result.get("problems", []))


def facts_from_results(video: dict[str, Any] | None, audio: dict[str, Any] | None) -> ProbeFacts | None:
    """The `ProbeFacts` of a video + audio probe, or None when either could not be decoded."""
    if _has_error(video) or _has_error(audio):
        return None
    assert video is not None and audio is not None
    try:
        rate = int(audio["sample_rate"])
        return ProbeFacts(
            width=int(video["width"]),
            height=int(video["height"]),
            num_frames=int(video["num_frames"]),
            fps=float(video["fps"]),
            audio_duration=audio["frames"] / rate,
            sample_rate=rate,
            channels=int(audio["channels"]),
        )
    except (KeyError, ZeroDivisionError, TypeError, ValueError):
        return None


@dataclass
class FilledFacts:
    """Probe facts found for entries that carried none: by entry index (None = the files cannot be read)."""

    facts: dict[int, ProbeFacts | None] = field(default_factory=dict)
    probed_files: int = 0
    """Files opened (the rest came from the cache)."""
    cache_path: Path | None = None
    cache_note: str | None = None
    """Why the cache could not be written, when it could not."""

    @property
    def unreadable(self) -> list[int]:
        return [index for index, facts in self.facts.items() if facts is None]

    def note(self) -> str:
        """One line for the run's log: how many entries, probed or cached, where the cache is."""
        count, bad = len(self.facts), len(self.unreadable)
        where = f"probe cache {self.cache_path}" if self.cache_path is not None else "no probe cache"
        text = (
            f"{count} entries carry no probe facts: {self.probed_files} files probed ({where}: the next run "
            "probes nothing)"
            if self.probed_files
            else f"{count} entries carry no probe facts: all read from the {where} (nothing probed)"
        )
        if bad:
            shown = ", ".join(map(str, self.unreadable[:5])) + (", ..." if bad > 5 else "")
            text += f"; {bad} cannot be read and are left out (entries {shown}: `ftalk validate-metadata` says why)"
        if self.cache_note:
            text += f"; {self.cache_note}"
        return text


def cached_facts(
    missing: Sequence[tuple[int, str, str]], media_root: Path | None, cache_path: Path
) -> dict[int, ProbeFacts | None]:
    """Facts of the `(index, file_path, audio_path)` entries the probe cache at `cache_path` holds for the files as
    they are now, reading it only (nothing probed, nothing written: safe from several processes at once); an
    entry it lacks is left out."""
    cache = ProbeCache(cache_path)
    found: dict[int, ProbeFacts | None] = {}
    for index, video, audio in missing:
        item = ProbeItem(index, resolve_media_path(media_root, video), resolve_media_path(media_root, audio))
        if not probe_jobs(item, cache):
            found[index] = facts_from_results(item.video, item.audio)
    return found


def probe_missing_facts(
    missing: Sequence[tuple[int, str, str]],
    media_root: Path | None,
    cache_path: Path | None,
    *,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> FilledFacts:
    """Facts of `(index, file_path, audio_path)` entries: from the probe cache at `cache_path` where it has
    them, else probed (in `workers` processes, 0 = one per core) and written to the cache. Relative paths
    are joined to `media_root`."""
    cache = ProbeCache(cache_path) if cache_path is not None else None
    filled = FilledFacts(cache_path=cache_path)
    workers = workers or available_cores()
    try:
        with ProbePipeline(min(workers, max(1, len(missing) // 4)), 4, cache) as pipeline:
            for index, video, audio in missing:
                paths = resolve_media_path(media_root, video), resolve_media_path(media_root, audio)
                item = ProbeItem(index, video_path=paths[0], audio_path=paths[1])
                for ready in pipeline.add(item, probe_jobs(item, cache)):
                    filled.facts[ready.index] = facts_from_results(ready.video, ready.audio)
                    if progress is not None:
                        progress(len(filled.facts), len(missing))
            for ready in pipeline.drain():
                filled.facts[ready.index] = facts_from_results(ready.video, ready.audio)
                if progress is not None:
                    progress(len(filled.facts), len(missing))
            filled.probed_files = pipeline.probed
    finally:
        if cache is not None:
            cache.close()
            filled.cache_note = cache.write_error
    return filled
