"""The `ftalk` command line: thin commands that parse, load the config, call one library function
and render its result. All exit codes are decided here: 0 ok, 1 problems found, 2 usage or config
error."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, Optional, TypeVar

import typer
from rich.console import Console

from fantasytalk_cli import __version__
from fantasytalk_cli.cli_evaluate import EVALUATE_FIELDS, evaluate_command
from fantasytalk_cli.cli_help import PanelHelpCommand
from fantasytalk_cli.cli_prepare import prepare_command
from fantasytalk_cli.config import FtalkConfig, config_to_yaml, load_config
from fantasytalk_cli.config.flags import expand_multi_value_flags, normalize_flag, with_config_flags
from fantasytalk_cli.convert.choices import OutDtype, OutFormat, What
from fantasytalk_cli.errors import FtalkError, FtalkUsageError

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Any)


app = typer.Typer(
    name="ftalk",
    help="Train the FantasyTalking audio adapter on your own talking clips: validate, plan, cache, train, sample, "
    "convert. "
    "Flags may be spelled with underscores (as in the reference trainer) or dashes.",
    rich_markup_mode=None,
    context_settings={"token_normalize_func": normalize_flag},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Show and check configurations.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(config_app, name="config")

EXIT_PROBLEMS = 1
EXIT_USAGE = 2

ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045 (Typer needs Optional)
    typer.Option(
        "--config",
        "-c",
        help="YAML run config (sections data, buckets, model, train, checkpoint, dist); flags override it.",
    ),
]


TRAIN_SECTIONS = ("data", "buckets", "model", "train", "checkpoint", "dist")
PLAN_FIELDS = (
    "train.train_batch_size",
    "train.gradient_accumulation_steps",
    "train.seed",
    "train.mixed_precision",
    "model.pretrained_model_name_or_path",
    "model.config_path",
    "model.low_vram",
    "model.gradient_checkpointing",
    "model.vae_mini_batch",
    "model.base_weights_dtype",
    "model.activation_offload",
    "model.blocks_to_offload",
    "dist.strategy",
)
"""What planning reads besides data and buckets: the batch and seed of the plan, the memory estimate's inputs."""
ACCEPTS_ALL = (
    "Every `ftalk train` flag is accepted too (those not listed are ignored here), so the training "
    "argument list serves this command unchanged."
)

MetadataArg = Annotated[
    Optional[Path],  # noqa: UP045 (Typer needs Optional)
    typer.Argument(
        metavar="METADATA",
        help="Metadata file (the seed's metadata_control.json, JSON Lines or CSV); the same as --train_data_meta.",
        show_default=False,
    ),
]


def with_metadata(flags: dict[str, Any], metadata: Path | None) -> dict[str, Any]:
    """Put the positional METADATA into the flags; given twice with different values is a usage error."""
    if metadata is None:
        return flags
    given = flags.get("train_data_meta")
    if given is not None and Path(given) != metadata:
        raise FtalkUsageError(f"METADATA {metadata} and --train_data_meta {given} differ: give one")
    return {**flags, "train_data_meta": metadata}


def _version(value: bool) -> None:
    if value:
        console.print(f"ftalk {__version__}")
        raise typer.Exit()


DEBUG = {"on": os.environ.get("FTALK_DEBUG", "") not in ("", "0")}
"""`--debug` / `FTALK_DEBUG=1`: errors also print their traceback."""


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Print the traceback of an error too (or set FTALK_DEBUG=1).")
    ] = False,
) -> None:
    """ftalk: the FantasyTalking training toolkit."""
    if debug:
        DEBUG["on"] = True


def fail(exc: Exception, code: int | None = None) -> NoReturn:
    """Print a library error's message (it names the file, the key and the fix) and exit with `code` (default:
    the error's own exit code, else 1); the traceback only with --debug."""
    if DEBUG["on"]:
        err_console.print_exception(show_locals=False)
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line in a log
    raise typer.Exit(code if code is not None else getattr(exc, "exit_code", EXIT_PROBLEMS)) from exc


