"""The config model: sources and precedence, errors naming the dotted key, the seed's flags."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fantasytalk_cli.cli import app, main
from fantasytalk_cli.config import ConfigError, FtalkConfig, config_to_yaml, load_config
from fantasytalk_cli.config.flags import config_to_argv, expand_multi_value_flags
from fantasytalk_cli.config.load import config_diff, leaf_fields
from fantasytalk_cli.config.wan_yaml import load_wan_yaml

REPO = Path(__file__).resolve().parents[1]

# The script arguments shared by the seed's four recipes (scripts/fantasytalking/README_TRAIN.md),
# verbatim; only the launcher flags before the script differ between the recipes.
SEED_SCRIPT_ARGS = """
  --config_path="config/wan2.1/wan_civitai.yaml" \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATASET_NAME \\
  --train_data_meta=$DATASET_META_NAME \\
  --video_sample_size=512 \\
  --token_sample_size=512 \\
  --video_sample_stride=1 \\
  --video_sample_n_frames=81 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=1 \\
  --dataloader_num_workers=8 \\
  --num_train_epochs=100 \\
  --checkpointing_steps=50 \\
  --learning_rate=2e-05 \\
  --lr_scheduler="constant_with_warmup" \\
  --lr_warmup_steps=100 \\
  --seed=42 \\
  --output_dir="output_dir" \\
  --gradient_checkpointing \\
  --mixed_precision="bf16" \\
  --adam_weight_decay=3e-2 \\
  --adam_epsilon=1e-10 \\
  --vae_mini_batch=1 \\
  --max_grad_norm=0.05 \\
  --random_hw_adapt \\
  --training_with_video_token_length \\
  --enable_bucket \\
  --uniform_sampling \\
  --low_vram \\
  --transformer_path="models/FantasyTalking/fantasytalking_model.ckpt" \\
  --trainable_modules "processor." "proj_model."
"""

SEED_LAUNCHERS = {
    "ddp": 'accelerate launch --mixed_precision="bf16" scripts/fantasytalking/train.py',
    "zero2": "accelerate launch --use_deepspeed --deepspeed_config_file config/zero_stage2_config.json "
    "--deepspeed_multinode_launcher standard scripts/fantasytalking/train.py",
    "zero3": "accelerate launch --zero_stage 3 --zero3_save_16bit_model true --zero3_init_flag true --use_deepspeed "
    "--deepspeed_config_file config/zero_stage3_config.json --deepspeed_multinode_launcher standard "
    "scripts/fantasytalking/train.py",
    "fsdp": 'accelerate launch --mixed_precision="bf16" --use_fsdp --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP '
    "--fsdp_transformer_layer_cls_to_wrap=AudioAttentionBlock --fsdp_sharding_strategy FULL_SHARD "
    "--fsdp_state_dict_type=SHARDED_STATE_DICT --fsdp_backward_prefetch BACKWARD_PRE "
    "--fsdp_cpu_ram_efficient_loading False scripts/fantasytalking/train.py",
}


def seed_script_argv(tmp: Path) -> list[str]:
    """The seed's script arguments with its shell variables pointing into `tmp`."""
    text = (
        SEED_SCRIPT_ARGS.replace("\\\n", " ")
        .replace("$MODEL_NAME", str(tmp / "models/Wan2.1-I2V-14B-720P"))
        .replace("$DATASET_NAME", str(tmp / "datasets/internal_datasets/"))
        .replace("$DATASET_META_NAME", str(tmp / "datasets/internal_datasets/metadata_control.json"))
    )
    return shlex.split(text)


def script_part(launcher: str) -> list[str]:
    """What follows the script path in a launcher line (the launcher's own flags are accelerate's)."""
    words = shlex.split(launcher)
    return words[words.index("scripts/fantasytalking/train.py") + 1 :]


