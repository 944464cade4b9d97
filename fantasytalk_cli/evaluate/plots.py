"""Pictures of what training learned: ``metrics.png`` (each metric of ``metrics.jsonl`` against the step, its
confidence band, the ground-truth reference as a dashed line, and the training loss from the run's TensorBoard
log) and a sheet of sample strips, one row per checkpoint."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fantasytalk_cli.checkpoints.metrics import MetricRow
from fantasytalk_cli.fileio import write_bytes_atomic

PLOT_NAME = "metrics.png"
SHEET_NAME = "samples-sheet.png"
TRAINING_LOG = Path("logs") / "ftalk"
"""Where `ftalk train --report_to tensorboard` writes its scalars, under the run folder."""


def training_loss(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of the run's TensorBoard log, oldest first (empty without one)."""
    folder = Path(run_dir) / TRAINING_LOG
    if not folder.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    if "loss" not in events.Tags().get("scalars", []):
        return []
    latest: dict[int, float] = {}
    for event in events.Scalars("loss"):
        latest[int(event.step)] = float(event.value)  # a resumed run logs a step again: keep the last
    return sorted(latest.items())


def plot_metrics(run_dir: Path, rows: Sequence[MetricRow], out: Path | None = None) -> Path:
    """Write the metrics plot (atomically) and return its path (default ``run_dir/metrics.png``)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_metric: dict[str, list[MetricRow]] = defaultdict(list)
    for row in rows:
        by_metric[row.metric].append(row)
    loss = training_loss(run_dir)
    panels = [name for name in by_metric] + (["training loss"] if loss else [])
    if not panels:
        panels = ["(no metrics yet)"]
    cols = min(3, len(panels))
    rows_n = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, name in zip(axes.flat, panels, strict=False):
        if name == "training loss":
            steps, values = zip(*loss, strict=True)
            ax.plot(steps, values, color="0.4", linewidth=0.8)
        else:
            _metric_panel(ax, by_metric.get(name, []))
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    target = out or Path(run_dir) / PLOT_NAME
    write_bytes_atomic(target, buffer.getvalue())
    return target


def _metric_panel(ax: object, rows: list[MetricRow]) -> None:
    """One metric: each source's values against the step (band where an interval exists); references dashed."""
    for source, style in (("validation", "o-"), ("evaluate", "s-")):
        picked = sorted((r for r in rows if r.source == source), key=lambda r: r.step)
        latest = {r.step: r for r in picked}  # the newest evaluation of a step wins
        if not latest:
            continue
        steps = np.array(sorted(latest))
        values = np.array([latest[s].value for s in steps])
        ax.plot(steps, values, style, markersize=3, linewidth=1, label=source)  # type: ignore[attr-defined]
        if all(latest[s].low is not None for s in steps):
            low = np.array([latest[s].low for s in steps], dtype=float)
            high = np.array([latest[s].high for s in steps], dtype=float)
            ax.fill_between(steps, low, high, alpha=0.2)  # type: ignore[attr-defined]
    references = [r for r in rows if r.source == "reference"]
    if references:
        ax.axhline(references[-1].value, linestyle="--", color="k", linewidth=0.8, label="ground truth")  # type: ignore[attr-defined]
    if any(r.metric.endswith("gap") for r in rows):
        ax.axhline(0.0, color="r", linewidth=0.5)  # type: ignore[attr-defined]
    ax.legend(fontsize=7)  # type: ignore[attr-defined]


def sample_sheet(strips: Sequence[tuple[str, np.ndarray]], out: Path) -> Path:
    """Stack (label, strip image [H, W, 3] uint8) rows into one PNG, each row labelled (atomically)."""
    label_h = 14
    width = max(strip.shape[1] for _, strip in strips)
    height = sum(strip.shape[0] + label_h for _, strip in strips)
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    y = 0
    for label, strip in strips:
        draw.text((2, y + 1), label, fill=(0, 0, 0))
        sheet.paste(Image.fromarray(strip), (0, y + label_h))
        y += strip.shape[0] + label_h
    import io

    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    return out
