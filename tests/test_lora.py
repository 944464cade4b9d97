"""A LoRA on the DiT in one process on the tiny world: step 0 is the base model bitwise, a LoRA run resumes bitwise
after SIGTERM, cached and online LoRA runs train to the same weights, float8 storage composes (the LoRA stays float32
beside the float8 base, gradients through the cast base agree with bf16), and the config refuses what cannot be."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fantasytalk_cli.cache.build import build_cache
from fantasytalk_cli.checkpoints.folder import CheckpointMeta, newest_checkpoint
from fantasytalk_cli.config.load import ConfigError, load_config
from fantasytalk_cli.models.dims import TINY_CONFIG
from fantasytalk_cli.models.lora import LoraSpec, add_lora, lora_layers, set_lora_scale
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.runtime.memory_options import store_in_fp8
from fantasytalk_cli.train.loop import run_training
from fantasytalk_cli.train.preflight import RunFolderError
from tests.test_train import sigterm_after_first_checkpoint
from tests.tiny_world import train_in_own_state, world_argv, world_config

QUIET = Console(file=open(os.devnull, "w"))  # noqa: SIM115 (kept for the session)
LORA = {"lora_rank": 4, "lora_alpha": 8.0}


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, 36, 2, 4, 4, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 4, 32, generator=g),
        "audio_features": torch.randn(1, 10, 32, generator=g),
    }


def _tiny(seed: int = 0) -> FantasyTalkingTransformer:
    torch.manual_seed(seed)
    model = FantasyTalkingTransformer.from_config(TINY_CONFIG)
    with torch.no_grad():  # a non-zero adapter, so the audio path is exercised too
        for processor in model.audio_processors():
            for param in processor.parameters():
                param.normal_(0, 0.1)
    return model.eval()


def test_a_fresh_lora_is_the_base_model_bitwise() -> None:
    base = _tiny()
    with torch.no_grad():
        want = base(**_inputs())[0]
    lora = _tiny()
    count = add_lora(lora, LoraSpec(4, 8.0), seed=7)
    assert count > 0 and len(lora_layers(lora)) == 10 * TINY_CONFIG["num_layers"]
    assert {p.dtype for n, p in lora.named_parameters() if "lora_" in n} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(lora(**_inputs())[0], want)


def test_lora_init_is_seeded_and_scale_zero_is_the_base() -> None:
    a, b, c = _tiny(), _tiny(), _tiny()
    add_lora(a, LoraSpec(4, 8.0), seed=7)
    add_lora(b, LoraSpec(4, 8.0), seed=7)
    add_lora(c, LoraSpec(4, 8.0), seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    downs = [k for k in sa if ".lora_A." in k]
    assert all(torch.equal(sa[k], sb[k]) for k in downs)
    assert not all(torch.equal(sa[k], sc[k]) for k in downs)
    base = _tiny()
    with torch.no_grad():
        for name, param in a.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5)
        changed = a(**_inputs())[0]
        set_lora_scale(a, 0.0)
        assert torch.equal(a(**_inputs())[0], base(**_inputs())[0])
        set_lora_scale(a, 1.0)
        assert torch.equal(a(**_inputs())[0], changed)
        assert not torch.allclose(changed, base(**_inputs())[0])


def test_step_zero_of_a_lora_run_is_the_base_run(tiny_world: dict, tmp_path: Path) -> None:
    steps = {"max_train_steps": 1, "checkpointing_steps": 1, "audio_dropout": 0.0}
    base = run_training(world_config(tiny_world, tmp_path / "base", **steps), QUIET)
    lora = run_training(world_config(tiny_world, tmp_path / "lora", **steps, **LORA), QUIET)
    assert base.losses[0] == lora.losses[0]
    saved = load_file(tmp_path / "lora" / "checkpoint-1" / "trainable.safetensors")
    assert any(".lora_B.default." in k for k in saved) and any(k.startswith("proj_model.") for k in saved)
    ups = [v for k, v in saved.items() if ".lora_B." in k]
    assert any(v.abs().sum() > 0 for v in ups)  # one step moved the LoRA


def test_a_resume_that_would_train_other_tensors_is_refused_before_loading(
    tiny_world: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_training(world_config(tiny_world, tmp_path / "run", max_train_steps=1, checkpointing_steps=1, **LORA), QUIET)
    import fantasytalk_cli.train.setup as setup

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models were loaded before the refusal")

    monkeypatch.setattr(setup, "load_training_models", no_loading)
    for changed, says in (({"lora_rank": 8}, "lora_rank 4 -> 8"), ({"lora_rank": 0}, "lora_rank 4 -> 0")):
        flags = {**LORA, **changed, "max_train_steps": 2, "resume_from_checkpoint": "latest"}
        with pytest.raises(
            RunFolderError, match=f"trained other tensors or another loss than this run would \\({says}"
        ):
            run_training(world_config(tiny_world, tmp_path / "run", **flags), QUIET)
    same_scale = {"lora_rank": 4, "lora_alpha": 8, "max_train_steps": 2, "resume_from_checkpoint": "latest"}
    with pytest.raises(AssertionError, match="models were loaded"):  # alpha 8 given as an int: the same LoRA
        run_training(world_config(tiny_world, tmp_path / "run", **same_scale), QUIET)


def test_audio_dropout_defaults_to_a_tenth_with_a_lora_and_stays_as_set() -> None:
    assert load_config(None, {}).train.audio_dropout == 0.0
    assert load_config(None, {"lora_rank": 4}).train.audio_dropout == 0.1
    assert load_config(None, {"lora_rank": 4, "audio_dropout": 0.0}).train.audio_dropout == 0.0
    alone = load_config(None, {"lora_rank": 4, "trainable_modules": ["none"]}).model
    assert alone.trainable_modules == [] and alone.trained_patterns() == (".lora_A.", ".lora_B.")
    assert load_config(None, {"lora_target_modules": ["self_attn.q", "ffn.2"]}).model.lora_target_modules == [
        "attn1.to_q",
        "ffn.net.2",
    ]


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"trainable_modules": ["none"]}, "only with --lora_rank"),
        ({"lora_rank": 4, "lora_target_modules": ["attn2.processor.k_proj"]}, "is not a linear of a Wan block"),
        ({"lora_rank": 4, "lora_dropout": 1.0}, "lora_dropout"),
    ],
)
def test_the_config_refuses_what_cannot_train(overrides: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        load_config(None, overrides)


@pytest.mark.slow
def test_a_lora_run_resumes_bitwise_after_sigterm(tiny_world: dict, tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = world_argv(tiny_world, run, max_train_steps=200, checkpointing_steps=2, lora_dropout=0.1, **LORA)
    output = sigterm_after_first_checkpoint(argv, run)
    assert "SIGTERM" in output, output
    stopped = CheckpointMeta.read(newest_checkpoint(run)).step  # type: ignore[arg-type]
    end = stopped + 2
    common = {"checkpointing_steps": 1000, "lora_dropout": 0.1, **LORA}
    resumed = run_training(
        world_config(tiny_world, run, max_train_steps=end, resume_from_checkpoint="latest", **common), QUIET
    )
    whole = run_training(world_config(tiny_world, tmp_path / "whole", max_train_steps=end, **common), QUIET)
    assert resumed.steps == whole.steps == end
    assert resumed.losses == whole.losses[stopped:]
    a = load_file(run / f"checkpoint-{end}" / "trainable.safetensors")
    b = load_file(tmp_path / "whole" / f"checkpoint-{end}" / "trainable.safetensors")
    assert a.keys() == b.keys() and any(".lora_A." in k for k in a)
    differ = {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, (stopped, output[-2000:], differ)


@pytest.mark.slow
def test_cached_and_online_lora_runs_train_to_the_same_weights(tiny_world: dict, tmp_path: Path) -> None:
    steps = {"max_train_steps": 3, "checkpointing_steps": 3, **LORA}
    cache = tmp_path / "cache"
    report = build_cache(world_config(tiny_world, tmp_path / "unused", cache_dir=cache, **steps))
    assert report.items > 0 and not report.failed
    run_training(world_config(tiny_world, tmp_path / "cached", cache_dir=cache, cache_required=True, **steps), QUIET)
    run_training(world_config(tiny_world, tmp_path / "online", **steps), QUIET)
    cached = load_file(tmp_path / "cached" / "checkpoint-3" / "trainable.safetensors")
    online = load_file(tmp_path / "online" / "checkpoint-3" / "trainable.safetensors")
    assert cached.keys() == online.keys() and any(".lora_B." in k for k in cached)
    for name, want in online.items():
        torch.testing.assert_close(cached[name], want, rtol=0, atol=1e-6)


def _lora_grads(fp8: bool) -> dict[str, torch.Tensor]:
    model = _tiny().requires_grad_(False).to(torch.bfloat16)  # the frozen base as training loads it
    if fp8:
        store_in_fp8(model, torch.bfloat16)
        assert model.blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn
    add_lora(model, LoraSpec(4, 8.0), seed=7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    inputs = {k: v.to(torch.bfloat16) for k, v in _inputs().items() if k != "timestep"}
    out = model(timestep=torch.tensor([500.0]), **inputs)[0]
    out.float().square().mean().backward()
    assert {p.dtype for n, p in model.named_parameters() if ".lora_" in n} == {torch.float32}
    return {n: p.grad for n, p in model.named_parameters() if ".lora_" in n}


def test_the_lora_gradient_through_a_float8_base_agrees_with_bf16() -> None:
    bf16, fp8 = _lora_grads(False), _lora_grads(True)
    assert bf16.keys() == fp8.keys() and bf16
    a = torch.cat([g.flatten().float() for g in bf16.values()])
    b = torch.cat([fp8[k].flatten().float() for k in bf16])
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=0)
    assert cosine > 0.98, cosine
    assert (a - b).norm() / a.norm() < 0.2


def _train(world: dict, run: Path, **overrides: object) -> list[float]:
    return train_in_own_state(world_config(world, run, **LORA, **overrides), QUIET).losses  # its own precision


@pytest.mark.slow
def test_fp8_with_a_lora_trains_within_two_percent_of_bf16(tiny_world: dict, tmp_path: Path) -> None:
    common = {"mixed_precision": "bf16", "max_train_steps": 10, "checkpointing_steps": 10}
    bf16 = _train(tiny_world, tmp_path / "bf16", **common)
    fp8 = _train(tiny_world, tmp_path / "fp8", base_weights_dtype="fp8", **common)
    assert len(fp8) == len(bf16) == 10
    worst = max(abs(a - b) / abs(b) for a, b in zip(fp8, bf16, strict=True))
    assert 0 < worst <= 0.02, worst
    saved = load_file(tmp_path / "fp8" / "checkpoint-10" / "trainable.safetensors")
    assert {v.dtype for k, v in saved.items() if ".lora_" in k} == {torch.float32}


@pytest.mark.slow
@pytest.mark.parametrize(
    "option",
    [
        {"blocks_to_offload": 2, "gradient_checkpointing": True},
        {"activation_offload": True, "gradient_checkpointing": True},
        {"low_vram": True},
    ],
    ids=["block_offload", "activation_offload", "low_vram"],
)
def test_memory_options_with_a_lora_give_the_same_weights(tiny_world: dict, tmp_path: Path, option: dict) -> None:
    """The LoRA weights stay on the device beside the offloaded blocks, like the audio k/v: same weights."""
    common = {"max_train_steps": 3, "checkpointing_steps": 3}
    _train(tiny_world, tmp_path / "plain", **common, gradient_checkpointing=option.get("gradient_checkpointing", False))
    _train(tiny_world, tmp_path / "option", **common, **option)
    want = load_file(tmp_path / "plain" / "checkpoint-3" / "trainable.safetensors")
    got = load_file(tmp_path / "option" / "checkpoint-3" / "trainable.safetensors")
    assert want.keys() == got.keys() and any(".lora_A." in k for k in want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_plan_buckets_counts_the_lora_and_says_the_audio_dropout(tiny_world: dict, tmp_path: Path) -> None:
    from fantasytalk_cli.planning.report import make_plan_report

    report = make_plan_report(world_config(tiny_world, tmp_path / "run", **LORA), world_size=1)
    (note,) = [n for n in report.notes if n.startswith("LoRA rank 4")]
    assert "5,632 parameters" in note and "audio_dropout 0.1 (the default with a LoRA" in note
    assert report.memory is not None and any(t.name == "LoRA activations" for t in report.memory.terms)
    plain = make_plan_report(world_config(tiny_world, tmp_path / "run", **LORA, audio_dropout=0.0), world_size=1)
    assert any("audio_dropout 0 (set:" in n for n in plain.notes)
