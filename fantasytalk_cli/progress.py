"""The progress bar the commands draw while a library function works, and its tasks as the `progress` callbacks
those functions take. Only the command line renders one."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["progress_bar", "track"]


def progress_bar(console: Console, text: str, *, transient: bool = False, disable: bool = False) -> Progress:
    """A bar on `console`: `text` (a rich format; "{task.description}" names each task), the bar, done of total, time
    left."""
    columns = (TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    return Progress(*columns, console=console, transient=transient, disable=disable)


def track(bar: Progress, name: str, total: int | None = None) -> Callable[..., None]:
    """A new task of `bar` as a library's callback: `advance(done, total=None)` (a total of None keeps the last)."""
    task = bar.add_task(name, total=total)
    return lambda done, total=None: bar.update(task, completed=done, total=total)
