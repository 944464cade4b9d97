"""The memory options on the tiny world: fp8 storage halves the frozen DiT's linear weights and trains within a
stated tolerance of bf16; activation offload trains to bitwise the same weights (checkpointing on and off); the
combinations that cannot work are refused with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from fantasytalk_cli.config import load_config
from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.data.metadata_write import write_entries_atomic
from fantasytalk_cli.models.dims import WAN21_I2V_14B_CONFIG
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.tiny import TINY_AUDIO_DIMS
from fantasytalk_cli.models.trainable import set_trainable
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import build_empty
from fantasytalk_cli.planning.fit import OPTION_ORDER, MemoryOptions, cheapest_fitting, fit_warning, search_space
from fantasytalk_cli.planning.memory import estimate_memory
from fantasytalk_cli.planning.model_size import TransformerDims, block_params
from fantasytalk_cli.planning.report import make_plan_report
from fantasytalk_cli.runtime.block_offload import offload_blocks
from fantasytalk_cli.runtime.memory_options import MemoryOptionError, check_memory_options, store_in_fp8
from tests.test_plan import entry as plan_entry
from tests.tiny_world import train_in_own_state, world_config

FP8_LOSS_TOLERANCE = 0.02
"""Largest |loss(fp8) - loss(bf16)| over 10 steps allowed, relative to the bf16 loss (measured here: 0.0055)."""


def test_fp8_storage_halves_the_linear_weights_and_leaves_the_adapter(tiny_world: dict[str, Path]) -> None:
    model = load_transformer(tiny_world["model"], dtype=torch.bfloat16, adapter_dtype=torch.float32, **TINY_AUDIO_DIMS)
    set_trainable(model, ["processor.", "proj_model."])
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("blocks.")
              and "processor" not in n and "norm" not in n}  # fmt: skip
    before = sum(m.weight.numel() * 2 for n, m in model.named_modules() if n in linear)
    store_in_fp8(model, torch.bfloat16)
    after = sum(m.weight.numel() * m.weight.element_size() for n, m in model.named_modules() if n in linear)
    assert after * 2 == before
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert model.scale_shift_table.dtype == torch.float32  # modulation tables and norms keep their precision


def test_fp8_streams_shard_by_shard_into_float8(tiny_world: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """`--base_weights_dtype fp8` loads each block linear straight into float8 (the host never holds the DiT in
    bf16): bitwise the file's values cast to float8 (the tiny files are fp32: one rounding, not two via bf16), every
    other weight as a bf16 load gives it."""
    import fantasytalk_cli.models.weights as weights

    assigned: dict[str, torch.dtype] = {}
    real_set_tensor = weights.set_tensor

    def recording(model: torch.nn.Module, name: str, value: torch.Tensor, **kwargs: object) -> None:
        assigned[name] = kwargs["dtype"]  # type: ignore[assignment]
        real_set_tensor(model, name, value, **kwargs)  # type: ignore[arg-type]

    def fp8_storage(meta: FantasyTalkingTransformer) -> None:
        set_trainable(meta, ["processor.", "proj_model."])
        store_in_fp8(meta, torch.bfloat16)

    load = {"dtype": torch.bfloat16, "adapter_dtype": torch.float32, **TINY_AUDIO_DIMS}
    monkeypatch.setattr(weights, "set_tensor", recording)
    torch.manual_seed(0)  # the same fresh adapter for both
    streamed = load_transformer(tiny_world["model"], on_meta=fp8_storage, **load)  # type: ignore[arg-type]
    monkeypatch.undo()
    torch.manual_seed(0)
    cast_after = load_transformer(tiny_world["model"], **{**load, "dtype": torch.float32})  # type: ignore[arg-type]
    set_trainable(cast_after, ["processor.", "proj_model."])
    store_in_fp8(cast_after, torch.bfloat16)
    linear = "blocks.0.ffn.net.0.proj.weight"
    assert assigned[linear] == torch.float8_e4m3fn and streamed.get_parameter(linear).dtype == torch.float8_e4m3fn
    streamed_state, after_state = streamed.state_dict(), cast_after.state_dict()
    assert streamed_state.keys() == after_state.keys()
    for name, tensor in after_state.items():
        got = streamed_state[name]
        if tensor.dtype == torch.float8_e4m3fn:
            assert got.dtype == tensor.dtype and torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
        else:
            assert got.dtype != torch.float8_e4m3fn and torch.equal(got, tensor.to(got.dtype)), name


def test_fp8_halves_the_frozen_14b() -> None:
    """The real 14B config, built on the meta device: its frozen bytes in fp8 storage are half those in bf16 (the
    embeddings, norms, modulation tables and output head kept in bf16 are about 1.5% of it)."""
    model = build_empty(lambda: FantasyTalkingTransformer(**WAN21_I2V_14B_CONFIG)).to(torch.bfloat16)
    set_trainable(model, ["processor.", "proj_model."])
    bf16 = sum(p.numel() * 2 for p in model.parameters() if not p.requires_grad)
    fp8 = store_in_fp8(model, torch.bfloat16)
    assert 0.5 <= fp8 / bf16 <= 0.51, fp8 / bf16  # measured 0.507


def _train(world: dict[str, Path], run: Path, **overrides: object) -> list[float]:
    cfg = world_config(world, run, **overrides)
    return train_in_own_state(cfg, Console(quiet=True)).losses


def test_fp8_trains_within_tolerance_of_bf16(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    common = {"mixed_precision": "bf16", "max_train_steps": 10, "checkpointing_steps": 10}
    bf16 = _train(tiny_world, tmp_path / "bf16", **common)
    fp8 = _train(tiny_world, tmp_path / "fp8", base_weights_dtype="fp8", **common)
    assert len(fp8) == len(bf16) == 10
    worst = max(abs(a - b) / abs(b) for a, b in zip(fp8, bf16, strict=True))
    assert 0 < worst <= FP8_LOSS_TOLERANCE, worst


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_offload_gives_the_same_weights(
    tiny_world: dict[str, Path], tmp_path: Path, checkpointing: bool
) -> None:
    common = {"max_train_steps": 4, "checkpointing_steps": 4, "gradient_checkpointing": checkpointing}
    _train(tiny_world, tmp_path / "plain", **common)
    _train(tiny_world, tmp_path / "offload", activation_offload=True, **common)
    want = load_file(tmp_path / "plain" / "checkpoint-4" / "trainable.safetensors")
    got = load_file(tmp_path / "offload" / "checkpoint-4" / "trainable.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_fp8_is_refused_where_deepspeed_or_fsdp_own_the_weights(strategy: str) -> None:
    with pytest.raises(MemoryOptionError, match=f"fp8 cannot run under {strategy}.*DDP"):
        check_memory_options(ModelConfig(base_weights_dtype="fp8"), strategy)
    check_memory_options(ModelConfig(base_weights_dtype="fp8"), "ddp")
    check_memory_options(ModelConfig(activation_offload=True), strategy)


BF16, OFFLOAD, FP8, FP8_OFFLOAD = OPTION_ORDER


@pytest.mark.parametrize(
    ("totals_gb", "capacity_gb", "expected"),
    [
        ({BF16: 60, OFFLOAD: 50, FP8: 40, FP8_OFFLOAD: 30}, 80, BF16),  # fits as is: nothing to pass
        ({BF16: 75, OFFLOAD: 50, FP8: 40, FP8_OFFLOAD: 30}, 80, OFFLOAD),  # 75 > 0.9 x 80: offload before fp8
        ({BF16: 75, OFFLOAD: 73, FP8: 60, FP8_OFFLOAD: 30}, 80, FP8),  # bf16 cannot fit: fp8
        ({BF16: 99, OFFLOAD: 90, FP8: 80, FP8_OFFLOAD: 70}, 80, FP8_OFFLOAD),
        ({BF16: 99, OFFLOAD: 90, FP8: 80, FP8_OFFLOAD: 75}, 80, None),  # nothing fits
        ({BF16: 99, OFFLOAD: 60}, 80, OFFLOAD),  # ZeRO/FSDP: no fp8 combinations to choose from
        ({BF16: 99, OFFLOAD: 90}, 80, None),
    ],
)
def test_cheapest_fitting_combination(
    totals_gb: dict[MemoryOptions, int], capacity_gb: int, expected: MemoryOptions | None
) -> None:
    totals = {opt: gb * 10**9 for opt, gb in totals_gb.items()}
    assert cheapest_fitting(totals, capacity_gb * 10**9) == expected


def test_estimate_covers_the_options() -> None:
    """On the 14B at 512x512x81 with checkpointing: fp8 removes about half the frozen weights (one block's upcast
    copy kept for the backward), offload keeps one block's activations on the GPU."""
    shape = (512, 512, 81)
    base = estimate_memory(WAN21_I2V_14B_CONFIG, shape, gradient_checkpointing=True)
    fp8 = estimate_memory(WAN21_I2V_14B_CONFIG, shape, gradient_checkpointing=True, base_weights_dtype="fp8")
    offload = estimate_memory(WAN21_I2V_14B_CONFIG, shape, gradient_checkpointing=True, activation_offload=True)
    frozen = next(t.bytes for t in base.terms if t.name == "frozen DiT weights")
    saved = base.total_bytes - fp8.total_bytes
    assert 0.45 * frozen < saved < 0.5 * frozen
    assert base.total_bytes > offload.total_bytes
    act = next(t for t in offload.terms if t.name.startswith("activations"))
    assert "offload" in act.name and "host memory" in act.formula


