"""`convert/lora_formats.py` on a tiny real Wan DiT with a real peft LoRA (r=4, alpha=8: scale 2, so a lost alpha
shows): the diffusers file loads through diffusers' own Wan loader, the merge equals the LoRA'd model, and the ComfyUI
and musubi-tuner key sets are checked against small re-statements of those projects' rules (cited where used)."""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fantasytalk_cli.convert.lora_formats import (
    DIFFUSERS_METADATA_KEY,
    LoraFormatError,
    LoraPair,
    lora_pairs,
    merge_lora,
    to_comfyui,
    to_diffusers,
    to_kohya,
)
from fantasytalk_cli.models.dims import TINY_CONFIG, wan_config
from fantasytalk_cli.models.state_dict_adapters import dit_name_to_original
from fantasytalk_cli.models.trainable import LORA_TARGETS

RANK, ALPHA = 4, 8.0
TOLERANCE = 1e-5


@dataclass
class Setup:
    base: nn.Module
    lora: nn.Module
    trained: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    reference: torch.Tensor
    lora_modules: set[str]


def _tiny_transformer() -> nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**wan_config(TINY_CONFIG)).eval()


def _forward(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def setup() -> Setup:
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

    base = _tiny_transformer()
    lora = copy.deepcopy(base)
    # every block linear ftalk may wrap, the image k/v included (diffusers' and musubi's I2V forms have them)
    lora.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LORA_TARGETS), init_lora_weights=True))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in lora.named_parameters():
            if ".lora_B." in name:  # peft starts B at zero: make the LoRA matter
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    # ftalk's trained dict: peft's names (`...lora_A.default.weight`) beside the audio adapter, which is no LoRA
    trained = {name: tensor.clone() for name, tensor in lora.state_dict().items() if ".lora_" in name}
    trained["proj_model.proj.weight"] = torch.randn(32, 32, generator=generator)
    trained["blocks.0.attn2.processor.k_proj.weight"] = torch.randn(32, 32, generator=generator)
    trained["blocks.0.attn2.processor.v_proj.weight"] = torch.randn(32, 32, generator=generator)
    inputs = {
        "hidden_states": torch.randn(1, 36, 2, 4, 4, generator=generator),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, TINY_CONFIG["text_dim"], generator=generator),
        "encoder_hidden_states_image": torch.randn(1, 3, TINY_CONFIG["image_dim"], generator=generator),
    }
    reference = _forward(lora, inputs)
    assert _relative(_forward(base, inputs), reference) > 0.05  # the LoRA changes the output
    modules = {name for name, module in lora.named_modules() if isinstance(module, LoraLayer)}
    return Setup(base, lora, trained, inputs, reference, modules)


@pytest.fixture(scope="module")
def pairs(setup: Setup) -> dict[str, LoraPair]:
    return lora_pairs(setup.trained)