def reports_errors(func: F) -> F:
    """Every `FtalkError` a command meets ends as its message and exit code, not a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except FtalkError as exc:
            fail(exc)

    return wrapper  # type: ignore[return-value]


def resolve_config(config: Path | None, flags: dict[str, Any]) -> FtalkConfig:
    """Load the config or exit 2 with the message naming the bad key."""
    return load_config(config, flags)


@config_app.command("show", cls=PanelHelpCommand)
@reports_errors
@with_config_flags(*TRAIN_SECTIONS)
def config_show(config: ConfigOpt = None, *, flags: dict[str, Any]) -> None:
    """Print the resolved configuration (defaults < --config YAML < flags) as YAML."""
    cfg = resolve_config(config, flags)
    typer.echo(config_to_yaml(cfg), nl=False)


app.command("prepare", cls=PanelHelpCommand)(reports_errors(prepare_command))


@app.command("validate-metadata", epilog=ACCEPTS_ALL, cls=PanelHelpCommand)
@reports_errors
@with_config_flags("data", "buckets", "model.pretrained_model_name_or_path")
def validate_metadata(
    metadata: MetadataArg = None,
    config: ConfigOpt = None,
    json_path: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--json", help="Write every finding and each entry's probe facts to this JSON file."),
    ] = None,
    write_clean: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(
            "--write-clean", help="Write the entries without errors, with probe facts, here (.json/.jsonl/.csv)."
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Probe processes (0 = one per CPU core, 1 = no subprocesses).")
    ] = 0,
    cache: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--cache", help="Probe cache file (default: .ftalk-probe-cache.jsonl beside the metadata)."),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Probe every file again; read and write no cache.")
    ] = False,
    hash_duplicates: Annotated[
        bool,
        typer.Option("--hash-duplicates", help="Also find the same video bytes under two names (reads every byte)."),
    ] = False,
    tokenizer: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(
            "--tokenizer",
            help="Tokenizer folder for exact caption token counts (default: the model's, else an estimate).",
        ),
    ] = None,
    silence_db: Annotated[
        float, typer.Option("--silence-db", help="Audio RMS below this dBFS is reported as silent.")
    ] = -60.0,
    audio_tolerance: Annotated[
        float,
        typer.Option("--audio-tolerance", min=0.0, help="Seconds audio may end before the video without an error."),
    ] = 0.1,
    thorough: Annotated[
        bool,
        typer.Option("--thorough", help="Decode the real last frame of every clip (slower: up to one GOP per clip)."),
    ] = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Check every clip, audio file and caption of the metadata before a GPU hour is spent."""
    from fantasytalk_cli.data.validate import ValidateOptions
    from fantasytalk_cli.data.validate import validate_metadata as run_validation
    from fantasytalk_cli.progress import progress_bar, track

    cfg = resolve_config(config, with_metadata(flags, metadata))
    options = ValidateOptions(
        json_path=json_path,
        clean_path=write_clean,
        workers=workers,
        cache_path=cache,
        use_cache=not no_cache,
        hash_duplicates=hash_duplicates,
        tokenizer=tokenizer,
        silence_db=silence_db,
        audio_short_tolerance_s=audio_tolerance,
        thorough=thorough,
    )
    with progress_bar(err_console, "validating", transient=True) as bar:
        report = run_validation(
            cfg.data,
            cfg.buckets,
            options,
            model_dir=cfg.model.pretrained_model_name_or_path,
            progress=track(bar, "validate"),
        )
    console.print(report.summary())
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command("plan-buckets", epilog=ACCEPTS_ALL, cls=PanelHelpCommand)
@reports_errors
@with_config_flags("data", "buckets", *PLAN_FIELDS)
def plan_buckets(
    metadata: MetadataArg = None,
    config: ConfigOpt = None,
    json_path: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--json", help="Also write the report as JSON to this file."),
    ] = None,
    write: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--write", help="Write the plan file `ftalk train` reads (set data.bucket_plan to it)."),
    ] = None,
    world_size: Annotated[
        Optional[int],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--world_size", min=1, help="Training processes (default: WORLD_SIZE or 1)."),
    ] = None,
    gpus: Annotated[
        Optional[int],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--gpus", min=1, help="GPUs for the memory estimate (default: the world size)."),
    ] = None,
    gpu_memory: Annotated[
        Optional[float],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--gpu_memory", min=1, help="GB per GPU: flag buckets at risk of running out."),
    ] = None,
    *,
    flags: dict[str, Any],
) -> None:
    """Show the training plan: buckets, frames, tokens, steps, memory, and what is dropped and why."""
    from fantasytalk_cli.data.plan import PlanError
    from fantasytalk_cli.planning.render import render_plan_report
    from fantasytalk_cli.planning.report import make_plan_report

    cfg = resolve_config(config, with_metadata(flags, metadata))
    try:
        report = make_plan_report(
            cfg, world_size=world_size, gpus=gpus, gpu_memory_gb=gpu_memory, write_path=write, json_path=json_path
        )
    except (PlanError, OSError) as exc:
        fail(exc, EXIT_USAGE)
    console.print(render_plan_report(report))
    if not report.ok:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command("train", cls=PanelHelpCommand)
