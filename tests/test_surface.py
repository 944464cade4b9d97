"""The surface users touch: every command's --help, the README's set-up commands, the demo."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fantasytalk_cli.cli import app

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [
    "prepare",
    "validate-metadata",
    "plan-buckets",
    "train",
    "convert-zero",
    "evaluate",
    "sample",
    "make-demo-data",
    "make-tiny-model",
    "demo",
    "config",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def readme_setup_commands() -> list[str]:
    """The shell commands in the README before its first section heading."""
    text = (REPO / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", head, flags=re.S)


def test_readme_opens_with_the_two_setup_commands() -> None:
    commands = readme_setup_commands()
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci  # CI runs the README's test command


@pytest.mark.slow
def test_readme_demo_command_runs_the_pipeline(tmp_path: Path) -> None:
    demo = readme_setup_commands()[0].split()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    proc = subprocess.run(
        [*demo, "--work-dir", str(tmp_path / "demo")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = (
        "make-tiny-model",
        "make-demo-data",
        "validate-metadata",
        "plan-buckets",
        "train",
        "train stage 2",
        "convert-zero",
        "sample",
    )
    for step in steps:
        assert f"done {step}" in proc.stdout
    assert (tmp_path / "demo" / "run" / "checkpoint-20" / "meta.json").is_file()
    assert (tmp_path / "demo" / "adapter" / "fantasytalking_model.ckpt").is_file()
    assert (tmp_path / "demo" / "run" / "logs").is_dir()  # TensorBoard scalars
    # What happened and what next, one line per path (a piped log keeps each path whole)
    assert re.search(
        r"(?m)^loss on a fixed evaluation batch .*: \d+\.\d+ before training -> \d+\.\d+ after stage 1 -> "
        r"\d+\.\d+ after stage 2$",
        proc.stdout,
    )
    assert f"converted adapter:  {tmp_path / 'demo' / 'adapter' / 'fantasytalking_model.ckpt'}\n" in proc.stdout
    assert f"checkpoint:         {tmp_path / 'demo' / 'run' / 'checkpoint-20'}\n" in proc.stdout
    # stage 2 started from stage 1's weights, weighing the mouth cells of every clip's track
    assert f"initialised from {tmp_path / 'demo' / 'run' / 'checkpoint-20'}" in proc.stdout
    assert "12 of 12 entries have a track, 0 train with weight 1" in proc.stdout
    assert f"stage 2 checkpoint: {tmp_path / 'demo' / 'run-lips' / 'checkpoint-10'}\n" in proc.stdout
    assert "\n  ftalk validate-metadata " in proc.stdout  # the next commands to try
    # the demo ends on a sample video of the trained adapter, whose frames differ from the fresh adapter's
    assert f"sample video:       {tmp_path / 'demo' / 'sample.mp4'}\n" in proc.stdout
    assert (tmp_path / "demo" / "sample.mp4").is_file() and (tmp_path / "demo" / "sample-strip.png").is_file()
    effect = re.search(
        r"(?m)^trained vs fresh adapter: frames differ by (\d+\.\d) grey levels on average$", proc.stdout
    )
    assert effect is not None and float(effect.group(1)) > 0
    again = subprocess.run(  # the README's demo command again: it replaces its own folder
        [*demo, "--work-dir", str(tmp_path / "demo")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-3000:]


def readme_ftalk_args() -> list[str]:
    """The README's FTALK_ARGS bash array, as the shell would split it (variables left as text)."""
    import shlex

    text = (REPO / "README.md").read_text()
    body = re.search(r"FTALK_ARGS=\((.+?)\n\)", text, flags=re.S)
    assert body, "README defines FTALK_ARGS"
    return shlex.split(body.group(1))


