"""`ftalk evaluate`'s command line (registered on the app in `cli.py`): its options, one call of
`evaluate.run.evaluate`, where the results went."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fantasytalk_cli.errors import FtalkUsageError

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 (Typer needs Optional)
    typer.Option("--config", "-c", help="YAML run config: overrides the run's recorded one; flags override both."),
]

EVALUATE_FIELDS = (
    *("model.pretrained_model_name_or_path", "model.transformer_path", "model.wav2vec_path", "model.config_path"),
    *("model.audio_scale", "train.mixed_precision", "data.eval_meta", "data.eval_data_dir", "train.eval_timesteps"),
)
"""The config fields `ftalk evaluate --help` lists (it accepts every training flag: the run's config is the base)."""


def evaluate_command(
    targets: Annotated[
        list[Path],
        typer.Argument(
            metavar="RUN_OR_CHECKPOINTS...",
            help="A run folder (all its checkpoints), checkpoint folders, or any adapter form `ftalk sample` takes.",
        ),
    ],
    config: ConfigOpt = None,
    select: Annotated[
        Optional[str],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="Write `best` in the run folder naming the best checkpoint by audio_gap, lse_c or lse_d."),
    ] = None,
    syncnet: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="SyncNet checkpoint (syncnet_v2.model of joonson/syncnet_python): adds LSE-D / LSE-C."),
    ] = None,
    samples: Annotated[
        int, typer.Option(min=0, help="Held-out pairs sampled per checkpoint for its sheet (all with --syncnet).")
    ] = 2,
    sample_size: Annotated[int, typer.Option("--sample_size", min=32, help="Longer side of the samples.")] = 256,
    sample_frames: Annotated[int, typer.Option("--sample_frames", min=5, help="Most frames of a sample.")] = 49,
    sample_steps: Annotated[int, typer.Option("--sample_steps", min=1, help="Denoising steps of a sample.")] = 20,
    metrics_dir: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--metrics_dir", help="Where metrics.jsonl goes (default: the run folder)."),
    ] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Score checkpoints on held-out clips (--eval_meta): how much the model uses its audio (the loss with the
    clip's own audio, another clip's, and none), and with --syncnet its lip sync (LSE-D / LSE-C). Appends to the
    run's metrics.jsonl, TensorBoard (logs/evaluate) and metrics.png; the run's own config is the default."""
    from fantasytalk_cli.checkpoints.metrics import HIGHER_IS_BETTER
    from fantasytalk_cli.cli import console
    from fantasytalk_cli.evaluate.run import EvaluateOptions
    from fantasytalk_cli.evaluate.run import evaluate as run_evaluate

    if flags.get("eval_meta") is None:
        raise FtalkUsageError("ftalk evaluate needs the held-out clips: --eval_meta HELD_OUT.json")
    if select is not None and select not in HIGHER_IS_BETTER:
        raise FtalkUsageError(f"--select {select}: choose one of {', '.join(HIGHER_IS_BETTER)}")
    if select in ("lse_c", "lse_d") and syncnet is None:
        raise FtalkUsageError(f"--select {select} ranks by lip sync: give --syncnet syncnet_v2.model")
    options = EvaluateOptions(
        eval_meta=Path(flags.pop("eval_meta")),
        select=select,  # type: ignore[arg-type]
        syncnet=syncnet,
        samples=samples,
        sample_size=sample_size,
        sample_frames=sample_frames,
        sample_steps=sample_steps,
        metrics_dir=metrics_dir,
    )
    report = run_evaluate(
        targets,
        options,
        config=config,
        flags=flags,
        say=lambda line: console.print(line, highlight=False, soft_wrap=True),
    )
    console.print(f"metrics: {report.run_dir / 'metrics.jsonl'}; plot: {report.plot}", highlight=False, soft_wrap=True)
    for sheet in report.sheets:
        console.print(f"samples: {sheet}", highlight=False, soft_wrap=True)
    best = report.best
    if best is not None:
        console.print(
            f"best by {select}: {best.checkpoint} ({best.value:+.6f}), written to {report.run_dir / 'best'}",
            highlight=False,
            soft_wrap=True,
        )
        if select == "audio_gap" and best.low is not None and best.low <= 0.0:
            console.print(
                f"[yellow]its 95% interval [{best.low:+.6f}, {best.high:+.6f}] includes 0: no checkpoint follows its "
                "audio measurably yet (train longer, or hold out more clips for a tighter interval)[/]",
                highlight=False,
                soft_wrap=True,
            )