@reports_errors
@with_config_flags(*TRAIN_SECTIONS)
def train(config: ConfigOpt = None, *, flags: dict[str, Any]) -> None:
    """Train the audio adapter (single process, or under `accelerate launch -m fantasytalk_cli train`)."""
    cfg = resolve_config(config, flags)
    from fantasytalk_cli.train.loop import render_summary, run_training

    summary = run_training(cfg, console)
    if summary.main:
        console.print(render_summary(summary))


@app.command("cache", cls=PanelHelpCommand)
@reports_errors
@with_config_flags(*TRAIN_SECTIONS)
def cache(config: ConfigOpt = None, *, flags: dict[str, Any]) -> None:
    """Precompute what the frozen encoders give each clip (text, audio, latents, CLIP) into --cache_dir, with
    train's own flags; `train --cache_dir` then reads it. Under `accelerate launch` each process caches its share."""
    from fantasytalk_cli.cache.build import build_cache
    from fantasytalk_cli.progress import progress_bar, track

    cfg = resolve_config(config, flags)
    with progress_bar(err_console, "caching", disable=not err_console.is_terminal) as bar:
        report = build_cache(cfg, progress=track(bar, "cache"))
    for line in report.summary():
        console.print(line, highlight=False, soft_wrap=True)
    if report.failed:
        raise typer.Exit(EXIT_PROBLEMS)


@app.command("convert-zero", cls=PanelHelpCommand)
@reports_errors
def convert_zero(
    checkpoint: Annotated[
        Path,
        typer.Argument(metavar="CHECKPOINT", help="A checkpoint-N folder, or the run folder (its newest checkpoint)."),
    ],
    output: Annotated[Path, typer.Argument(metavar="OUTPUT", help="Output folder (written atomically).")],
    max_shard_size: Annotated[
        str,
        typer.Option("--max_shard_size", help="Largest shard: KB/MB/GB decimal (1GB = 10^9), KiB/MiB/GiB."),
    ] = "10GB",
    dtype: Annotated[OutDtype, typer.Option(help="Output precision.")] = "bf16",
    what: Annotated[
        What,
        typer.Option(help="adapter = the trained weights; transformer = merged into the frozen base model."),
    ] = "adapter",
    fmt: Annotated[
        OutFormat,
        typer.Option(
            "--format",
            help="fantasytalking = flat safetensors + the released fantasytalking_model.ckpt; comfyui; or the "
            "transformer's diffusers / original Wan names; kohya. A LoRA on the DiT goes beside the adapter in the "
            "format's layout: pytorch_lora_weights.safetensors (diffusers), lora_comfyui.safetensors, "
            "lora_kohya.safetensors (musubi/kohya), lora_wan.safetensors (original names); --what transformer "
            "merges it.",
        ),
    ] = "fantasytalking",
    pretrained_model_name_or_path: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(
            "--pretrained_model_name_or_path",
            help="Base model folder for --what transformer (default: the one the checkpoint's meta.json records).",
        ),
    ] = None,
    tag: Annotated[
        Optional[str],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="DeepSpeed tag folder (default: read from 'latest')."),
    ] = None,
    exclude_frozen_parameters: Annotated[
        bool,
        typer.Option("--exclude_frozen_parameters", help="Leave frozen parameters out."),
    ] = False,
    safe_serialization: Annotated[
        bool,
        typer.Option("--safe_serialization", help="Accepted for the seed's scripts: always safetensors."),
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUTPUT folder.")] = False,
) -> None:
    """Convert a ZeRO/FSDP/plain checkpoint into safetensors files inference tools load."""
    from fantasytalk_cli.convert.zero import ConvertOptions, convert_checkpoint

    options = ConvertOptions(
        what=what,
        format=fmt,
        dtype=dtype,
        max_shard_size=max_shard_size,
        tag=tag,
        pretrained_model_name_or_path=pretrained_model_name_or_path,
        exclude_frozen_parameters=exclude_frozen_parameters,
        overwrite=overwrite,
    )
    report = convert_checkpoint(checkpoint, output, options)
    console.print(report.summary(), highlight=False)
    for warning in report.warnings:
        err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)