@contextmanager
def load_warnings() -> Iterator[list[str]]:
    """The warnings diffusers logs (its logger does not propagate to pytest's caplog) and those peft raises (a config
    that disagrees with the state dict it injects)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as raised:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in raised)
    finally:
        logger.removeHandler(handler)


def _load_with_diffusers(setup: Setup, source: str | dict[str, torch.Tensor], *, metadata: bool = True) -> nn.Module:
    """A fresh copy of the base with the LoRA loaded as ``WanPipeline.load_lora_weights`` does: its
    ``lora_state_dict`` (which converts ComfyUI / musubi keys), then ``load_lora_into_transformer``."""
    from diffusers import WanPipeline

    state, found = WanPipeline.lora_state_dict(source, return_lora_metadata=True)
    model = copy.deepcopy(setup.base)
    with load_warnings() as messages:
        WanPipeline.load_lora_into_transformer(state, transformer=model, metadata=found if metadata else None)
    assert not messages, messages  # missing / unexpected LoRA keys, or a config at odds with the tensors
    return model


def _injected(model: nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, module in model.named_modules() if isinstance(module, LoraLayer)}


# --------------------------------------------------------------------------------------------------------------------
# Reading ftalk's state dict.


def test_pairs_are_peft_modules_with_a_down_and_an_up(setup: Setup, pairs: dict[str, LoraPair]) -> None:
    from peft.utils import get_peft_model_state_dict

    assert set(pairs) == setup.lora_modules  # the audio adapter and the base weights are left out
    weights = dict(setup.base.named_modules())
    for module, pair in pairs.items():
        linear = weights[module]
        assert isinstance(linear, nn.Linear)
        assert pair.down.shape == (RANK, linear.in_features)
        assert pair.up.shape == (linear.out_features, RANK)
        assert torch.equal(pair.down, setup.trained[f"{module}.lora_A.default.weight"])
        assert torch.equal(pair.up, setup.trained[f"{module}.lora_B.default.weight"])
    # peft's own state dict drops the adapter name (`...lora_A.weight`): the same pairs
    stripped = get_peft_model_state_dict(setup.lora)
    assert all(".default." not in key for key in stripped)
    again = lora_pairs(stripped)
    assert set(again) == set(pairs)
    assert all(torch.equal(again[m].up, pairs[m].up) and torch.equal(again[m].down, pairs[m].down) for m in pairs)


def test_a_half_pair_is_refused(pairs: dict[str, LoraPair]) -> None:
    down = pairs["blocks.0.attn1.to_q"].down
    with pytest.raises(LoraFormatError, match=r"lora_A of blocks\.0\.attn1\.to_q has no lora_B"):
        lora_pairs({"blocks.0.attn1.to_q.lora_A.default.weight": down})
    with pytest.raises(LoraFormatError, match=r"lora_B of blocks\.1\.ffn\.net\.2 has no lora_A"):
        lora_pairs({"blocks.1.ffn.net.2.lora_B.weight": pairs["blocks.1.ffn.net.2"].up})


def test_mismatched_ranks_are_refused(pairs: dict[str, LoraPair]) -> None:
    pair = pairs["blocks.0.attn1.to_q"]
    with pytest.raises(LoraFormatError, match=r"blocks\.0\.attn1\.to_q: rank mismatch.*rank 4.*rank 3"):
        lora_pairs(
            {
                "blocks.0.attn1.to_q.lora_A.default.weight": pair.down,
                "blocks.0.attn1.to_q.lora_B.default.weight": pair.up[:, :3],
            }
        )


@pytest.mark.parametrize(
    ("key", "what"),
    [
        ("lora_unet_blocks_0_self_attn_q.lora_down.weight", "not peft's"),  # kohya's names
        ("blocks.0.attn1.to_q.alpha", "not peft's"),
        ("blocks.0.attn1.to_q.lora_B.default.bias", "not peft's"),  # peft's lora_bias=True
        ("blocks.0.attn1.to_q.lora_magnitude_vector.default.weight", "not peft's"),  # DoRA
        ("blocks.0.attn1.to_q.lora_A.other.weight", "adapter 'other'"),
        ("blocks.0.attn2.processor.k_proj.lora_A.default.weight", "audio adapter"),
    ],
)
def test_other_lora_forms_are_refused_by_name(key: str, what: str) -> None:
    with pytest.raises(LoraFormatError, match=re.escape(key) + ".*" + re.escape(what)):
        lora_pairs({key: torch.zeros(4, 32)})


# --------------------------------------------------------------------------------------------------------------------
# diffusers.


def test_diffusers_file_loads_through_diffusers_and_reproduces_the_lora(
    setup: Setup, pairs: dict[str, LoraPair], tmp_path: Path
) -> None:
    tensors, metadata = to_diffusers(pairs, ALPHA, RANK)
    assert set(tensors) == {f"transformer.{m}.lora_{s}.weight" for m in pairs for s in "AB"}
    config = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    assert config["transformer.r"] == RANK and config["transformer.lora_alpha"] == ALPHA
    assert metadata["format"] == "pt"
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata=metadata)

    loaded = _load_with_diffusers(setup, str(path))
    assert _injected(loaded) == setup.lora_modules
    config = loaded.peft_config[next(iter(loaded.peft_config))]
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)
    assert _relative(_forward(loaded, setup.inputs), setup.reference) < TOLERANCE

    # without the metadata diffusers takes alpha = rank (scale 1, not 2): the output is another one
    plain = _load_with_diffusers(setup, load_file(str(path)), metadata=False)
    assert _injected(plain) == setup.lora_modules
    assert _relative(_forward(plain, setup.inputs), setup.reference) > 1e-3


def test_to_diffusers_refuses_a_rank_that_is_not_the_recorded_one(pairs: dict[str, LoraPair]) -> None:
    with pytest.raises(LoraFormatError, match=r"has rank 4, not the recorded rank 8"):
        to_diffusers(pairs, ALPHA, 8)


# --------------------------------------------------------------------------------------------------------------------
# Merging.


def test_merged_base_reproduces_the_lora(setup: Setup, pairs: dict[str, LoraPair]) -> None:
    base = setup.base.state_dict()
    merged = merge_lora(base, pairs, ALPHA, RANK)
    assert set(merged) == set(base)
    plain = copy.deepcopy(setup.base)
    plain.load_state_dict(merged)
    assert _relative(_forward(plain, setup.inputs), setup.reference) < TOLERANCE
    assert all(torch.equal(merged[k], base[k]) for k in base if k.removesuffix(".weight") not in pairs)

    unchanged = merge_lora(base, pairs, ALPHA, RANK, scale=0.0)
    assert all(torch.equal(unchanged[k], base[k]) for k in base)
    half = {k: v.to(torch.bfloat16) for k, v in base.items()}
    assert all(v.dtype == torch.bfloat16 for v in merge_lora(half, pairs, ALPHA, RANK).values())


def test_merge_refuses_a_module_the_base_lacks_or_a_shape_it_disagrees_with(
    setup: Setup, pairs: dict[str, LoraPair]
) -> None:
    base = setup.base.state_dict()
    lacking = {k: v for k, v in base.items() if k != "blocks.1.attn2.to_k.weight"}
    with pytest.raises(LoraFormatError, match=r"LoRA on blocks\.1\.attn2\.to_k, but the base weights have no"):
        merge_lora(lacking, pairs, ALPHA, RANK)
    other = {**base, "blocks.0.ffn.net.2.weight": torch.zeros(32, 16)}
    with pytest.raises(LoraFormatError, match=r"LoRA on blocks\.0\.ffn\.net\.2 is \[32, 64\].*is \[32, 16\]"):
        merge_lora(other, pairs, ALPHA, RANK)


# --------------------------------------------------------------------------------------------------------------------
# ComfyUI. A re-statement of its rules, read in Comfy-Org/ComfyUI (formerly comfyanonymous/ComfyUI):
# - comfy/sd.py load_lora_for_models: key_map = model_lora_keys_unet(model); lora = lora_convert.convert_lora(lora);
#   patches = load_lora(lora, key_map).
# - comfy/lora.py model_lora_keys_unet: every model key k starting "diffusion_model." and ending ".weight" is named by
#   "lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_") and by k[:-len(".weight")] (the
#   "generic lora format"); a key not ending in ".weight" names itself. It has no Wan branch (the SD3, Flux,
#   HunyuanVideo ... branches add "transformer.<diffusers name>" keys for those models only), and ComfyUI's Wan model
#   (comfy/ldm/wan/model.py) keeps Wan's original names: blocks.N.self_attn.q, cross_attn.k_img, ffn.0, ffn.2 ...
# - comfy/lora_convert.py convert_lora: for Wan only Wan-Fun's "lora_unet__" (double underscore) is rewritten.
# - comfy/lora.py load_lora: "<x>.alpha" is read with .item(); comfy/weight_adapter/lora.py LoRAAdapter.load takes
#   the first (up, down) pair present among the suffixes below; calculate_weight adds
#   strength * alpha / down.shape[0] * up @ down (no alpha: factor 1). Unread keys are logged "lora key not loaded".

COMFY_PAIR_SUFFIXES = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
    (".lora_B.default.weight", ".lora_A.default.weight"),
)


def comfy_key_map(model_keys: Iterable[str]) -> dict[str, str]:
    key_map: dict[str, str] = {}
    for k in model_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model.") : -len(".weight")].replace(".", "_")] = k
                key_map[k[: -len(".weight")]] = k
            else:
                key_map[k] = k
    return key_map


@dataclass
class ComfyPatch:
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None


def comfy_load(lora: Mapping[str, torch.Tensor], key_map: Mapping[str, str]) -> tuple[dict[str, ComfyPatch], set[str]]:
    """(patches by model key, the LoRA keys left unread)."""
    if "lora_unet__blocks_0_cross_attn_k.lora_down.weight" in lora:  # Wan-Fun
        lora = {k.replace("lora_unet__", "lora_unet_", 1): v for k, v in lora.items()}
    patches: dict[str, ComfyPatch] = {}
    read: set[str] = set()
    for x, target in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            read.add(f"{x}.alpha")
        for up, down in COMFY_PAIR_SUFFIXES:
            if x + up in lora:
                patches[target] = ComfyPatch(lora[x + up], lora[x + down], alpha)
                read.update((x + up, x + down))
                break
    return patches, set(lora) - read


def comfy_merge(model: Mapping[str, torch.Tensor], patches: Mapping[str, ComfyPatch]) -> dict[str, torch.Tensor]:
    merged = dict(model)
    for key, patch in patches.items():
        factor = 1.0 if patch.alpha is None else patch.alpha / patch.down.shape[0]
        merged[key] = model[key] + factor * (patch.up @ patch.down)
    return merged


def _comfy_model(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tiny transformer as ComfyUI holds it: ``diffusion_model.`` + Wan's original names."""
    return {"diffusion_model." + dit_name_to_original(name): tensor for name, tensor in state.items()}