def parse_train_argv(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> FtalkConfig:
    """Run `ftalk train ARGV` up to the resolved config (the training itself is replaced)."""
    seen: list[FtalkConfig] = []
    import fantasytalk_cli.cli as cli

    real = cli.resolve_config

    def capture(config: Path | None, flags: dict) -> FtalkConfig:
        seen.append(real(config, flags))
        raise SystemExit(0)

    monkeypatch.setattr(cli, "resolve_config", capture)
    with pytest.raises(SystemExit) as exc:
        main(["train", *argv])
    assert exc.value.code in (0, None), exc.value
    assert len(seen) == 1
    return seen[0]


def dashed(token: str) -> str:
    """`--video_sample_size=512` -> `--video-sample-size=512` (values untouched)."""
    if not token.startswith("--"):
        return token
    name, eq, value = token.partition("=")
    return name.replace("_", "-") + eq + value


@pytest.mark.parametrize("spelling", ["underscore", "dash"])
@pytest.mark.parametrize("recipe", sorted(SEED_LAUNCHERS))
def test_seed_recipes_parse_into_the_values_they_name(recipe: str, spelling: str, tmp_path: Path, monkeypatch) -> None:
    argv = script_part(SEED_LAUNCHERS[recipe]) + seed_script_argv(tmp_path)
    if spelling == "dash":
        argv = [dashed(token) for token in argv]
    cfg = parse_train_argv(argv, monkeypatch)
    assert cfg.model.config_path == Path("config/wan2.1/wan_civitai.yaml")
    assert cfg.model.pretrained_model_name_or_path == tmp_path / "models/Wan2.1-I2V-14B-720P"
    assert cfg.data.train_data_dir == tmp_path / "datasets/internal_datasets"
    assert cfg.data.train_data_meta == tmp_path / "datasets/internal_datasets/metadata_control.json"
    b = cfg.buckets
    assert (b.video_sample_size, b.token_sample_size, b.video_sample_stride, b.video_sample_n_frames) == (
        512,
        512,
        1,
        81,
    )
    assert b.random_hw_adapt and b.training_with_video_token_length and b.enable_bucket
    t = cfg.train
    assert (t.train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (1, 1, 100)
    assert cfg.data.dataloader_num_workers == 8
    assert cfg.checkpoint.checkpointing_steps == 50
    assert cfg.checkpoint.output_dir == Path("output_dir")
    assert t.learning_rate == 2e-05 and t.lr_scheduler == "constant_with_warmup" and t.lr_warmup_steps == 100
    assert t.seed == 42 and t.mixed_precision == "bf16"
    assert t.adam_weight_decay == 3e-2 and t.adam_epsilon == 1e-10 and t.max_grad_norm == 0.05
    assert t.uniform_sampling
    assert cfg.model.gradient_checkpointing and cfg.model.low_vram and cfg.model.vae_mini_batch == 1
    assert cfg.model.transformer_path == Path("models/FantasyTalking/fantasytalking_model.ckpt")
    assert cfg.model.trainable_modules == ["processor.", "proj_model."]


def test_dashed_spellings_and_remaining_seed_flags(tmp_path: Path, monkeypatch) -> None:
    cfg = parse_train_argv(
        [
            "--video-sample-size",
            "768",
            "--trainable-modules",
            "proj_model.",
            "--random-frame-crop",
            "--checkpoints_total_limit=3",
            "--resume_from_checkpoint",
            "latest",
            "--max_train_steps",
            "7",
        ],
        monkeypatch,
    )
    assert cfg.buckets.video_sample_size == 768
    assert cfg.model.trainable_modules == ["proj_model."]
    assert cfg.buckets.random_frame_crop
    assert cfg.checkpoint.checkpoints_total_limit == 3
    assert cfg.checkpoint.resume_from_checkpoint == "latest"
    assert cfg.train.max_train_steps == 7


def test_train_help_lists_every_seed_flag() -> None:
    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert result.exit_code == 0
    flags = {w.split("=")[0] for w in seed_script_argv(Path("/x")) if w.startswith("--")}
    flags |= {"--checkpoints_total_limit", "--resume_from_checkpoint", "--random_frame_crop"}
    for flag in sorted(flags):
        assert flag in result.output, flag
    assert "--adam-epsilon" not in result.output  # the dashed alias is accepted (normalised), not listed twice


def test_top_level_help_lists_the_commands() -> None:
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for command in ("validate-metadata", "plan-buckets", "train", "convert-zero"):
        assert command in result.output
    version = CliRunner().invoke(app, ["--version"])
    assert version.exit_code == 0 and "ftalk" in version.output


def test_yaml_then_flags_precedence(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text(
        yaml.safe_dump(
            {"buckets": {"video_sample_size": 256, "video_sample_n_frames": 49}, "train": {"learning_rate": 1e-4}}
        )
    )
    from_yaml = load_config(run)
    assert from_yaml.buckets.video_sample_size == 256
    assert from_yaml.train.learning_rate == 1e-4
    assert from_yaml.train.train_batch_size == FtalkConfig().train.train_batch_size  # default kept
    both = load_config(run, {"video_sample_size": 384})
    assert both.buckets.video_sample_size == 384  # flag beats file
    assert both.buckets.video_sample_n_frames == 49  # file beats default


def test_unknown_key_names_the_dotted_path(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("buckets:\n  video_sample_sise: 512\n")
    with pytest.raises(ConfigError) as exc:
        load_config(run)
    message = str(exc.value)
    assert "buckets.video_sample_sise" in message
    assert "video_sample_size" in message  # what is allowed
    assert str(run) in message


def test_unknown_section_names_the_allowed_sections(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("optimiser:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"optimiser: unknown key; allowed here: .*buckets"):
        load_config(run)


def test_wrong_type_names_the_dotted_path(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  train_batch_size: lots\n")
    with pytest.raises(ConfigError, match=r"train\.train_batch_size: .*integer.*'lots'"):
        load_config(run)


def test_bad_choice_and_cross_field_checks() -> None:
    with pytest.raises(ConfigError, match=r"train\.mixed_precision"):
        load_config(None, {"mixed_precision": "fp8"})
    with pytest.raises(ConfigError, match=r"buckets.*4k\+1.*use 49 or 53"):
        load_config(None, {"video_sample_n_frames": 50})


def test_cli_reports_config_errors_with_exit_code_2(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  learning_rat: 1\n")
    result = CliRunner().invoke(app, ["config", "show", "--config", str(run)])
    assert result.exit_code == 2
    assert "train.learning_rat" in result.output


def test_round_trip_config_yaml_config(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        {"train_data_dir": tmp_path, "trainable_modules": ["proj_model."], "max_train_steps": 5, "enable_bucket": True},
    )
    text = config_to_yaml(cfg)
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg
    assert config_to_yaml(again) == text
    assert config_diff(cfg.model_dump(mode="json"), again.model_dump(mode="json")) == []


def test_config_show_prints_the_resolved_yaml(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["config", "show", "--learning_rate", "3e-4", "--enable_bucket"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["learning_rate"] == 3e-4
    assert shown["buckets"]["enable_bucket"] is True


def test_every_field_is_a_unique_flag() -> None:
    owners = leaf_fields()  # raises on a duplicate name
    assert owners["video_sample_size"] == "buckets"
    assert owners["trainable_modules"] == "model"


def test_multi_value_flag_expansion() -> None:
    argv = ["train", "--trainable_modules", "a.", "b.", "--seed", "1", "--trainable-modules=c."]
    assert expand_multi_value_flags(argv) == [
        "train",
        "--trainable_modules",
        "a.",
        "--trainable_modules",
        "b.",
        "--seed",
        "1",
        "--trainable-modules=c.",
    ]


def test_multi_value_flag_ends_at_a_short_option() -> None:
    argv = ["train", "--trainable_modules", "a.", "b.", "-c", "run.yaml"]
    assert expand_multi_value_flags(argv) == ["train", "--trainable_modules", "a.", "--trainable_modules", "b.", "-c",
                                              "run.yaml"]  # fmt: skip


def test_cli_flags_beat_the_config_file(tmp_path: Path) -> None:
    run = tmp_path / "run.yaml"
    run.write_text("train:\n  learning_rate: 0.5\n  seed: 7\nmodel:\n  trainable_modules: [x.]\n")
    argv = ["config", "show", "--trainable_modules", "processor.", "proj_model.", "-c", str(run), "--learning_rate",
            "0.1"]  # fmt: skip
    result = CliRunner().invoke(app, expand_multi_value_flags(argv))  # as `main` does before Typer parses
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert shown["train"]["learning_rate"] == 0.1  # flag over file
    assert shown["train"]["seed"] == 7  # file over default
    assert shown["model"]["trainable_modules"] == ["processor.", "proj_model."]


def test_shipped_example_configs_validate() -> None:
    runs = sorted((REPO / "examples").glob("*.yaml"))
    assert runs, "examples/ ships run configs"
    for path in runs:
        load_config(path)
    wan = load_wan_yaml(REPO / "examples/wan2.1/wan_civitai.yaml")
    assert wan.scheduler_kwargs.shift == 5.0 and wan.scheduler_kwargs.num_train_timesteps == 1000
    assert wan.vae_kwargs.vae_subpath == "Wan2.1_VAE.pth"
    assert wan.unknown_keys() == []


def test_every_flag_round_trips_through_the_command_line(tmp_path: Path, monkeypatch) -> None:
    cfg = load_config(None, {"fsdp_version": 1, "strategy": "zero2", "train_data_dir": tmp_path, "enable_bucket": True})
    assert parse_train_argv(config_to_argv(cfg), monkeypatch) == cfg
