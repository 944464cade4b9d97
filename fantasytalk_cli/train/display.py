"""How a run shows its progress: a live bar in a terminal, plain log lines in a file, and the numbers behind
them (`Meter`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column

if TYPE_CHECKING:
    from fantasytalk_cli.train.setup import Run


@dataclass
class Meter:
    """Where the time goes and what the run has seen since it (re)started."""

    first_step: int
    t_start: float = field(default_factory=time.perf_counter)
    wait_s: float = 0.0
    compute_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    nonfinite_streak: int = 0


class Display:
    """A live progress bar in a terminal; in a file (a job log, `> train.log`, SLURM) one plain line at the
    first step, every `logging_steps` and the last, so the log says how the run went without terminal codes."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.plain = not run.console.is_terminal
        # On a narrow terminal the numbers are cut at their end, never the step count or the time left.
        info = TextColumn("{task.fields[info]}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis"))
        count = MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=2 * len(str(run.max_steps)) + 1))
        left = TimeRemainingColumn(table_column=Column(no_wrap=True, min_width=7))
        label = TextColumn("[bold]step", table_column=Column(no_wrap=True, min_width=4))
        columns = (label, count, BarColumn(bar_width=10), left, info)
        self.progress = Progress(*columns, console=run.console, disable=not run.main or self.plain)
        self.task = self.progress.add_task("train", total=run.max_steps, completed=run.state.step, info="")

    def __enter__(self) -> Display:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def show(self, step: int, logs: dict[str, float], meter: Meter) -> None:
        info = (
            f"loss {logs['loss']:.4f}  lr {logs['lr']:.2e}  {logs['samples_per_s']:.2f} samples/s  "
            f"{logs['tokens_per_s']:.0f} tok/s  data wait {logs['data_wait_share']:.0%}"
        )
        short = (
            f"loss {logs['loss']:.4f} lr {logs['lr']:.1e} {logs['samples_per_s']:.2f} smp/s "
            f"{logs['tokens_per_s']:.0f} tok/s wait {logs['data_wait_share']:.0%}"
        )
        self.progress.update(self.task, completed=step, info=short)
        done, total = step - meter.first_step, self.run.max_steps
        if self.plain and (done == 1 or step % self.run.train.logging_steps == 0 or step == total):
            eta = (time.perf_counter() - meter.t_start) / done * (total - step)
            self.run.say(f"step {step}/{total}  {info}  eta {_duration(eta)}", highlight=False)


def _duration(seconds: float) -> str:
    """`1:02:03` / `2:03` for an ETA."""
    minutes, secs = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
