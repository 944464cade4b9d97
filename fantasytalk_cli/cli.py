"""The `ftalk` command line: thin commands that parse, load the config, call one library function
and render its result. All exit codes are decided here: 0 ok, 1 problems found, 2 usage or config
error, 3 a command that is not built yet."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from fantasytalk_cli import __version__
from fantasytalk_cli.config import ConfigError, FtalkConfig, config_to_yaml, load_config
from fantasytalk_cli.config.flags import expand_multi_value_flags, with_config_flags

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="ftalk",
    help="Train the FantasyTalking audio adapter on your own talking clips: validate, plan, train, convert.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check configurations.", no_args_is_help=True)
app.add_typer(config_app, name="config")

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_NOT_BUILT = 3

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 (Typer needs Optional)
    typer.Option(
        "--config",
        "-c",
        help="YAML run config (sections data, buckets, model, train, checkpoint, dist); flags override it.",
    ),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"ftalk {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """ftalk: the FantasyTalking training toolkit."""


def resolve_config(config: Path | None, flags: dict[str, Any]) -> FtalkConfig:
    """Load the config or exit 2 with the message naming the bad key."""
    try:
        return load_config(config, flags)
    except ConfigError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from exc


def not_built(command: str, issue: int) -> None:
    """Refuse honestly: the command is registered but its library part is not there yet."""
    err_console.print(f"[bold yellow]ftalk {command} is not built yet[/] (tracked in issue {issue}); nothing was done.")
    raise typer.Exit(EXIT_NOT_BUILT)


@config_app.command("show")
@with_config_flags("data", "buckets", "model", "train", "checkpoint", "dist")
def config_show(config: ConfigOpt = None, *, flags: dict[str, Any]) -> None:
    """Print the resolved configuration (defaults < --config YAML < flags) as YAML."""
    cfg = resolve_config(config, flags)
    typer.echo(config_to_yaml(cfg), nl=False)


@app.command("validate-metadata")
@with_config_flags("data", "buckets")
def validate_metadata(config: ConfigOpt = None, *, flags: dict[str, Any]) -> None:
    """Check every clip, audio file and caption of the metadata before a GPU hour is spent."""
    resolve_config(config, flags)
    not_built("validate-metadata", 3)


@app.command("plan-buckets")
@with_config_flags("data", "buckets", "train")
def plan_buckets(config: ConfigOpt = None, *, flags: dict[str, Any]) -> None:
    """Show the training plan: buckets, frames, tokens, steps, and what is dropped and why."""
    resolve_config(config, flags)
    not_built("plan-buckets", 4)


@app.command("train")
@with_config_flags("data", "buckets", "model", "train", "checkpoint", "dist")
def train(config: ConfigOpt = None, *, flags: dict[str, Any]) -> None:
    """Train the audio adapter (single process, or under `accelerate launch -m fantasytalk_cli train`)."""
    resolve_config(config, flags)
    not_built("train", 6)


@app.command("convert-zero")
def convert_zero(
    checkpoint: Annotated[
        Path, typer.Argument(help="A checkpoint-N folder, or the run folder (its newest checkpoint).")
    ],
    output: Annotated[Path, typer.Argument(help="Output folder (written atomically).")],
) -> None:
    """Convert a ZeRO/FSDP/plain checkpoint into safetensors files inference tools load."""
    not_built("convert-zero", 7)


@app.command("make-demo-data")
def make_demo_data(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write train/, wav/ and metadata_control.json into.")],
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same dataset.")] = 0,
    num_clips: Annotated[int, typer.Option("--num-clips", "--num_clips", min=1, help="Number of clips.")] = 12,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset in OUT_DIR.")] = False,
) -> None:
    """Write a small synthetic talking-clip dataset in the seed's layout (the demo and test data)."""
    from fantasytalk_cli.data.synthetic import DemoDataError, make_demo_dataset

    try:
        report = make_demo_dataset(out_dir, seed=seed, num_clips=num_clips, overwrite=overwrite)
    except DemoDataError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from exc
    console.print(report.summary())


@app.command("demo")
def demo(
    work_dir: Annotated[Path, typer.Option(help="Folder for the demo's data, model and run (replaced).")] = Path(
        ".ftalk-demo"
    ),
    seed: Annotated[int, typer.Option(help="Seed of the demo data and training.")] = 0,
) -> None:
    """Run the whole pipeline on the embedded tiny model and synthetic clips, on the CPU."""
    from fantasytalk_cli.demo import run_demo

    result = run_demo(work_dir, seed=seed)
    for name, seconds, detail in result.steps:
        console.print(f"[bold green]done[/] {name:<18} {seconds:6.1f} s  {detail}")


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: accepts the seed's `--trainable_modules a b` spelling."""
    args = expand_multi_value_flags(sys.argv[1:] if argv is None else argv)
    app(args=args, prog_name="ftalk")
