"""`ftalk convert-zero` on real checkpoints: 2-process CPU ZeRO-2, ZeRO-3, FSDP1 and FSDP2 runs of the tiny
FantasyTalking transformer (our layout and the reference trainer's), converted and compared with the weights gathered
in memory at save time and with DeepSpeed's own `zero_to_fp32`; plus sharding, formats, the merged transformer,
broken partitions, an interrupted write, and the command line with the seed's flags."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fantasytalk_cli.cli import app
from fantasytalk_cli.convert.sharding import Entry, parse_size, plan_shards
from fantasytalk_cli.convert.zero import ConversionError, ConversionUsageError, ConvertOptions, convert_checkpoint
from fantasytalk_cli.models.adapter_file import adapter_to_format, load_adapter_or_transformer
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.tiny import TINY_AUDIO_DIMS, TINY_DIT, make_tiny_model
from fantasytalk_cli.models.trainable import is_adapter_name
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import build_empty
from tests.dist.launch import check_run
from tests.test_distributed import STRATEGIES

REPO = Path(__file__).resolve().parents[1]
KINDS = ("zero2", "zero3", "fsdp1", "fsdp2")
FILES = {
    "fantasytalking": "fantasytalking_model.safetensors",
    "comfyui": "fantasytalking_comfyui.safetensors",
    "diffusers": "diffusion_pytorch_model.safetensors",
    "original": "diffusion_pytorch_model.safetensors",
}


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: a tiny base model, real multi-process checkpoints, a plain one.


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base") / "Wan2.1-I2V-14B-720P", seed=0).path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, base: Path) -> dict[str, Path]:
    """Each strategy's folder: ``run/`` (through `save_training_checkpoint`) and ``reference/checkpoint-2/``."""
    out: dict[str, Path] = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
        env.update(STRATEGIES[kind])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        cmd += ["-m", "tests.dist.ckpt_run", str(folder), str(base)]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        check_run(proc, folder / "info.json", kind)
        out[kind] = folder
    return out


def _adapter_shapes() -> dict[str, tuple[int, ...]]:
    model = build_empty(lambda: FantasyTalkingTransformer(**TINY_DIT))
    return {n: tuple(p.shape) for n, p in model.named_parameters() if is_adapter_name(n)}


def _plain_checkpoint(run: Path, step: int, seed: int) -> dict[str, torch.Tensor]:
    """A DDP-style checkpoint: only ``trainable.safetensors`` + ``meta.json``."""
    g = torch.Generator().manual_seed(seed)
    weights = {n: torch.randn(s, generator=g) for n, s in _adapter_shapes().items()}
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file(weights, str(folder / "trainable.safetensors"))
    meta = {"step": step, "config": {"model": {"trainable_modules": ["processor.", "proj_model."]}}}
    (folder / "meta.json").write_text(json.dumps(meta))
    (run / "latest").write_text(folder.name + "\n")
    return weights


@pytest.fixture
def plain(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    run = tmp_path / "run"
    _plain_checkpoint(run, 1, seed=1)
    return run, _plain_checkpoint(run, 3, seed=3)


def _meta_model() -> FantasyTalkingTransformer:
    return build_empty(lambda: FantasyTalkingTransformer(**TINY_DIT))


def _adapter_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if is_adapter_name(n)}


