"""What a training run carries: the counters a checkpoint restores (`RunState`), and what the run reports
when it ends (`TrainSummary`, rendered by `render_summary`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from fantasytalk_cli.data.sampler import BucketBatchSampler


@dataclass
class RunState:
    """Counters that checkpoints carry besides model and optimizer (`run_state.json`: plain JSON)."""

    sampler: BucketBatchSampler
    step: int = 0
    micro_step: int = 0
    epoch: int = 0
    consumed: int = 0
    """Batches of the current epoch trained on (the loader may have prefetched more)."""
    nonfinite_skipped: int = 0
    outliers: int = 0
    failed_entries: set[int] = field(default_factory=set)
    """Metadata entries that failed to load, the same set on every rank (one entry counts once)."""

    COUNTERS = ("step", "micro_step", "epoch", "consumed", "nonfinite_skipped", "outliers")

    def state_dict(self) -> dict[str, Any]:
        return {
            "counters": {k: getattr(self, k) for k in self.COUNTERS},
            "failed_entries": sorted(self.failed_entries),
            "sampler": self.sampler.state_dict(consumed=self.consumed),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in self.COUNTERS:
            setattr(self, key, int(state["counters"][key]))
        self.failed_entries = set(state.get("failed_entries", ()))
        self.sampler.load_state_dict(state["sampler"])


@dataclass
class TrainSummary:
    """What happened in a run (the end-of-run table, and what the demo and tests read)."""

    output_dir: Path
    steps: int
    epochs_started: int
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    stopped_by: str | None = None
    nonfinite_skipped: int = 0
    failed_entries: list[int] = field(default_factory=list)
    outliers: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    cache_misses: dict[str, int] | None = None
    """Feature-cache entries computed online because the cache lacked them (None: no cache)."""
    samples: list[Path] = field(default_factory=list)
    """Validation videos written (`output_dir/samples/step-N/`)."""
    main: bool = True
    """Whether this process is the main one (only it prints the summary)."""


def _entries(indices: list[int]) -> str:
    """`0` or `2: entries 3, 17` (the first few)."""
    if not indices:
        return "0"
    more = ", ..." if len(indices) > 5 else ""
    return f"{len(indices)}: entries {', '.join(map(str, indices[:5]))}{more}"


def _cache_row(misses: dict[str, int] | None) -> list[tuple[str, str]]:
    if misses is None:
        return []
    shown = ", ".join(f"{kind} {count}" for kind, count in sorted(misses.items()) if count) or "none"
    return [("cache misses, computed online", shown)]


def render_summary(summary: TrainSummary) -> Table:
    """The end-of-run table."""
    table = Table(title="training summary", show_header=False)
    first = f"{summary.losses[0]:.4f}" if summary.losses else "-"
    last = f"{summary.losses[-1]:.4f}" if summary.losses else "-"
    rows = [
        ("run folder", str(summary.output_dir)),
        ("optimizer steps", str(summary.steps)),
        ("loss first -> last", f"{first} -> {last}"),
        ("checkpoints", ", ".join(p.name for p in summary.checkpoints) or "-"),
        (
            "validation videos",
            f"{len(summary.samples)} in {summary.samples[-1].parent.parent}" if summary.samples else "-",
        ),
        ("stopped by", summary.stopped_by or "-"),
        *_cache_row(summary.cache_misses),
        ("non-finite steps skipped", str(summary.nonfinite_skipped)),
        ("clips skipped (failed to load)", _entries(summary.failed_entries)),
        ("loss elements over the outlier guard", str(summary.outliers)),
        ("wall time", f"{summary.seconds:.1f} s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table