def _check_in_comfyui(setup: Setup, pairs: dict[str, LoraPair], lora: dict[str, torch.Tensor]) -> None:
    base = setup.base.state_dict()
    model = _comfy_model(base)
    patches, unread = comfy_load(lora, comfy_key_map(model))
    assert not unread
    expected = {"diffusion_model." + dit_name_to_original(f"{m}.weight"): m for m in pairs}
    assert set(patches) == set(expected)
    for key, module in expected.items():
        patch = patches[key]
        assert patch.alpha == ALPHA
        assert torch.equal(patch.down, pairs[module].down) and torch.equal(patch.up, pairs[module].up)
        assert patch.up.shape[0] == model[key].shape[0] and patch.down.shape[1] == model[key].shape[1]
    ours = _comfy_model(merge_lora(base, pairs, ALPHA, RANK))
    theirs = comfy_merge(model, patches)
    assert all(torch.allclose(theirs[k], ours[k], rtol=TOLERANCE, atol=1e-6) for k in model)


def test_comfyui_keys_resolve_to_wan_weights_with_their_alpha(setup: Setup, pairs: dict[str, LoraPair]) -> None:
    lora = to_comfyui(pairs, ALPHA)
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in lora
    assert "diffusion_model.blocks.1.cross_attn.v_img.lora_B.weight" in lora
    assert "diffusion_model.blocks.0.ffn.0.alpha" in lora
    assert len(lora) == 3 * len(pairs)
    assert all(v.ndim == 0 and v.item() == ALPHA for k, v in lora.items() if k.endswith(".alpha"))
    _check_in_comfyui(setup, pairs, lora)