@pytest.mark.parametrize("command", ["validate-metadata", "plan-buckets", "train"])
def test_readme_recipe_flags_are_accepted_by(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import fantasytalk_cli.cli as cli

    seen = []
    real = cli.resolve_config

    def capture(config, flags):  # noqa: ANN001, ANN202
        seen.append(real(config, flags))
        raise SystemExit(0)

    monkeypatch.setattr(cli, "resolve_config", capture)
    with pytest.raises(SystemExit) as exc:
        cli.main([command, *readme_ftalk_args()])
    assert exc.value.code in (0, None)
    assert seen[0].model.trainable_modules == ["processor.", "proj_model."]
    assert seen[0].buckets.video_sample_n_frames == 81


def test_shipped_accelerate_fsdp_config_is_the_tested_one() -> None:
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml` sets the environment of the 2-process
    FSDP2 tests (tests/test_distributed.py), read the way `accelerate launch` reads it."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from tests.test_distributed import STRATEGIES

    argv = ["--config_file", str(REPO / "examples/accelerate/fsdp.yaml"), "-m", "fantasytalk_cli", "train"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    env = prepare_multi_gpu_env(args)
    tested = {k: v for k, v in STRATEGIES["fsdp2"].items() if k != "FSDP_BACKWARD_PREFETCH"}  # FSDP1 only
    assert {k: env.get(k) for k in tested} == tested
    assert env["FSDP_USE_ORIG_PARAMS"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def _help(*command: str, columns: int = 80) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)}, terminal_width=columns)
    assert result.exit_code == 0, result.output
    return result.output


def _listed_flags(text: str) -> set[str]:
    return set(re.findall(r"(?m)^  (?:-\w, )?(--[\w-]+)", text))  # option lines: indented by two


@pytest.mark.parametrize("command", [*COMMANDS[:-1], "config show"])
def test_help_at_80_columns_cuts_no_flag_name(command: str) -> None:
    """Every flag a command lists appears whole (no `…`, no line over 80 columns); at 80 columns the
    listed flags are the same as at 200."""
    narrow = _help(*command.split())
    assert "…" not in narrow
    assert max(len(line) for line in narrow.splitlines()) <= 80
    assert _listed_flags(narrow) == _listed_flags(_help(*command.split(), columns=200))


def test_validate_and_plan_help_list_only_what_they_read() -> None:
    from fantasytalk_cli.config.schema import CheckpointConfig, TrainConfig

    validate, plan, train = _help("validate-metadata"), _help("plan-buckets"), _help("train")
    training_only = {f"--{name}" for name in (*TrainConfig.model_fields, *CheckpointConfig.model_fields)}
    assert not training_only & _listed_flags(validate), "validate-metadata --help lists training flags"
    assert "--learning_rate" not in validate and "--video_sample_size" in validate
    assert "--pretrained_model_name_or_path" in validate  # the tokenizer comes from the model folder
    assert "--learning_rate" not in plan and "--train_batch_size" in plan and "--low_vram" in plan
    assert training_only <= _listed_flags(train)
    assert len(validate.splitlines()) < len(train.splitlines()) // 2 + 20
    for text in (validate, plan):
        assert "[OPTIONS] [METADATA]" in text.splitlines()[0]
    assert _help("convert-zero").splitlines()[0].endswith("[OPTIONS] CHECKPOINT OUTPUT")


def test_flags_take_dashes_or_underscores_and_no_prefix(tmp_path: Path) -> None:
    from fantasytalk_cli.cli import main

    def show(*argv: str) -> str:
        result = CliRunner().invoke(app, ["config", "show", *argv])
        assert result.exit_code == 0, result.output
        return result.output

    dashed = show("--video-sample-size=48", "--gradient-checkpointing", "--lr-scheduler", "constant_with_warmup")
    underscored = show("--video_sample_size", "48", "--gradient_checkpointing", "--lr_scheduler=constant_with_warmup")
    assert dashed == underscored and "video_sample_size: 48" in dashed and "gradient_checkpointing: true" in dashed
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text("buckets: {enable_bucket: true}\n")
    assert "enable_bucket: true" in show("-c", str(run_yaml))
    for negated in ("--no-enable_bucket", "--no-enable-bucket"):  # a flag turns a YAML `true` off
        assert "enable_bucket: false" in show("-c", str(run_yaml), negated)
    with pytest.raises(SystemExit) as exc:
        main(["config", "show", "--gradient_checkpointing", "--no-gradient_checkpointing"])
    assert exc.value.code == 2


def test_errors_have_one_root_and_no_traceback_unless_debug(tmp_path: Path) -> None:
    import fantasytalk_cli.cli as cli
    from fantasytalk_cli.checkpoints.folder import CheckpointError
    from fantasytalk_cli.config.load import ConfigError
    from fantasytalk_cli.data.plan import PlanError
    from fantasytalk_cli.errors import FtalkError

    assert all(issubclass(e, FtalkError) for e in (ConfigError, PlanError, CheckpointError))
    argv = ["train", "--output_dir", str(tmp_path / "run")]  # no metadata: a TrainingError
    quiet = CliRunner().invoke(app, argv)
    assert quiet.exit_code == 1 and "error:" in quiet.output and "Traceback" not in quiet.output
    try:
        loud = CliRunner().invoke(app, ["--debug", *argv])
    finally:
        cli.DEBUG["on"] = False
    assert loud.exit_code == 1 and "Traceback" in loud.output and "train_data_meta" in loud.output