# --------------------------------------------------------------------------------------------------------------------
# Real checkpoints.


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["run", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_converts_exactly(kind: str, layout: str, runs: dict[str, Path], tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    gathered = load_file(runs[kind] / "run" / "checkpoint-2" / "trainable.safetensors")
    assert all(v.abs().sum() > 0 for k, v in gathered.items() if "_proj." in k), "k/v trained away from zero"
    source = runs[kind] / layout if layout == "run" else runs[kind] / "reference" / "checkpoint-2"
    report = convert_checkpoint(source, tmp_path / "fp32", ConvertOptions(format="diffusers", dtype="fp32"))
    assert report.kind == {"fsdp1": "fsdp", "fsdp2": "fsdp"}.get(kind, kind)
    assert report.checkpoint.name == "checkpoint-2"
    fp32 = load_file(tmp_path / "fp32" / FILES["diffusers"])
    assert sorted(fp32) == sorted(gathered)
    assert all(torch.equal(fp32[k], v) for k, v in gathered.items())
    if kind.startswith("zero"):
        ds_dir = report.checkpoint / ("accelerate" if layout == "run" else ".")
        ds = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), exclude_frozen_parameters=layout == "run")
        assert set(fp32) <= set(ds) and (layout == "reference" or set(ds) == set(fp32))
        assert all(torch.equal(fp32[k], ds[k]) for k in fp32), "bitwise equal to DeepSpeed's zero_to_fp32"
    if kind.startswith("zero"):  # without `latest`: --tag, or the only tag folder there is
        copy = shutil.copytree(report.checkpoint, tmp_path / "copy" / "checkpoint-2")
        (copy / ("accelerate" if layout == "run" else ".") / "latest").unlink()
        with pytest.raises(ConversionUsageError, match="--tag nope"):
            convert_checkpoint(copy, tmp_path / "x", ConvertOptions(tag="nope"))
        for tag in ("pytorch_model", None):
            out = tmp_path / f"tag-{tag}"
            assert convert_checkpoint(copy, out, ConvertOptions(tag=tag, format="diffusers", dtype="fp32")).kind == kind
            assert all(torch.equal(v, fp32[k]) for k, v in load_file(out / FILES["diffusers"]).items())
    convert_checkpoint(source, tmp_path / "bf16", ConvertOptions())
    bf16 = load_file(tmp_path / "bf16" / FILES["fantasytalking"])
    flat = adapter_to_format({k: v.to(torch.bfloat16) for k, v in gathered.items()}, "flat")
    assert sorted(bf16) == sorted(flat) and all(torch.equal(bf16[k], v) for k, v in flat.items())


