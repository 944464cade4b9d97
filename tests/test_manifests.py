"""Every real checkpoint file's key names and shapes (the shared manifests) map onto our models, on names only.

For each manifest, the matching state-dict adapter is run against the model built with the REAL config on the meta
device: every stored key must land on a parameter of the same shape (or be dropped with a stated reason) and every
parameter must be filled (or be allow-listed with a reason). This is also what pins the diffusers converters we rely
on (``convert_wan_transformer_to_diffusers``, ``convert_wan_vae_to_diffusers``): a change in their renames fails here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from fantasytalk_cli.models import dit_config, frozen_loading, key_mapping, trainable, weights
from fantasytalk_cli.models import state_dict_adapters as sda
from fantasytalk_cli.models.dims import WAN21_I2V_14B_CONFIG, wan_config

MANIFESTS = Path(__file__).resolve().parent / "manifests"  # the real checkpoint files' names and shapes


def manifest(name: str) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of one manifest file."""
    tensors = json.loads((MANIFESTS / name).read_text())["tensors"]
    return {key: tuple(info["shape"]) for key, info in tensors.items()}


@cache
def real_dit() -> nn.Module:
    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    return weights.build_empty(lambda: FantasyTalkingTransformer(**WAN21_I2V_14B_CONFIG))


@cache
def real_vae() -> nn.Module:
    from diffusers import AutoencoderKLWan

    return weights.build_empty(lambda: AutoencoderKLWan())


REAL_T5 = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
}
REAL_CLIP = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1024,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}


@cache
def real_t5() -> nn.Module:
    from transformers import UMT5Config

    return frozen_loading.build_text_encoder(UMT5Config(**REAL_T5))


@cache
def real_clip() -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return weights.build_empty(lambda: CLIPVisionModel(CLIPVisionConfig(**REAL_CLIP)))


@cache
def real_wav2vec2() -> nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return weights.build_empty(lambda: Wav2Vec2Model(Wav2Vec2Config()))


def flatten_ckpt_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``proj_model/<name>`` -> ``proj_model.<name>``: the loader's flattening of the released nested ckpt."""
    return {key.replace("/", ".", 1): shape for key, shape in shapes.items()}


def adapter_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if trainable.is_adapter_name(name)}


def clip_dropped(stored: dict[str, tuple[int, ...]]) -> int:
    """The open-clip file's keys dropped on purpose: the whole text tower, log_scale, visual.head."""
    return sum(k.startswith("textual.") for k in stored) + 2


# manifest file -> (model builder, adapter builder, which parameters may be absent, stored keys dropped on purpose)
Case = tuple[
    Callable[[], nn.Module],
    Callable[[nn.Module], key_mapping.StateDictAdapter],
    str,
    Callable[[dict[str, tuple[int, ...]]], int],
]
CASES: dict[str, Case] = {
    "wan21_i2v_14b_original_transformer.json": (real_dit, lambda m: sda.DitAdapter("original"), "adapter", lambda s: 0),
    "diffusers_wan21_i2v_14b_transformer.json": (
        real_dit,
        lambda m: sda.DitAdapter("diffusers"),
        "adapter",
        lambda s: 0,
    ),
    "fantasytalking_model_ckpt.json": (
        real_dit,
        lambda m: sda.AdapterFileAdapter("fantasytalking"),
        "base",
        lambda s: 0,
    ),
    "wan21_vae_original.json": (real_vae, lambda m: sda.VaeAdapter("original"), "none", lambda s: 0),
    "diffusers_wan21_vae.json": (real_vae, lambda m: sda.VaeAdapter("diffusers"), "none", lambda s: 0),
    "wan21_t5_umt5_xxl_original.json": (real_t5, lambda m: sda.T5Adapter("original"), "none", lambda s: 0),
    "transformers_umt5_xxl_encoder.json": (real_t5, lambda m: sda.T5Adapter("diffusers"), "none", lambda s: 0),
    "wan21_clip_original.json": (
        real_clip,
        lambda m: sda.ClipVisionAdapter("original", frozen_loading.clip_model_prefix(m)),
        "none",
        clip_dropped,
    ),
    "transformers_clip_vit_h14_vision.json": (
        real_clip,
        lambda m: sda.ClipVisionAdapter("diffusers", frozen_loading.clip_model_prefix(m)),
        "none",
        lambda s: 1,
    ),
    "transformers_wav2vec2_base_960h.json": (real_wav2vec2, lambda m: sda.Wav2Vec2Adapter(), "none", lambda s: 0),
    "wav2vec2_base_960h_released.json": (real_wav2vec2, lambda m: sda.Wav2Vec2Adapter(), "none", lambda s: 2),
}


