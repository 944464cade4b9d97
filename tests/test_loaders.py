"""Loaders on tiny models written in the real layouts: both layouts load to the same models, every adapter form
loads strictly and round-trips, broken files fail naming the file and key, and loading streams into meta tensors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from fantasytalk_cli.models import dit_loading, weights
from fantasytalk_cli.models.adapter_file import adapter_to_format, load_adapter_or_transformer
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.frozen_loading import load_image_encoder, load_text_encoder, load_vae
from fantasytalk_cli.models.layout import ModelLoadError, detect_layout
from fantasytalk_cli.models.state_dict_adapters import DitAdapter
from fantasytalk_cli.models.tiny import TINY_AUDIO_DIMS, TINY_DIT, make_tiny_model
from fantasytalk_cli.models.transformer import adapter_state_dict

SHARD_2 = "diffusion_pytorch_model-00002-of-00003.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same seed written in both layouts."""
    root = tmp_path_factory.mktemp("tiny")
    return {layout: make_tiny_model(root / layout, layout=layout, seed=0).path for layout in ("original", "diffusers")}


@pytest.fixture
def broken(tiny: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the original-layout folder to damage."""
    return Path(shutil.copytree(tiny["original"], tmp_path / "model"))


def dit(path: Path, **kwargs: Any) -> Any:
    return load_transformer(path, **TINY_AUDIO_DIMS, **kwargs)


def dit_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, TINY_DIT["in_channels"], 2, 4, 4, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 16, TINY_DIT["text_dim"], generator=g),
        "encoder_hidden_states_image": torch.randn(1, 257, TINY_DIT["image_dim"], generator=g),
        "audio_features": torch.randn(1, 20, TINY_DIT["audio_in_dim"], generator=g),
    }


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, different[:10]


# --------------------------------------------------------------------------------------------------------------------
# Both layouts, same weights, same outputs.


def test_layouts_are_detected(tiny: dict[str, Path], tmp_path: Path) -> None:
    assert detect_layout(tiny["original"]) == "original"
    assert detect_layout(tiny["diffusers"]) == "diffusers"
    with pytest.raises(ModelLoadError, match="is neither the original Wan2.1 layout"):
        detect_layout(tmp_path)


def test_both_layouts_give_the_same_dit_outputs(tiny: dict[str, Path]) -> None:
    models = {}
    for layout, path in tiny.items():
        model = dit(path)
        report = load_adapter_or_transformer(path / "fantasytalking_model.ckpt", model)
        assert (report.form, report.content) == ("fantasytalking", "adapter")
        models[layout] = model
    assert_same_state(models["original"], models["diffusers"])
    with torch.no_grad():
        out = {layout: model(**dit_inputs())[0] for layout, model in models.items()}
        silent = models["original"](**dit_inputs(), audio_scale=0.0)[0]
    assert out["original"].shape == (1, TINY_DIT["out_channels"], 2, 4, 4)
    assert (out["original"] - out["diffusers"]).abs().max() < 1e-6
    assert (out["original"] - silent).abs().max() > 1e-4, "the released tiny adapter (non-zero k/v) must matter"


def test_both_layouts_give_the_same_encoders(tiny: dict[str, Path]) -> None:
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, 3, 5, 16, 24, generator=g) * 2 - 1
    images = torch.rand(1, 3, 224, 224, generator=g) * 2 - 1
    ids = torch.randint(3, 100, (2, 9), generator=g)
    outs: dict[str, list[torch.Tensor]] = {}
    for layout, path in tiny.items():
        vae, t5, clip = load_vae(path), load_text_encoder(path), load_image_encoder(path)
        with torch.no_grad():
            outs[layout] = [
                vae.encode(pixels).latent_dist.mean,
                t5(input_ids=ids).last_hidden_state,
                clip(pixel_values=images, output_hidden_states=True).hidden_states[-2],
            ]
    for a, b in zip(outs["original"], outs["diffusers"], strict=True):
        assert (a - b).abs().max() < 1e-6


def test_t5_ffn_weights_land_where_wan_uses_them(tiny: dict[str, Path]) -> None:
    """Wan's FFN is fc2(fc1(x) * gelu_tanh(gate(x))): gate.0 must be transformers' wi_0 (the GELU branch)."""
    wan = torch.load(tiny["original"] / "models_t5_umt5-xxl-enc-bf16.pth", weights_only=True)
    model = load_text_encoder(tiny["original"])
    x = torch.randn(1, 3, 32)
    w = {k: v.float() for k, v in wan.items() if k.startswith("blocks.0.ffn.")}
    expected = F.linear(
        F.linear(x, w["blocks.0.ffn.fc1.weight"])
        * F.gelu(F.linear(x, w["blocks.0.ffn.gate.0.weight"]), approximate="tanh"),
        w["blocks.0.ffn.fc2.weight"],
    )
    with torch.no_grad():
        got = model.encoder.block[0].layer[1].DenseReluDense(x)
    assert (got - expected).abs().max() < 1e-5


def test_dtype_cast_keeps_diffusers_fp32_modules(tiny: dict[str, Path]) -> None:
    model = dit(tiny["original"], dtype=torch.bfloat16, adapter_dtype=torch.float32)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.scale_shift_table.dtype == torch.float32  # diffusers' _keep_in_fp32_modules
    assert model.blocks[0].norm2.weight.dtype == torch.float32
    assert model.proj_model.proj.weight.dtype == torch.float32
    assert torch.count_nonzero(model.blocks[0].attn2.processor.k_proj.weight) == 0, "fresh adapter: zero k/v"


# --------------------------------------------------------------------------------------------------------------------
# The adapter in every form, and whole transformers.


def write_form(data: dict[str, Any], fmt: str, folder: Path) -> Path:
    if fmt == "fantasytalking":
        path = folder / "fantasytalking_model.ckpt"
        torch.save(data, path)
    else:
        path = folder / f"{fmt}.safetensors"
        save_file({k: v.detach().clone().contiguous() for k, v in data.items()}, str(path))
    return path


@pytest.mark.parametrize(
    ("fmt", "whole"),
    [
        ("fantasytalking", False),
        ("flat", False),
        ("comfyui", False),
        ("diffusers", False),
        ("original", False),
        ("diffusers", True),
        ("original", True),
    ],
)
def test_adapter_forms_round_trip(tiny: dict[str, Path], tmp_path: Path, fmt: str, whole: bool) -> None:
    source = dit(tiny["original"])
    load_adapter_or_transformer(tiny["original"] / "fantasytalking_model.ckpt", source)
    state = source.state_dict() if whole else adapter_state_dict(source)
    path = write_form(adapter_to_format(state, fmt), fmt, tmp_path)  # type: ignore[arg-type]

    target = dit(tiny["diffusers"])
    if whole:  # a whole transformer replaces the base weights too
        with torch.no_grad():
            for param in target.parameters():
                param.zero_()
    report = load_adapter_or_transformer(path, target)
    assert report.form == fmt
    assert report.content == ("transformer+adapter" if whole else "adapter")
    assert report.tensors == len(state)
    assert_same_state(source, target)


def test_the_released_ckpt_layout(tiny: dict[str, Path]) -> None:
    ckpt = torch.load(tiny["original"] / "fantasytalking_model.ckpt", weights_only=True)
    assert set(ckpt) == {"proj_model", "audio_processor"}
    assert set(ckpt["proj_model"]) == {"proj.weight", "norm.weight", "norm.bias"}
    assert set(ckpt["audio_processor"]) == {
        f"blocks.{i}.cross_attn.processor.{kv}.weight"
        for i in range(TINY_DIT["num_layers"])
        for kv in ("k_proj", "v_proj")
    }
    assert all(torch.count_nonzero(t) > 0 for t in ckpt["audio_processor"].values())


def test_a_base_only_transformer_keeps_the_adapter(tiny: dict[str, Path], tmp_path: Path) -> None:
    source = dit(tiny["original"])
    base = {k: v for k, v in source.state_dict().items() if k not in adapter_state_dict(source)}
    path = write_form(adapter_to_format(base, "original"), "original", tmp_path)
    target = dit(tiny["original"])
    load_adapter_or_transformer(tiny["original"] / "fantasytalking_model.ckpt", target)
    before = {k: v.clone() for k, v in adapter_state_dict(target).items()}
    report = load_adapter_or_transformer(path, target)
    assert (report.form, report.content) == ("original", "transformer")
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(target).items())


def test_adapter_file_errors_name_the_key(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = dit(tiny["original"])
    flat = adapter_to_format(adapter_state_dict(model), "flat")
    partial = {k: v for k, v in flat.items() if "blocks.1." not in k}
    with pytest.raises(ModelLoadError, match=r"blocks\.1\.attn2\.processor\.k_proj\.weight"):
        load_adapter_or_transformer(write_form(partial, "flat", tmp_path), model)
    extra = {**flat, "audio_processor.blocks.0.cross_attn.processor.q_proj.weight": torch.zeros(2, 2)}
    with pytest.raises(ModelLoadError, match=r"flat\.safetensors.*\n.*unexpected[\s\S]*q_proj"):
        load_adapter_or_transformer(write_form(extra, "flat", tmp_path), model)
    with pytest.raises(ValueError, match="not an audio adapter parameter"):
        adapter_to_format({"proj_out.weight": torch.zeros(1)}, "comfyui")


# --------------------------------------------------------------------------------------------------------------------
# Broken files: clear errors naming the file and the key.


def test_truncated_shard_names_file_and_tensor(broken: Path) -> None:
    shard = broken / SHARD_2
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    last_key = max(load_file_header(data).items(), key=lambda kv: kv[1]["data_offsets"][1])[0]
    with pytest.raises(ModelLoadError) as err:
        dit(broken)
    assert SHARD_2 in str(err.value) and "truncated" in str(err.value) and last_key in str(err.value)


def load_file_header(data: bytes) -> dict[str, Any]:
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    header.pop("__metadata__", None)
    return header


def test_missing_files_are_named(broken: Path) -> None:
    (broken / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(ModelLoadError, match=r"Wan2\.1_VAE\.pth: missing"):
        load_vae(broken)
    (broken / SHARD_2).unlink()
    with pytest.raises(ModelLoadError, match=rf"{SHARD_2}: missing shard .*e\.g\. 'blocks\."):
        dit(broken)


def rewrite_shard(folder: Path, change: Any) -> None:
    """Load shard 2, let ``change`` edit its dict, save it and keep the index in step."""
    state = load_file(str(folder / SHARD_2))
    change(state)
    save_file(state, str(folder / SHARD_2))
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != SHARD_2} | dict.fromkeys(state, SHARD_2)
    (folder / INDEX).write_text(json.dumps(index))


def test_wrong_shape_names_key_and_shard(broken: Path) -> None:
    key = sorted(load_file(str(broken / SHARD_2)))[0]

    def widen(state: dict[str, torch.Tensor]) -> None:
        state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)

    rewrite_shard(broken, widen)
    with pytest.raises(ModelLoadError, match=rf"wrong shape[\s\S]*{key}.*\[in {SHARD_2}\]"):
        dit(broken)


def test_unexpected_and_missing_keys_are_listed(broken: Path) -> None:
    key = sorted(load_file(str(broken / SHARD_2)))[0]

    def swap(state: dict[str, torch.Tensor]) -> None:
        state["blocks.0.self_attn.extra.weight"] = state.pop(key)

    rewrite_shard(broken, swap)
    with pytest.raises(ModelLoadError) as err:
        dit(broken)
    message = str(err.value)
    assert "unexpected keys" in message and "blocks.0.self_attn.extra.weight" in message and SHARD_2 in message
    renames = DitAdapter("original")
    renames.prepare([key])
    assert "does not provide" in message and renames.targets(key)[0][0] in message


def test_shard_and_index_must_agree(broken: Path) -> None:
    index = json.loads((broken / INDEX).read_text())
    index["weight_map"]["blocks.0.ghost.weight"] = SHARD_2
    (broken / INDEX).write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=rf"{SHARD_2}: keys differ from {INDEX}.*ghost"):
        dit(broken)


def test_corrupt_pth_is_named(broken: Path) -> None:
    path = broken / "models_t5_umt5-xxl-enc-bf16.pth"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match=r"models_t5_umt5-xxl-enc-bf16\.pth: cannot read the torch checkpoint"):
        load_text_encoder(broken)


def test_unknown_config_key_is_refused(broken: Path) -> None:
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "num_layer": 3}))
    with pytest.raises(ModelLoadError, match=r"config\.json: keys Wan's WanModel does not take: \['num_layer'\]"):
        dit(broken)


# --------------------------------------------------------------------------------------------------------------------
# How files are read.


def test_torch_load_is_always_weights_only(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    path = tiny["original"]
    load_vae(path), load_text_encoder(path), load_image_encoder(path)
    load_adapter_or_transformer(path / "fantasytalking_model.ckpt", dit(path))
    assert len(calls) == 4
    assert all(call.get("weights_only") is True and call.get("mmap") is True for call in calls)


def test_dit_streams_into_meta_tensors(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing is materialised before it is read: at every read, the elements on a real device are at most the
    elements read so far (one copy, not a full state dict then a model)."""
    built: list[torch.nn.Module] = []
    real_build, real_read = dit_loading.build_empty, weights._read_tensor
    monkeypatch.setattr(dit_loading, "build_empty", lambda factory: built.append(real_build(factory)) or built[-1])
    seen = {"read": 0, "checks": 0}

    def spy(handle: Any, key: str, path: Path) -> torch.Tensor:
        model = built[-1]
        materialised = sum(p.numel() for p in model.parameters() if not p.is_meta)
        assert materialised <= seen["read"], f"{materialised} elements real before reading {key}"
        tensor = real_read(handle, key, path)
        seen["read"] += tensor.numel()
        seen["checks"] += 1
        return tensor

    monkeypatch.setattr(weights, "_read_tensor", spy)
    model = dit(tiny["original"])
    base = [p for n, p in model.named_parameters() if n not in adapter_state_dict(model)]
    assert seen["checks"] == len(base) and seen["read"] == sum(p.numel() for p in base)
    assert not any(p.is_meta for p in model.parameters())


def test_model_yaml_subpaths_are_followed(broken: Path) -> None:
    from fantasytalk_cli.config.wan_yaml import WanModelYaml

    (broken / "vae").mkdir()
    (broken / "Wan2.1_VAE.pth").rename(broken / "vae" / "Wan2.1_VAE.pth")
    with pytest.raises(ModelLoadError, match=r"Wan2\.1_VAE\.pth: missing .*vae_kwargs\.vae_subpath"):
        load_vae(broken)
    wan_yaml = WanModelYaml.model_validate({"vae_kwargs": {"vae_subpath": "vae/Wan2.1_VAE.pth"}})
    assert load_vae(broken, wan_yaml=wan_yaml).config.z_dim == 16
