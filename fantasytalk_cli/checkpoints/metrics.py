"""The run folder's evaluation record: ``metrics.jsonl`` (one line per checkpoint and metric, appended by
`ftalk evaluate` and by `--validation_metrics` during training) and ``best``, which names the best checkpoint so
far by one metric (read like ``latest``: `ftalk sample --adapter RUN --checkpoint best`).

Both are rewritten whole and atomically, under a lock of their own, so an evaluation beside a running training
never leaves a torn line and two evaluations do not lose each other's lines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fantasytalk_cli.checkpoints.folder import BEST_NAME
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.fileio import write_text_atomic
from fantasytalk_cli.locks import beside, hold

METRICS_NAME = "metrics.jsonl"
Selection = Literal["audio_gap", "lse_c", "lse_d"]
HIGHER_IS_BETTER: dict[str, bool] = {"audio_gap": True, "lse_c": True, "lse_d": False}
"""What `--select` may rank by, and which way: a larger mismatch gap and confidence, a smaller distance."""


class RecordError(FtalkUsageError):
    """The run's metrics file cannot be read or a selection cannot be made (the message says why)."""


@dataclass(frozen=True)
class MetricRow:
    """One metric of one checkpoint (``checkpoint`` None for live weights scored during training)."""

    step: int
    metric: str
    value: float
    low: float | None = None
    high: float | None = None
    n: int | None = None
    checkpoint: str | None = None
    source: str = "evaluate"
    """`evaluate` (`ftalk evaluate`), `validation` (during training) or `reference` (ground-truth clips)."""

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def read_rows(run_dir: Path) -> list[MetricRow]:
    """Every line of ``run_dir/metrics.jsonl`` (none when there is no file); a bad line is refused, named."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            rows.append(MetricRow(**data))
        except (ValueError, TypeError) as exc:
            raise RecordError(f"{path}:{number}: not a metrics line ({exc}); remove or fix the line") from exc
    return rows


def append_rows(run_dir: Path, rows: Sequence[MetricRow]) -> Path:
    """Add ``rows`` to ``run_dir/metrics.jsonl`` (the file rewritten whole, atomically, under its lock)."""
    path = Path(run_dir) / METRICS_NAME
    fix = "wait for the other evaluation of this run to finish"
    with hold(beside(path), f"the metrics file {path}", fix):
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old and not old.endswith("\n"):
            old += "\n"
        write_text_atomic(path, old + "".join(json.dumps(r.to_json()) + "\n" for r in rows))
    return path


def best_checkpoint(rows: Sequence[MetricRow], select: Selection) -> MetricRow | None:
    """The checkpoint row with the best ``select`` value (ties: the earlier step); None when no row has one."""
    if select not in HIGHER_IS_BETTER:
        raise RecordError(f"--select {select}: choose one of {', '.join(HIGHER_IS_BETTER)}")
    scored = [r for r in rows if r.metric == select and r.checkpoint is not None and r.source != "reference"]
    if not scored:
        return None
    sign = -1.0 if HIGHER_IS_BETTER[select] else 1.0
    return min(scored, key=lambda r: (sign * r.value, r.step))


def write_best(run_dir: Path, select: Selection) -> MetricRow | None:
    """Write ``run_dir/best`` naming the best checkpoint so far by ``select`` (atomically); returns its row."""
    best = best_checkpoint(read_rows(run_dir), select)
    if best is not None:
        assert best.checkpoint is not None
        write_text_atomic(Path(run_dir) / BEST_NAME, f"{Path(best.checkpoint).name}\n")
    return best
