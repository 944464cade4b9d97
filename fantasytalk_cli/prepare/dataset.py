"""The whole of `ftalk prepare`: the sources shared among processes (`--workers`) and ranks (RANK / WORLD_SIZE
under torchrun, accelerate launch or a SLURM array, as `ftalk cache` shares its entries), each source done once
(`pipeline.prepare_source`), then the metadata, the report and the contact sheet, written by whichever rank
finds every source finished (the same bytes from any of them, each write atomic)."""

from __future__ import annotations

import io
import json
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from fantasytalk_cli.data.synthetic import METADATA_NAME
from fantasytalk_cli.fileio import write_bytes_atomic, write_text_atomic
from fantasytalk_cli.prepare.pipeline import PrepareOptions, SourceResult, prepare_source, read_marker
from fantasytalk_cli.prepare.sources import Source, find_sources
from fantasytalk_cli.runtime.world import World

REPORT_NAME = "prepare_report.json"
SHEET_NAME = "contact_sheet.png"


@dataclass
class PrepareReport:
    """What `prepare_dataset` did: sources, clips, hours kept and dropped by reason; the files it wrote."""

    out: Path
    sources: int
    clips: int
    kept_hours: float
    dropped_hours: dict[str, float]
    dropped_sources: dict[str, int]
    merged: bool
    """Whether this process wrote the metadata (every source is finished)."""
    broken: dict[str, str] = field(default_factory=dict)
    """Sources that failed part-way -> the error (dropped, not retried)."""
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "format": "ftalk-prepare-report",
            "sources": self.sources,
            "clips": self.clips,
            "kept_hours": self.kept_hours,
            "dropped_hours": self.dropped_hours,
            "dropped_sources": self.dropped_sources,
            "broken": self.broken,
        }

    def rows(self) -> list[tuple[str, str]]:
        """The table: kept, then each drop reason, in hours and seconds."""
        rows = [("kept", _hours(self.kept_hours) + f" in {self.clips} clips from {self.sources} sources")]
        rows += [(f"dropped: {reason}", _hours(hours)) for reason, hours in sorted(self.dropped_hours.items())]
        rows += [(f"sources dropped: {reason}", str(count)) for reason, count in sorted(self.dropped_sources.items())]
        return rows


def _hours(hours: float) -> str:
    return f"{hours:.4f} h ({hours * 3600:.1f} s)"


def prepare_dataset(
    src: Path,
    out: Path,
    options: PrepareOptions,
    *,
    workers: int = 1,
    world: World | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> PrepareReport:
    """Prepare every source of ``src`` into ``out`` (see the module docstring)."""
    out = Path(out)
    sources = find_sources(src, out)
    world = world or World.from_env()
    for folder in ("clips", "wav", "tracks", ".prepare"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    mine = [s for i, s in enumerate(sources) if i % world.dp_size == world.dp_rank]
    todo = [s for s in mine if read_marker(out, s) is None]
    say(f"prepare: {len(sources)} sources, {len(mine)} for this process, {len(mine) - len(todo)} already done")
    if workers > 1 and len(todo) > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for result in pool.imap(_prepare_one, [(s, out, options) for s in todo]):
                say(f"prepare: {result.source}: {len(result.entries)} clips")
    else:
        for source in todo:
            result = prepare_source(source, out, options)
            say(f"prepare: {result.source}: {len(result.entries)} clips")
    results = [read_marker(out, s) for s in sources]
    if any(r is None for r in results):
        waiting = sum(r is None for r in results)
        return _report(out, [r for r in results if r is not None], len(sources), merged=False, waiting=waiting)
    return _merge(out, sources, [r for r in results if r is not None])


def _prepare_one(job: tuple[Source, Path, PrepareOptions]) -> SourceResult:
    return prepare_source(*job)


def _merge(out: Path, sources: list[Source], results: list[SourceResult]) -> PrepareReport:
    entries = [entry for result in results for entry in result.entries]
    write_text_atomic(out / METADATA_NAME, json.dumps(entries, indent=2) + "\n")
    report = _report(out, results, len(sources), merged=True, waiting=0)
    write_text_atomic(out / REPORT_NAME, json.dumps(report.to_json(), indent=1) + "\n")
    sheet = contact_sheet(out, [f for r in results for f in r.first_frames])
    if sheet is not None:
        write_bytes_atomic(out / SHEET_NAME, sheet)
        report.files.append(SHEET_NAME)
    report.files[:0] = [METADATA_NAME, REPORT_NAME]
    return report


def _report(out: Path, results: list[SourceResult], sources: int, *, merged: bool, waiting: int) -> PrepareReport:
    dropped: dict[str, float] = {}
    whole: dict[str, int] = {}
    for result in results:
        for reason, seconds in result.dropped.items():
            if seconds > 0:
                dropped[reason] = dropped.get(reason, 0.0) + seconds / 3600
        if result.source_dropped:
            whole[result.source_dropped] = whole.get(result.source_dropped, 0) + 1
    if waiting:
        whole["not finished yet (another rank)"] = waiting
    return PrepareReport(
        out=out,
        sources=sources,
        clips=sum(len(r.entries) for r in results),
        kept_hours=sum(r.kept_seconds for r in results) / 3600,
        dropped_hours={k: round(v, 6) for k, v in sorted(dropped.items())},
        dropped_sources=whole,
        merged=merged,
        broken={r.source: r.error for r in results if r.error},
    )


def contact_sheet(out: Path, clips: list[tuple[str, list[float]]], columns: int = 6, cell: int = 160) -> bytes | None:
    """A PNG of each kept clip's first frame with its face box (green) and mouth region (red), ``cell`` pixels
    wide each."""
    if not clips:
        return None
    import av

    columns = min(columns, len(clips))
    rows = (len(clips) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell, rows * cell), (32, 32, 32))
    for k, (name, box) in enumerate(clips):
        with av.open(str(out / name)) as container:
            frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
        image = Image.fromarray(frame)
        scale = cell / max(image.size)
        thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        draw = ImageDraw.Draw(thumb)
        draw.rectangle([v * scale for v in box[:4]], outline=(0, 255, 0), width=2)
        if len(box) == 8:
            draw.rectangle([v * scale for v in box[4:]], outline=(255, 60, 60), width=1)
        sheet.paste(thumb, ((k % columns) * cell, (k // columns) * cell))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()