def test_comfyui_file_also_loads_through_diffusers(setup: Setup, pairs: dict[str, LoraPair], tmp_path: Path) -> None:
    path = tmp_path / "comfy.safetensors"
    save_file(to_comfyui(pairs, ALPHA), str(path))
    loaded = _load_with_diffusers(setup, str(path))  # diffusers folds the alpha into the matrices
    assert _injected(loaded) == setup.lora_modules
    assert _relative(_forward(loaded, setup.inputs), setup.reference) < TOLERANCE


# --------------------------------------------------------------------------------------------------------------------
# musubi-tuner (kohya). A re-statement of its Wan network, read in kohya-ss/musubi-tuner:
# - src/musubi_tuner/networks/lora_wan.py: WAN_TARGET_REPLACE_MODULES = ["WanAttentionBlock"], prefix "lora_unet",
#   exclude pattern r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*" (fullmatch on
#   the module name); its Wan model keeps Wan's original names (blocks.N.self_attn.q ...).
# - src/musubi_tuner/networks/lora.py LoRANetwork.create_modules: every Linear child of a target module,
#   original_name = name + "." + child_name, lora_name = f"lora_unet.{original_name}".replace(".", "_");
#   LoRAModule: lora_down Linear(in, r) [r, in], lora_up Linear(r, out) [out, r], buffer "alpha", scale alpha / r;
#   state dict "<lora_name>.lora_down.weight", ".lora_up.weight", ".alpha".
#   create_network_from_weights: lora_name = key.split(".")[0]; "alpha" in key -> its alpha, "lora_down" in key -> its
#   rank = shape[0].