SAMPLE_FIELDS = (
    *("model.pretrained_model_name_or_path", "model.transformer_path", "model.wav2vec_path", "model.config_path"),
    *("model.audio_scale", "model.base_weights_dtype", "model.blocks_to_offload", "train.mixed_precision"),
)
SAMPLING = "sampling (upstream infer.py's defaults)"


@app.command("sample", cls=PanelHelpCommand)
@reports_errors
@with_config_flags(*SAMPLE_FIELDS)
def sample(
    config: ConfigOpt = None,
    image: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="Reference portrait (PNG/JPEG...)."),
    ] = None,
    audio: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="Speech to lip-sync (any format soundfile reads)."),
    ] = None,
    prompt: Annotated[str, typer.Option(help="Text prompt.")] = "A person is talking.",
    out: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="Output .mp4 (H.264 with the input audio as AAC; written atomically)."),
    ] = None,
    batch: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="JSONL or CSV of image, audio, prompt, out: many videos, the models loaded once."),
    ] = None,
    adapter: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(
            help="Adapter: a training checkpoint or run folder (any strategy), a convert-zero folder, "
            "fantasytalking_model.ckpt, or flat/ComfyUI safetensors (default: --transformer_path, else none)."
        ),
    ] = None,
    image_size: Annotated[
        int, typer.Option("--image_size", min=32, help="Longer side of the video.", rich_help_panel=SAMPLING)
    ] = 512,
    max_num_frames: Annotated[
        int,
        typer.Option(
            "--max_num_frames",
            min=5,
            help="Most frames (the audio's duration sets the count).",
            rich_help_panel=SAMPLING,
        ),
    ] = 81,
    fps: Annotated[float, typer.Option("--fps", min=1, help="Frames per second.", rich_help_panel=SAMPLING)] = 23.0,
    num_inference_steps: Annotated[
        int, typer.Option("--num_inference_steps", min=1, help="Denoising steps.", rich_help_panel=SAMPLING)
    ] = 30,
    prompt_cfg_scale: Annotated[
        float, typer.Option("--prompt_cfg_scale", help="Prompt guidance.", rich_help_panel=SAMPLING)
    ] = 5.0,
    audio_cfg_scale: Annotated[
        float, typer.Option("--audio_cfg_scale", help="Audio guidance.", rich_help_panel=SAMPLING)
    ] = 5.0,
    audio_cfg_end: Annotated[
        float,
        typer.Option(
            "--audio_cfg_end",
            min=0.0,
            max=1.0,
            help="Fraction of the steps that use audio guidance (below 0.7 weakens lip sync).",
            rich_help_panel=SAMPLING,
        ),
    ] = 1.0,
    negative_prompt: Annotated[
        Optional[str],  # noqa: UP045 (Typer needs Optional)
        typer.Option("--negative_prompt", help="Negative prompt (default: upstream's).", rich_help_panel=SAMPLING),
    ] = None,
    strip: Annotated[
        Optional[Path],  # noqa: UP045 (Typer needs Optional)
        typer.Option(help="Also write a still-frame strip (PNG) of the first video here."),
    ] = None,
    checkpoint: Annotated[
        Optional[str],  # noqa: UP045 (Typer needs Optional)
        typer.Option(
            help="With --adapter RUN: which checkpoint, best (what `ftalk evaluate --select` chose), latest or "
            "checkpoint-N (default: the newest)."
        ),
    ] = None,
    lora_scale: Annotated[
        float,
        typer.Option(
            "--lora_scale",
            help="Weight of the LoRA on the DiT that --adapter's run trained (1 = as trained, 0 = the base DiT).",
            rich_help_panel=SAMPLING,
        ),
    ] = 1.0,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    *,
    flags: dict[str, Any],
) -> None:
    """Generate talking videos with the base model and an adapter, as upstream inference does.

    --seed N sets the noise (default 1111, upstream's); on a GPU the models run in --mixed_precision (bf16).
    --base_weights_dtype fp8 and --blocks_to_offload N fit the transformer in less GPU memory, as in training (an
    offloaded block's weights all wait in host memory); --activation_offload is for training and does nothing here."""
    from fantasytalk_cli.progress import progress_bar, track
    from fantasytalk_cli.sample.request import SampleArgs, sample_as_asked

    args = SampleArgs(
        image=image,
        audio=audio,
        out=out,
        batch=batch,
        prompt=prompt,
        adapter=adapter,
        image_size=image_size,
        max_num_frames=max_num_frames,
        fps=fps,
        num_inference_steps=num_inference_steps,
        prompt_cfg_scale=prompt_cfg_scale,
        audio_cfg_scale=audio_cfg_scale,
        audio_cfg_end=audio_cfg_end,
        negative_prompt=negative_prompt,
        seed=flags.get("seed"),
        strip=strip,
        overwrite=overwrite,
        lora_scale=lora_scale,
        checkpoint=checkpoint,
    )
    cfg = resolve_config(config, flags)
    with progress_bar(err_console, "{task.description}", disable=not err_console.is_terminal) as bar:
        results = sample_as_asked(
            args,
            cfg.model,
            mixed_precision=cfg.train.mixed_precision,
            progress=lambda label, total: track(bar, f"denoising {label}", total),
            say=lambda line: console.print(line, highlight=False, soft_wrap=True),
        )
    for result in results:
        info = result.info
        console.print(
            f"wrote {info.path}: {info.frames} frames at {info.fps:g} fps, {info.width}x{info.height}",
            highlight=False,
            soft_wrap=True,
        )
    if strip is not None:
        console.print(f"wrote {strip}: a still-frame strip of {results[0].info.path.name}", highlight=False)


