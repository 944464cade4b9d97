"""`ftalk prepare`'s command line (registered on the app in `cli.py`): its options, one call of
`prepare.dataset.prepare_dataset`, the report as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from fantasytalk_cli.errors import FtalkUsageError


def prepare_command(
    src: Annotated[
        Path,
        typer.Argument(metavar="SRC", help="A folder of videos (searched recursively), or a .txt / .jsonl list."),
    ],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Dataset folder to write (a rerun resumes it).")],
    min_face_fraction: Annotated[
        float, typer.Option("--min_face_fraction", min=0.0, max=1.0, help="Least face height / frame height.")
    ] = 0.15,
    min_speech_ratio: Annotated[
        float, typer.Option("--min_speech_ratio", min=0.0, max=1.0, help="Least share of a clip that is speech.")
    ] = 0.6,
    min_seconds: Annotated[
        float, typer.Option("--min_seconds", min=0.1, help="Shortest clip (3.5 s: the seed's 81 frames at 23 fps).")
    ] = 3.5,
    max_seconds: Annotated[float, typer.Option("--max_seconds", min=0.1, help="Longest clip.")] = 10.0,
    aspect: Annotated[
        str, typer.Option(help="Crop around the face: 1:1, 9:16, 16:9, or keep (the whole frame).")
    ] = "1:1",
    size: Annotated[int, typer.Option(min=16, help="Short side of each clip in pixels.")] = 512,
    fps: Annotated[
        Optional[float],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="Frame rate of the clips (default: the source's)."),
    ] = None,
    caption: Annotated[
        Optional[str],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="Caption of every clip without a sidecar NAME.txt (default: 'A person is talking.')."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Processes working on sources in parallel.")] = 1,
) -> None:
    """Turn raw talking videos into a training set: clips cut at scene changes with one speaking face, cropped
    around it, 16 kHz mono wavs, face/mouth tracks, OUT/metadata_control.json with probe facts, a report and a
    contact sheet. Under torchrun / accelerate launch each rank takes its share of the sources."""
    from fantasytalk_cli.cli import console
    from fantasytalk_cli.prepare.crop import ASPECTS
    from fantasytalk_cli.prepare.dataset import prepare_dataset
    from fantasytalk_cli.prepare.pipeline import PrepareOptions

    if aspect not in ASPECTS:
        raise FtalkUsageError(f"--aspect {aspect!r}: choose {', '.join(ASPECTS)}")
    if min_seconds > max_seconds:
        raise FtalkUsageError(f"--min_seconds {min_seconds:g} is longer than --max_seconds {max_seconds:g}")
    options = PrepareOptions(
        min_face_fraction=min_face_fraction,
        min_speech_ratio=min_speech_ratio,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        aspect=aspect,  # type: ignore[arg-type]
        size=size,
        fps=fps,
        caption=caption,
    )
    report = prepare_dataset(src, out, options, workers=workers, say=lambda line: console.print(line, highlight=False))
    table = Table(title=f"ftalk prepare: {out}", show_header=False)
    for name, value in report.rows():
        table.add_row(name, value)
    console.print(table)
    for name in report.files:
        console.print(f"wrote {out / name}", highlight=False)
    if not report.merged:
        console.print("this rank is done; the rank that finishes last writes the metadata", highlight=False)