MUSUBI_EXCLUDE = re.compile(r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*")


def musubi_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """musubi's LoRA module names over the tiny transformer (each block is a WanAttentionBlock), in Wan names."""
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not re.fullmatch(r"blocks\.\d+", name):
            continue
        for child_name, child in module.named_modules():
            if isinstance(child, nn.Linear):
                original_name = dit_name_to_original(f"{name}.{child_name}.weight").removesuffix(".weight")
                if not MUSUBI_EXCLUDE.fullmatch(original_name):
                    found[f"lora_unet.{original_name}".replace(".", "_")] = child
    return found


def test_kohya_keys_are_musubi_modules_with_their_alpha(setup: Setup, pairs: dict[str, LoraPair]) -> None:
    lora = to_kohya(pairs, ALPHA)
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in lora
    assert "lora_unet_blocks_1_cross_attn_k_img.lora_up.weight" in lora
    assert "lora_unet_blocks_0_ffn_2.alpha" in lora
    modules = musubi_modules(setup.base)
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in lora.items():
        lora_name, _, suffix = key.partition(".")
        assert lora_name in modules, key
        assert suffix in ("lora_down.weight", "lora_up.weight", "alpha"), key
        linear = modules[lora_name]
        if "alpha" in key:
            assert value.ndim == 0
            alphas[lora_name] = value.item()
        elif "lora_down" in key:
            assert value.shape == (RANK, linear.in_features)
            ranks[lora_name] = value.shape[0]
        else:
            assert value.shape == (linear.out_features, RANK)
    assert set(ranks) == set(alphas) == {n for n in modules if any(k.startswith(n + ".") for k in lora)}
    assert len(ranks) == len(pairs) and set(alphas.values()) == {ALPHA}
    _check_in_comfyui(setup, pairs, lora)  # ComfyUI's lora_unet_ rule resolves them too


def test_kohya_file_also_loads_through_diffusers(setup: Setup, pairs: dict[str, LoraPair], tmp_path: Path) -> None:
    path = tmp_path / "musubi.safetensors"
    save_file(to_kohya(pairs, ALPHA), str(path))
    loaded = _load_with_diffusers(setup, str(path))
    assert _injected(loaded) == setup.lora_modules
    assert _relative(_forward(loaded, setup.inputs), setup.reference) < TOLERANCE


def test_exports_own_their_tensors(pairs: dict[str, LoraPair]) -> None:
    pair = pairs["blocks.0.attn2.to_k"]
    for tensors in (to_diffusers(pairs, ALPHA, RANK)[0], to_comfyui(pairs, ALPHA), to_kohya(pairs, ALPHA)):
        assert all(t.data_ptr() not in (pair.down.data_ptr(), pair.up.data_ptr()) for t in tensors.values())


def test_an_export_needs_a_lora_and_a_positive_alpha(pairs: dict[str, LoraPair]) -> None:
    with pytest.raises(LoraFormatError, match="trained without --lora_rank"):
        to_comfyui({}, ALPHA)
    with pytest.raises(LoraFormatError, match="must be > 0"):
        to_kohya(pairs, 0.0)
