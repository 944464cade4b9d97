"""The plan report as rich renderables: the bucket table, the summary, the memory estimate."""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Group
from rich.table import Table
from rich.text import Text

from fantasytalk_cli.planning.fit import MemoryOptions
from fantasytalk_cli.planning.memory import GB, MemoryEstimate
from fantasytalk_cli.planning.report import PlanReport


def render_plan_report(report: PlanReport) -> Any:
    """The report as rich renderables (a table per bucket, the summary, the memory estimate)."""

    st = report.stats
    left_word = "carried" if st.leftover_policy == "carry" else "dropped"
    table = Table(
        title="Buckets (epoch 0)",
        title_justify="left",
        caption=(
            "F frames, T latent frames, tokens per sample, batches per rank; short/small: clips dropped as too "
            f"short / too small (shown at their ratio's full size); left: leftover, {left_word}; "
            "crop: pixels cropped away; GB: estimated peak per GPU (! = at risk); fits with: the cheapest memory "
            "options that fit the GPU size given (--base_weights_dtype fp8, --activation_offload)"
        ),
        caption_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    columns = ["HxW", "F", "T", "tokens", "samples", "batches", "short", "small", "left", "crop", "GB"]
    if report.fits_with:
        columns.append("fits with")
    for name in columns:
        table.add_column(name, justify="right", no_wrap=True)
    for row in st.rows:
        est = report.bucket_memory.get(row.bucket)
        mem = "" if est is None else f"{est.total_gb:.1f}" + ("[bold red]![/]" if est.at_risk else "")
        table.add_row(
            f"{row.height}x{row.width}",
            f"<={row.frames}" if st.random_frame_crop else str(row.frames),
            str(row.latent_frames),
            f"{row.tokens:,}",
            f"{row.samples:,}",
            f"{row.batches_per_rank:,}",
            f"{row.too_short:,}" if row.too_short else "",
            f"{row.too_small:,}" if row.too_small else "",
            f"{row.leftover:,}" if row.leftover else "",
            "" if not row.samples or not math.isfinite(row.crop_waste) else f"{row.crop_waste:.0%}",
            mem,
            *([_fit(report.fits_with, row.bucket)] if report.fits_with else []),
        )
    gb = st.train_batch_size * st.world_size
    leftover_what = "carried to the next epoch" if st.leftover_policy == "carry" else "dropped this epoch"
    dropped = ", ".join(f"{n:,} {name}" for name, n in st.dropped.items() if n) or "none"
    lines = [
        f"entries {st.num_entries:,}; trained this epoch {st.trained_samples:,}; dropped {dropped}; "
        f"leftover {st.leftover:,} ({leftover_what}).",
        f"world size {st.world_size}, batch {st.train_batch_size} per rank (global {gb}), gradient accumulation "
        f"{st.gradient_accumulation_steps}: {st.batches_per_rank:,} batches per rank, {st.steps_per_epoch:,} "
        "optimizer steps per epoch.",
        f"tokens per optimizer step: mean {st.tokens_per_step_mean:,.0f}, max {st.tokens_per_step_max:,}; "
        f"token budget per sample {st.budget_tokens:,} (used {st.budget_use:.0%} on average).",
        f"padding 0% (batches are bucket-homogeneous); crop waste {st.crop_waste:.1%} of resized pixels; "
        f"not trained this epoch {(st.num_entries - st.trained_samples) / max(st.num_entries, 1):.1%} of entries.",
    ]
    if st.random_sizes:
        lines.append(
            f"random_hw_adapt: each clip draws one of its allowed sizes {list(report.plan.grid.sizes)} per "
            "(seed, epoch); the table shows epoch 0, train draws the same."
        )
    if st.random_frame_crop:
        lines.append(
            "random_frame_crop: each batch draws a 4k+1 frame count (shown as a range) per (seed, epoch, batch)."
        )
    parts: list[Any] = [table, Text("\n".join(lines))]
    if report.memory is not None:
        parts.append(_memory_table(report.memory))
        if report.memory.capacity_bytes is None:
            parts.append(Text("pass --gpu-memory GB to flag buckets at risk of running out of memory"))
        elif report.at_risk:
            parts.append(
                Text(
                    f"{len(report.at_risk)} bucket(s) exceed 90% of the GPU memory: use gradient_checkpointing, "
                    "low_vram, zero3/fsdp, more GPUs or a smaller video_sample_size / token_sample_size",
                    style="bold red",
                )
            )
    parts.extend(Text(n, style="yellow") for n in report.notes)
    parts.extend(Text(w, style="green") for w in report.written)
    return Group(*parts)


def _memory_table(est: MemoryEstimate) -> Any:
    """The memory estimate of one bucket as a table of its terms (name, GB, formula)."""

    h, w, f = est.shape
    unit = "GPU" if est.device == "cuda" else "process"
    table = Table(
        title=(
            f"Peak memory per {unit}, largest bucket {h}x{w}x{f} x batch {est.batch_size} "
            f"({est.tokens:,} tokens/sample), {est.strategy} on {est.devices} {unit}{'s' if est.devices != 1 else ''}"
            + (f"\nmodel dims from {est.model}" if est.model else "")
        ),
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        collapse_padding=True,
    )
    table.add_column("term", no_wrap=True)
    table.add_column("GB", justify="right", no_wrap=True)
    table.add_column("formula (GB = 1e9 bytes)", overflow="fold")
    for term in est.terms:
        table.add_row(term.name, f"{term.gb:.2f}", term.formula)
    total = f"{est.total_gb:.2f}"
    share = ""
    if est.capacity_bytes is not None:
        share = f"of {est.capacity_bytes / GB:.0f} GB ({est.total_bytes / est.capacity_bytes:.0%})"
        share += " [bold red]AT RISK[/]" if est.at_risk else ""
    table.add_row("[bold]total[/]", f"[bold]{total}[/]", share)
    return Group(table, *(Text(f"note: {note}") for note in est.notes))


def _fit(fits_with: dict[int, MemoryOptions | None], bucket: int) -> str:
    if bucket not in fits_with:
        return ""
    options = fits_with[bucket]
    if options is None:
        return "[bold red]nothing[/]"
    return "as is" if options == MemoryOptions() else options.label().replace(" weights", "")