def test_every_manifest_has_a_case() -> None:
    assert sorted(p.name for p in MANIFESTS.glob("*.json")) == sorted(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_manifest_maps_every_key_and_fills_every_parameter(name: str) -> None:
    build, make_adapter, absent_kind, ignored = CASES[name]
    model = build()
    stored = manifest(name)
    if name == "fantasytalking_model_ckpt.json":
        stored = flatten_ckpt_names(stored)
    shapes, aliases = weights.model_shapes(model)
    plan = key_mapping.plan_mapping(make_adapter(model), stored, shapes, aliases)
    assert plan.ok, plan.problems(name)

    adapter = adapter_names(model)
    expected_absent = {"adapter": adapter, "base": set(shapes) - adapter, "none": set()}[absent_kind]
    assert set(plan.absent) == expected_absent
    assert len(plan.ignored) == ignored(stored), sorted(plan.ignored)
    assert all(reason for reason in plan.ignored.values())
    assert len(plan.moves) + len(plan.ignored) == len(stored)


def test_clip_ignored_keys_say_why() -> None:
    model = real_clip()
    plan = key_mapping.plan_mapping(
        sda.ClipVisionAdapter("original", frozen_loading.clip_model_prefix(model)),
        manifest("wan21_clip_original.json"),
        weights.model_shapes(model)[0],
    )
    reasons = set(plan.ignored.values())
    assert reasons == {sda.CLIP_TEXT_TOWER_IGNORED, sda.CLIP_LOG_SCALE_IGNORED, sda.CLIP_PROJECTION_IGNORED}
    assert all(k.startswith("textual.") or k in ("log_scale", "visual.head") for k in plan.ignored)


def test_t5_tied_embedding_is_one_tensor_either_name_fills_it() -> None:
    model = real_t5()
    shapes, aliases = weights.model_shapes(model)
    assert aliases == {"encoder.embed_tokens.weight": "shared.weight"}
    stored = manifest("transformers_umt5_xxl_encoder.json")
    renamed = {("encoder.embed_tokens.weight" if k == "shared.weight" else k): v for k, v in stored.items()}
    for variant in (renamed, {**stored, "encoder.embed_tokens.weight": stored["shared.weight"]}):
        assert key_mapping.plan_mapping(sda.T5Adapter("diffusers"), variant, shapes, aliases).ok


def test_reverse_names_invert_the_diffusers_converters() -> None:
    dit_orig, dit_ours = (
        manifest("wan21_i2v_14b_original_transformer.json"),
        manifest("diffusers_wan21_i2v_14b_transformer.json"),
    )
    assert {sda.dit_name_to_original(k): v for k, v in dit_ours.items()} == dit_orig
    adapter = [n for n in adapter_names(real_dit())]
    renamed = {sda.dit_name_to_original(n): n for n in adapter}
    forward = sda.DitAdapter("original")
    forward.prepare(list(dit_orig) + list(renamed))
    assert all(forward.targets(old)[0][0] == new for old, new in renamed.items())

    vae_orig, vae_ours = manifest("wan21_vae_original.json"), manifest("diffusers_wan21_vae.json")
    assert {sda.vae_name_to_original(k): v for k, v in vae_ours.items()} == vae_orig

    t5_orig, t5_ours = manifest("wan21_t5_umt5_xxl_original.json"), manifest("transformers_umt5_xxl_encoder.json")
    assert {sda.t5_name_to_original(k): v for k, v in t5_ours.items()} == t5_orig

    clip_ours = manifest("transformers_clip_vit_h14_vision.json")
    meta = {k: torch.empty(v, device="meta") for k, v in clip_ours.items()}
    back = {k: tuple(t.shape) for k, t in sda.clip_vision_to_original(meta).items()}
    assert back == {k: v for k, v in manifest("wan21_clip_original.json").items() if k.startswith("visual.")}


def test_original_configs_read_from_real_shapes() -> None:
    wan_config_json = {  # Wan-AI/Wan2.1-I2V-14B-720P config.json (Wan's own keys)
        "_class_name": "WanModel",
        "_diffusers_version": "0.30.0",
        "dim": 5120,
        "eps": 1e-06,
        "ffn_dim": 13824,
        "freq_dim": 256,
        "in_dim": 36,
        "model_type": "i2v",
        "num_heads": 40,
        "num_layers": 40,
        "out_dim": 16,
        "text_len": 512,
    }
    shapes = manifest("wan21_i2v_14b_original_transformer.json")
    assert dit_config.dit_config_from_original(wan_config_json, shapes, Path("config.json")) == wan_config(
        WAN21_I2V_14B_CONFIG
    )
    t5 = frozen_loading._t5_config_from_shapes(manifest("wan21_t5_umt5_xxl_original.json"), Path("t5.pth"))
    assert t5 == REAL_T5
    clip = frozen_loading._clip_config_from_shapes(manifest("wan21_clip_original.json"), Path("clip.pth"))
    assert clip == REAL_CLIP
    vae = frozen_loading._vae_config_from_shapes(manifest("wan21_vae_original.json"), Path("vae.pth"))
    assert vae == {"base_dim": 96, "z_dim": 16}