app.command("evaluate", cls=PanelHelpCommand)(reports_errors(with_config_flags(*EVALUATE_FIELDS)(evaluate_command)))


@app.command("make-demo-data", cls=PanelHelpCommand)
@reports_errors
def make_demo_data(
    out_dir: Annotated[
        Path,
        typer.Argument(metavar="OUT_DIR", help="Folder to write train/, wav/, tracks/ and metadata_control.json into."),
    ],
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same dataset.")] = 0,
    num_clips: Annotated[int, typer.Option("--num_clips", min=1, help="Number of clips.")] = 12,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing dataset in OUT_DIR.")] = False,
) -> None:
    """Write a small synthetic talking-clip dataset in the seed's layout (the demo and test data)."""
    from fantasytalk_cli.data.synthetic import make_demo_dataset

    report = make_demo_dataset(out_dir, seed=seed, num_clips=num_clips, overwrite=overwrite)
    console.print(report.summary())


@app.command("make-tiny-model", cls=PanelHelpCommand)
@reports_errors
def make_tiny_model(
    out_dir: Annotated[
        Path, typer.Argument(metavar="OUT_DIR", help="Base model folder to write (written atomically).")
    ],
    layout: Annotated[
        Literal["original", "diffusers"],
        typer.Option(help="original = the Wan2.1 release layout; diffusers = the -Diffusers layout."),
    ] = "original",
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same weights in either layout.")] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing folder at OUT_DIR.")] = False,
) -> None:
    """Write a tiny random-weight base model (+ wav2vec2 and adapter) in the real file layout, for tests and demos."""
    from fantasytalk_cli.models.tiny import make_tiny_model as write_tiny_model

    report = write_tiny_model(out_dir, layout=layout, seed=seed, overwrite=overwrite)
    console.print(report.summary(), highlight=False)


@app.command("demo", cls=PanelHelpCommand)
@reports_errors
def demo(
    work_dir: Annotated[
        Path, typer.Option(help="Folder for the demo's model, data and run (new, empty, or an earlier demo's).")
    ] = Path(".ftalk-demo"),
    seed: Annotated[int, typer.Option(help="Seed of the demo model, data and training.")] = 0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace WORK_DIR when an earlier `ftalk demo` made it (nothing else is replaced).")
    ] = False,
) -> None:
    """Run the whole pipeline on the embedded tiny model and synthetic clips, on the CPU."""
    from fantasytalk_cli.demo import run_demo

    result = run_demo(work_dir, seed=seed, console=console, overwrite=overwrite)
    for name, seconds, detail in result.steps:
        console.print(f"[bold green]done[/] {name:<18} {seconds:6.1f} s  {detail}", soft_wrap=True, highlight=False)
    for line in result.report():
        console.print(line, soft_wrap=True, highlight=False)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: accepts the seed's `--trainable_modules a b` spelling."""
    args = expand_multi_value_flags(sys.argv[1:] if argv is None else argv)
    app(args=args, prog_name="ftalk")