def test_plan_names_the_cheapest_fitting_options(tmp_path: Path) -> None:
    """plan-buckets --gpu_memory on the 14B config: every bucket says what fits, and a note lists the options."""
    meta = tmp_path / "meta.json"
    write_entries_atomic(meta, [plan_entry(i, 512, 512, 120, 25.0) for i in range(4)])
    cfg = load_config(None, {"train_data_meta": meta, "video_sample_size": 512, "video_sample_n_frames": 81,
                             "gradient_checkpointing": True})  # fmt: skip
    for gpu_gb in (24, 48, 80):
        report = make_plan_report(cfg, world_size=1, gpu_memory_gb=gpu_gb)
        assert report.fits_with and set(report.fits_with) == set(report.bucket_memory)
        assert any(
            n.startswith(f"memory options for the largest bucket (512x512x81) on {gpu_gb} GB") for n in report.notes
        )
    roomy = make_plan_report(cfg, world_size=1, gpu_memory_gb=200)
    assert any(n.startswith("memory options") and n.endswith("it fits as it is: no memory option needed")
               for n in roomy.notes), roomy.notes  # fmt: skip


def test_train_warns_when_the_chosen_options_do_not_fit() -> None:
    """The warning `train` prints on a GPU before its first step (here with a stated capacity)."""

    def estimate(options: MemoryOptions) -> object:
        return estimate_memory(
            WAN21_I2V_14B_CONFIG, (512, 512, 81), gradient_checkpointing=True,
            base_weights_dtype=options.base_weights_dtype, activation_offload=options.activation_offload,
        )  # fmt: skip

    assert fit_warning(estimate, MemoryOptions(), 200 * 10**9, fp8_allowed=True) is None  # type: ignore[arg-type]
    warning = fit_warning(estimate, MemoryOptions(), 80 * 10**9, fp8_allowed=True)  # type: ignore[arg-type]
    assert warning is not None and "512x512x81" in warning and "pass --activation_offload" in warning
    hopeless = fit_warning(estimate, MemoryOptions(), 24 * 10**9, fp8_allowed=False)  # type: ignore[arg-type]
    assert hopeless is not None and "no memory option fits" in hopeless


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_offload_gives_the_same_weights(tiny_world: dict[str, Path], tmp_path: Path, checkpointing: bool) -> None:
    common = {"max_train_steps": 4, "checkpointing_steps": 4, "gradient_checkpointing": checkpointing}
    _train(tiny_world, tmp_path / "plain", **common)
    _train(tiny_world, tmp_path / "offload", blocks_to_offload=2, **common)
    want = load_file(tmp_path / "plain" / "checkpoint-4" / "trainable.safetensors")
    got = load_file(tmp_path / "offload" / "checkpoint-4" / "trainable.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_block_offload_moves_only_frozen_weights_each_forward_and_recompute(tiny_world: dict[str, Path]) -> None:
    """The hooks copy the frozen weights in for the forward and for the recompute of gradient checkpointing, and
    put the host copies back; the adapter's trainable k/v are never moved."""
    model = load_transformer(tiny_world["model"], **TINY_AUDIO_DIMS)
    set_trainable(model, ["processor.", "proj_model."])
    model.enable_gradient_checkpointing()
    model.train()
    trainable = {n: p.data_ptr() for n, p in model.named_parameters() if p.requires_grad}
    offload = offload_blocks(model, 1, torch.device("cpu"))
    assert offload is not None
    last = model.blocks[-1]
    host = [p.data_ptr() for p in last.parameters() if not p.requires_grad]
    cfg = model.config
    hidden = torch.randn(1, 36, 2, 4, 4)
    out = model(hidden, torch.tensor([500.0]), torch.randn(1, 6, cfg.text_dim), torch.randn(1, 5, cfg.image_dim),
                torch.randn(1, 20, cfg.audio_in_dim), 1.0)[0]  # fmt: skip
    out.square().mean().backward()
    assert offload.onloads == 2  # the forward, then the recompute in the backward
    frozen = [p for p in last.parameters() if not p.requires_grad]
    assert [p.data_ptr() for p in frozen] == host  # the host copies are back in place
    assert all(
        p.data_ptr() == trainable[n] and p.grad is not None for n, p in model.named_parameters() if p.requires_grad
    )


def test_block_offload_is_refused_where_zero3_or_fsdp_shard_the_weights() -> None:
    for strategy in ("zero3", "fsdp"):
        with pytest.raises(MemoryOptionError, match=f"blocks_to_offload cannot run under {strategy}: ZeRO-3 and FSDP"):
            check_memory_options(ModelConfig(blocks_to_offload=4), strategy)
    for strategy in ("ddp", "zero2"):  # the frozen weights stay plain module parameters (2-process test for ZeRO-2)
        check_memory_options(ModelConfig(blocks_to_offload=4), strategy)
    assert search_space("zero2", {"num_layers": 40}) == {"fp8_allowed": False, "max_blocks": 40}
    assert search_space("zero3", {"num_layers": 40}) == {"fp8_allowed": False, "max_blocks": 0}
    assert search_space("ddp", {"num_layers": 40}) == {"fp8_allowed": True, "max_blocks": 40}


def test_fewest_offloaded_blocks_first_then_bf16() -> None:
    two_blocks = MemoryOptions("bf16", False, 2)
    totals = {BF16: 99 * 10**9, FP8: 70 * 10**9, two_blocks: 60 * 10**9, MemoryOptions("bf16", False, 1): 75 * 10**9}
    assert cheapest_fitting(totals, 80 * 10**9) == FP8  # fp8 without offloaded blocks before bf16 with 2
    del totals[FP8]
    assert cheapest_fitting(totals, 80 * 10**9) == two_blocks  # 1 block (75 GB) is over 90% of 80 GB
    assert two_blocks.flags() == "--blocks_to_offload 2"


def test_estimate_of_block_offload() -> None:
    """With checkpointing, offloading n blocks frees n - 2 blocks' frozen weights (one computes, one is prefetched);
    without checkpointing nothing (autograd keeps every block's device copy)."""
    shape = (512, 512, 81)
    base = estimate_memory(WAN21_I2V_14B_CONFIG, shape, gradient_checkpointing=True)
    ten = estimate_memory(WAN21_I2V_14B_CONFIG, shape, gradient_checkpointing=True, blocks_to_offload=10)
    per_block = block_params(TransformerDims.from_config(WAN21_I2V_14B_CONFIG)) * 2
    assert base.total_bytes - ten.total_bytes == 8 * per_block
    no_gc = estimate_memory(WAN21_I2V_14B_CONFIG, shape, blocks_to_offload=10)
    assert no_gc.total_bytes == estimate_memory(WAN21_I2V_14B_CONFIG, shape).total_bytes


def test_fp8_refuses_a_trainable_base_weight_before_anything_loads(tiny_world: dict[str, Path]) -> None:
    """A --trainable_modules pattern that reaches a block linear cannot train in float8: refused on the meta model,
    naming the weights and the fix."""

    def fp8_storage(meta: FantasyTalkingTransformer) -> None:
        set_trainable(meta, ["processor.", "blocks.0.ffn"])
        store_in_fp8(meta, torch.bfloat16)

    with pytest.raises(MemoryOptionError, match=r"makes \d+ of them trainable.*blocks\.0\.ffn.*keep --base"):
        load_transformer(tiny_world["model"], dtype=torch.bfloat16, on_meta=fp8_storage, **TINY_AUDIO_DIMS)


def test_all_options_compose_with_low_vram(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    """fp8, activation offload and an offloaded block together, with and without `low_vram` (which only moves the
    encoders between host and device around their use): bitwise the same weights after 4 steps."""
    common = {"max_train_steps": 4, "checkpointing_steps": 4, "gradient_checkpointing": True,
              "base_weights_dtype": "fp8", "activation_offload": True, "blocks_to_offload": 1}  # fmt: skip
    _train(tiny_world, tmp_path / "resident", **common)
    _train(tiny_world, tmp_path / "low_vram", low_vram=True, **common)
    want = load_file(tmp_path / "resident" / "checkpoint-4" / "trainable.safetensors")
    got = load_file(tmp_path / "low_vram" / "checkpoint-4" / "trainable.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_too_many_offloaded_blocks_are_refused_before_anything_loads(
    tiny_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The count is checked against the DiT config's blocks at set-up's start, not after the 14B has loaded."""

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the models were loaded before the block count was checked")

    monkeypatch.setattr("fantasytalk_cli.train.setup.load_training_models", must_not_load)
    with pytest.raises(MemoryOptionError, match="--blocks_to_offload 3: the transformer has 2 blocks; give at most 2"):
        _train(tiny_world, tmp_path / "run", blocks_to_offload=3)
    assert not (tmp_path / "run").exists()