@pytest.mark.slow
def test_every_format_loads_strictly(runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    checkpoint = runs["zero3"] / "run" / "checkpoint-2"
    gathered = load_file(checkpoint / "trainable.safetensors")
    want = {k: v.to(torch.bfloat16).float() for k, v in gathered.items()}
    model = load_transformer(base, **TINY_AUDIO_DIMS)
    for fmt, file in FILES.items():
        out = tmp_path / fmt
        convert_checkpoint(checkpoint, out, ConvertOptions(format=fmt))  # type: ignore[arg-type]
        paths = [out / file] + ([out / "fantasytalking_model.ckpt"] if fmt == "fantasytalking" else [])
        for path in paths:
            with torch.no_grad():
                for p in _adapter_of(model).values():
                    p.zero_()
            report = load_adapter_or_transformer(path, model)
            assert report.content == "adapter", (path, report)
            got = _adapter_of(model)
            assert all(torch.equal(got[k], v) for k, v in want.items()), path
    released = torch.load(tmp_path / "fantasytalking" / "fantasytalking_model.ckpt", weights_only=True)
    at_save = torch.load(checkpoint / "fantasytalking_model.ckpt", weights_only=True)
    assert set(released) == {"proj_model", "audio_processor"}
    for part, tensors in at_save.items():
        assert sorted(released[part]) == sorted(tensors)
        assert all(torch.equal(released[part][k], v) for k, v in tensors.items()), "round-trips the released format"


@pytest.mark.slow
def test_transformer_is_base_plus_trained(runs: dict[str, Path], base: Path, tmp_path: Path) -> None:
    run = runs["fsdp1"] / "run"
    gathered = load_file(run / "checkpoint-2" / "trainable.safetensors")
    expected = load_transformer(base, **TINY_AUDIO_DIMS)
    with torch.no_grad():
        for name, param in expected.named_parameters():
            if name in gathered:
                param.copy_(gathered[name])
    expected_state = expected.state_dict()
    # original names, base folder taken from meta.json, many small shards: a folder load_transformer reads
    options = ConvertOptions(what="transformer", format="original", dtype="fp32", max_shard_size="20KB")
    report = convert_checkpoint(run, tmp_path / "original", options)
    assert report.shards > 3 and any("larger than --max_shard_size" in w for w in report.warnings)
    merged = load_transformer(tmp_path / "original", **TINY_AUDIO_DIMS).state_dict()
    assert sorted(merged) == sorted(expected_state)
    assert all(torch.equal(merged[k], v) for k, v in expected_state.items())
    # diffusers names, base given: loads as a whole transformer file
    options = ConvertOptions(what="transformer", format="diffusers", dtype="fp32", pretrained_model_name_or_path=base)
    convert_checkpoint(run, tmp_path / "diffusers", options)
    config = json.loads((tmp_path / "diffusers" / "config.json").read_text())
    assert config["audio_in_dim"] == TINY_AUDIO_DIMS["audio_in_dim"]
    fresh = load_transformer(base, **TINY_AUDIO_DIMS)
    assert load_adapter_or_transformer(tmp_path / "diffusers" / FILES["diffusers"], fresh).content == (
        "transformer+adapter"
    )
    assert all(torch.equal(v, expected_state[k]) for k, v in fresh.state_dict().items())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "damage", "named"),
    [
        ("zero2", "delete", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("zero3", "truncate", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
        ("zero3", "delete", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
        ("fsdp2", "delete", "__1_0.distcp"),
        ("fsdp1", "truncate", "__0_0.distcp"),
    ],
)
def test_broken_partition_is_named(kind: str, damage: str, named: str, runs: dict[str, Path], tmp_path: Path) -> None:
    checkpoint = shutil.copytree(runs[kind] / "run" / "checkpoint-2", tmp_path / "checkpoint-2")
    (path,) = [p for p in checkpoint.rglob(named) if "optimizer_0" not in p.parts]
    if damage == "delete":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")) as info:
        convert_checkpoint(checkpoint, tmp_path / "out", ConvertOptions())
    assert not isinstance(info.value, ConversionUsageError)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# --------------------------------------------------------------------------------------------------------------------
# Plain checkpoints, sharding, safety, the command line.


def test_parse_size() -> None:
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("512KiB") == 512 * 1024
    assert parse_size("2 gib") == 2 * 2**30
    assert parse_size("123") == 123
    for bad in ("", "GB", "10XB", "-1GB", "0"):
        with pytest.raises(ConversionUsageError, match="max_shard_size"):
            parse_size(bad)


def test_plan_shards_caps_each_file() -> None:
    entries = [Entry(f"t{i}", f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5, 5])]
    plan = plan_shards(entries, "x", max_bytes=80)
    assert [[e.name for e in s] for s in plan.shards] == [["t0", "t1"], ["t2"], ["t3", "t4", "t5"]]
    assert [e.name for e in plan.oversized] == ["t2"]  # 120 bytes > 80: alone in its shard
    assert plan.files[0] == "x-00001-of-00003.safetensors" and plan.index_name == "x.safetensors.index.json"


def test_plain_run_folder_sharded(plain: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    run, weights = plain
    out = tmp_path / "out"
    report = convert_checkpoint(run, out, ConvertOptions(dtype="fp32", max_shard_size="4KB"))
    assert report.kind == "plain" and report.checkpoint.name == "checkpoint-3"
    index = json.loads((out / "fantasytalking_model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    flat = adapter_to_format(weights, "flat")
    assert sorted(weight_map) == sorted(flat)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in flat.values())
    oversized = {w.split(" ")[0] for w in report.warnings}
    assert len(oversized) == 5  # the four 32x32 fp32 k/v and proj (4096 bytes > 4 KB) sit alone
    for file in sorted(set(weight_map.values())):
        with safe_open(str(out / file), "pt") as handle:
            keys = list(handle.keys())
            assert sorted(keys) == sorted(k for k, f in weight_map.items() if f == file)
            size = sum(_nbytes(handle, k) for k in keys)
        assert size <= 4000 or (len(keys) == 1 and keys[0] in oversized)
    model = _meta_model()
    load_adapter_or_transformer(out / "fantasytalking_model.safetensors.index.json", model)
    assert all(torch.equal(p, weights[n]) for n, p in _adapter_of(model).items())


def _nbytes(handle: object, key: str) -> int:
    tensor = handle.get_tensor(key)  # type: ignore[attr-defined]
    return tensor.numel() * tensor.element_size()


def test_output_safety_and_usage_errors(plain: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    run, weights = plain
    out = tmp_path / "out"
    convert_checkpoint(run, out, ConvertOptions(format="comfyui"))
    with pytest.raises(ConversionUsageError, match="--overwrite"):
        convert_checkpoint(run, out, ConvertOptions())
    report = convert_checkpoint(run / "checkpoint-1", out, ConvertOptions(format="diffusers", overwrite=True))
    assert sorted(p.name for p in out.iterdir()) == [FILES["diffusers"]] and report.checkpoint.name == "checkpoint-1"
    for options, message in (
        (ConvertOptions(what="transformer"), "holds only the audio adapter"),
        (ConvertOptions(what="transformer", format="original", exclude_frozen_parameters=True), "choose one"),
        (ConvertOptions(what="transformer", format="original"), "--pretrained_model_name_or_path"),
        (ConvertOptions(dtype="fp8"), "--dtype"),  # type: ignore[arg-type]
    ):
        with pytest.raises(ConversionUsageError, match=message):
            convert_checkpoint(run, tmp_path / "other", options)
    with pytest.raises(ConversionUsageError, match="neither a checkpoint"):
        convert_checkpoint(tmp_path / "out", tmp_path / "other", ConvertOptions())
    assert not (tmp_path / "other").exists()


def test_killed_conversion_leaves_no_output(plain: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    run, _ = plain
    out = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "import fantasytalk_cli.convert.sharding as sharding\n"
        "first = sharding._save_shard\n"
        "def write_then_die(tensors, path):\n"
        "    first(tensors, path)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "sharding._save_shard = write_then_die\n"
        "from fantasytalk_cli.cli import app\n"
        "app(sys.argv[1:], prog_name='ftalk')\n"
    )
    args = ["convert-zero", str(run), str(out), "--max_shard_size", "5KB"]
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    (partial,) = tmp_path.glob(".out.converting-*")
    assert len(list(partial.glob("*.safetensors"))) == 1  # killed after its first shard
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "fantasytalking_model.safetensors.index.json").is_file() and not partial.exists()


def test_cli_seed_spelling(plain: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    run, weights = plain
    runner = CliRunner()
    seed = ["convert-zero", str(run / "checkpoint-3"), str(tmp_path / "out"), "--max_shard_size", "80GB"]
    result = runner.invoke(app, [*seed, "--safe_serialization", "--exclude_frozen_parameters"])
    assert result.exit_code == 0, result.output
    assert "kind: plain" in result.output
    got = load_file(tmp_path / "out" / FILES["fantasytalking"])
    flat = adapter_to_format({k: v.to(torch.bfloat16) for k, v in weights.items()}, "flat")
    assert all(torch.equal(got[k], v) for k, v in flat.items())
    assert runner.invoke(app, seed).exit_code == 2  # exists, no --overwrite
    dashed = [*seed[:2], str(tmp_path / "dashed"), "--max-shard-size", "1KiB", "--safe-serialization"]
    dashed += ["--dtype", "fp16"]
    assert runner.invoke(app, dashed).exit_code == 0
    weights_file = run / "checkpoint-3" / "trainable.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    result = runner.invoke(app, [*seed[:2], str(tmp_path / "broken")])
    assert result.exit_code == 1 and "trainable.safetensors" in result.output.replace("\n", "")
