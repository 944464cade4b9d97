"""The frozen encoders from either base layout (``docs/weights.md``): the Wan VAE, umT5 and its tokenizer, the
CLIP ViT-H/14 image encoder, and wav2vec2. Each is built on the meta device, checked against its state-dict map and
filled by `weights.load_frozen`; sizes the original ``.pth`` files do not record are read from tensor shapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fantasytalk_cli.config.wan_yaml import WanModelYaml
from fantasytalk_cli.models.key_mapping import Shape
from fantasytalk_cli.models.layout import (
    DIT_SHARD_PREFIX,
    Layout,
    ModelLoadError,
    detect_layout,
    need,
    read_json,
    wan_yaml_or_default,
)
from fantasytalk_cli.models.state_dict_adapters import ClipVisionAdapter, T5Adapter, VaeAdapter, Wav2Vec2Adapter
from fantasytalk_cli.models.weights import (
    Device,
    build_empty,
    init_kwargs,
    load_frozen,
    safetensors_source,
    torch_source,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, PreTrainedTokenizerBase, UMT5EncoderModel

WAN_CLIP_HEADS = 16
"""Attention heads of Wan's open-clip XLM-R ViT-H/14 (width 1280, heads of 80). The ``.pth`` does not record it
(every other size is read from tensor shapes), so the original-layout loader takes it from Wan's model definition."""

WAN_T5_REL_MAX_DISTANCE = 128
"""umT5's relative position ``max_distance`` (Wan's ``T5RelativeEmbedding`` default); not visible in shapes."""


# --------------------------------------------------------------------------------------------------------------------
# The VAE.


def load_vae(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, wan_yaml: WanModelYaml | None = None, device: Device = "cpu"
) -> AutoencoderKLWan:
    """diffusers' ``AutoencoderKLWan`` from ``Wan2.1_VAE.pth`` (sizes read from its shapes) or from ``vae/``."""
    from diffusers import AutoencoderKLWan

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        path = model_dir / wan_yaml_or_default(wan_yaml).vae_kwargs.vae_subpath
        source = torch_source(path, "Wan VAE weights (vae_kwargs.vae_subpath)")
        kwargs = _vae_config_from_shapes(source.shapes, path)
        adapter = VaeAdapter("original")
    else:
        folder = model_dir / "vae"
        kwargs = init_kwargs(AutoencoderKLWan, read_json(folder / "config.json", "diffusers VAE config"), folder)
        source = safetensors_source(folder, DIT_SHARD_PREFIX, "diffusers VAE weights")
        adapter = VaeAdapter("diffusers")
    return load_frozen(build_empty(lambda: AutoencoderKLWan(**kwargs)), source, adapter, dtype=dtype, device=device)


def _vae_config_from_shapes(shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """Wan2.1's VAE architecture with the two sizes its shapes give: ``base_dim`` and ``z_dim`` (16 in Wan2.1)."""
    for key in ("encoder.conv1.weight", "conv2.weight"):
        if key not in shapes:
            raise ModelLoadError(f"{path}: no {key!r}; not a Wan2.1 VAE state dict")
    z_dim = shapes["conv2.weight"][0]
    if z_dim != 16:
        raise ModelLoadError(f"{path}: z_dim {z_dim}; the Wan2.1 VAE (and its latent mean/std) has 16 channels")
    return {"base_dim": shapes["encoder.conv1.weight"][0], "z_dim": z_dim}


# --------------------------------------------------------------------------------------------------------------------
# The text encoder (umT5) and its tokenizer.


def _t5_config_from_shapes(shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """UMT5Config kwargs from Wan's T5 shapes (vocab, width, heads, buckets, FFN width, layers)."""
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
        inner = shapes["blocks.0.attn.q.weight"][0]
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not Wan's umT5 encoder state dict (no {exc})") from exc
    layers = len({k.split(".")[1] for k in shapes if re.match(r"^blocks\.\d+\.", k)})
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": WAN_T5_REL_MAX_DISTANCE,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False,
    }


def build_text_encoder(config: Any) -> UMT5EncoderModel:
    """``UMT5EncoderModel`` on meta with its encoder embedding tied to ``shared`` (one tensor, as in Wan's T5)."""
    from transformers import UMT5EncoderModel

    model = build_empty(lambda: UMT5EncoderModel(config))
    model.encoder.set_input_embeddings(model.shared)
    return model


def load_text_encoder(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, wan_yaml: WanModelYaml | None = None, device: Device = "cpu"
) -> UMT5EncoderModel:
    """transformers' ``UMT5EncoderModel`` from Wan's ``.pth`` (renamed one to one) or from ``text_encoder/``."""
    from transformers import UMT5Config

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        path = model_dir / wan_yaml_or_default(wan_yaml).text_encoder_kwargs.text_encoder_subpath
        source = torch_source(path, "umT5 weights (text_encoder_kwargs.text_encoder_subpath)")
        config = UMT5Config(**_t5_config_from_shapes(source.shapes, path))
        adapter = T5Adapter("original")
    else:
        folder = model_dir / "text_encoder"
        config = UMT5Config.from_dict(read_json(folder / "config.json", "diffusers text encoder config"))
        source = safetensors_source(folder, "model", "diffusers text encoder weights")
        adapter = T5Adapter("diffusers")
    return load_frozen(build_text_encoder(config), source, adapter, dtype=dtype, device=device)


def load_tokenizer(model_dir: Path, *, wan_yaml: WanModelYaml | None = None) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer: ``google/umt5-xxl/`` (``tokenizer_subpath``) or ``tokenizer/``, read offline."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        folder = model_dir / wan_yaml_or_default(wan_yaml).text_encoder_kwargs.tokenizer_subpath
    else:
        folder = model_dir / "tokenizer"
    need(folder, "umT5 tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {exc}") from exc


# --------------------------------------------------------------------------------------------------------------------
# The image encoder (CLIP ViT-H/14).


def _clip_config_from_shapes(shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """CLIPVisionConfig kwargs from open-clip's visual-tower shapes (heads: `WAN_CLIP_HEADS`)."""
    try:
        width, _, patch, _ = shapes["visual.patch_embedding.weight"]
        positions = shapes["visual.pos_embedding"][1]
        intermediate = shapes["visual.transformer.0.mlp.0.weight"][0]
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not an open-clip ViT state dict (no {exc})") from exc
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ModelLoadError(f"{path}: visual.pos_embedding has {positions} positions, not 1 + a square grid")
    layers = len({k.split(".")[2] for k in shapes if re.match(r"^visual\.transformer\.\d+\.", k)})
    config = {
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": WAN_CLIP_HEADS,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    if "visual.head" in shapes:
        config["projection_dim"] = shapes["visual.head"][1]
    return config


def clip_model_prefix(model: nn.Module) -> str:
    """Where the vision tower's names start: ``vision_model.`` (transformers 4) or nothing (transformers 5)."""
    return "vision_model." if hasattr(model, "vision_model") else ""


def load_image_encoder(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, wan_yaml: WanModelYaml | None = None, device: Device = "cpu"
) -> CLIPVisionModel:
    """transformers' ``CLIPVisionModel`` from the open-clip ``.pth`` (fused q/k/v split, text tower dropped) or from
    ``image_encoder/``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        path = model_dir / wan_yaml_or_default(wan_yaml).image_encoder_kwargs.image_encoder_subpath
        source = torch_source(path, "CLIP weights (image_encoder_kwargs.image_encoder_subpath)")
        config = CLIPVisionConfig(**_clip_config_from_shapes(source.shapes, path))
        naming: Layout = "original"
    else:
        folder = model_dir / "image_encoder"
        config = CLIPVisionConfig.from_dict(read_json(folder / "config.json", "diffusers image encoder config"))
        source = safetensors_source(folder, "model", "diffusers image encoder weights")
        naming = "diffusers"
    model = build_empty(lambda: CLIPVisionModel(config))
    return load_frozen(model, source, ClipVisionAdapter(naming, clip_model_prefix(model)), dtype=dtype, device=device)


def load_wav2vec2(folder: Path, *, dtype: torch.dtype = torch.float32, device: Device = "cpu") -> nn.Module:
    """transformers' ``Wav2Vec2Model`` from a ``wav2vec2-base-960h`` folder (the released ``Wav2Vec2ForCTC`` names:
    ``wav2vec2.`` prefix, legacy weight-norm names, the CTC ``lm_head`` dropped with its reason), strictly."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    folder = Path(folder)
    config = Wav2Vec2Config.from_dict(read_json(folder / "config.json", "wav2vec2 config"))
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        source = safetensors_source(folder, "model", "wav2vec2 weights")
    else:
        source = torch_source(folder / "pytorch_model.bin", "wav2vec2 weights (model.safetensors or pytorch_model.bin)")
    model = build_empty(lambda: Wav2Vec2Model(config))
    return load_frozen(model, source, Wav2Vec2Adapter(), dtype=dtype, device=device)
