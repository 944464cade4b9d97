"""How each stored checkpoint format names its tensors, mapped to our models' parameter names and back.

Pure name and shape logic, no file I/O: `weights.stream_into` streams tensors through these maps,
`tests/test_manifests.py` runs them on the real files' names and shapes (no weights), `tiny` and the converter use
the reverse direction to write each format. A stored key is either moved to a parameter (possibly sliced, squeezed
or transposed), or dropped with a stated reason; a parameter nothing fills is an error unless an allow-list
entry gives the reason.

Relies on two diffusers internals (not public API; the manifest tests fail if they change):
``diffusers.loaders.single_file_utils.convert_wan_transformer_to_diffusers`` and ``convert_wan_vae_to_diffusers``.
Both are key-only renames, so they run here on ``{name: name}`` to get the name table, never on tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import torch

from fantasytalk_cli.models.key_mapping import IDENTITY, StateDictAdapter, Target, Templates, Transform
from fantasytalk_cli.models.trainable import is_adapter_name

# --------------------------------------------------------------------------------------------------------------------
# The Wan DiT: original names <-> diffusers names (+ the adapter).

ADAPTER_ABSENT_FROM_BASE = (
    "the FantasyTalking audio adapter is not part of the Wan2.1 base weights: it comes from --transformer_path or "
    "starts fresh (k/v zero-initialised)"
)


def _converter_renames(convert: Callable[..., dict[str, object]], keys: Iterable[str], what: str) -> dict[str, str]:
    """Run a diffusers key-only converter on ``{key: key}`` and return ``{stored: ours}``; fail on a collision."""
    keys = list(keys)
    converted = convert({key: key for key in keys})
    renames = {str(old): new for new, old in converted.items()}
    if len(renames) != len(keys) or set(renames) != set(keys):
        lost = sorted(set(keys) - set(renames))[:10]
        raise ValueError(f"diffusers' {what} converter merged or dropped keys (e.g. {lost}): its renames changed")
    return renames


def _wan_transformer_converter() -> Callable[..., dict[str, object]]:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers


def _wan_vae_converter() -> Callable[..., dict[str, object]]:
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    return convert_wan_vae_to_diffusers


class DitAdapter(StateDictAdapter):
    """The Wan2.1 DiT in original (``self_attn.q``...) or diffusers (``attn1.to_q``...) names.

    ``adapter_absent``: what may be missing. ``"base"`` (a base model folder: the adapter may be absent),
    ``"any"`` (a full transformer file: either part may be absent; the loader then checks all-or-none), or ``None``.
    """

    def __init__(
        self, naming: Literal["original", "diffusers"], adapter_absent: Literal["base", "any"] | None = "base"
    ) -> None:
        self.name = naming
        self.adapter_absent = adapter_absent
        self._renames: dict[str, str] = {}

    def prepare(self, keys: Iterable[str]) -> None:
        if self.name == "original":
            self._renames = _converter_renames(_wan_transformer_converter(), keys, "Wan transformer")

    def targets(self, key: str) -> list[Target] | None:
        return [(self._renames.get(key, key) if self.name == "original" else key, IDENTITY)]

    def absent_reason(self, target: str) -> str | None:
        if self.adapter_absent == "base" and is_adapter_name(target):
            return ADAPTER_ABSENT_FROM_BASE
        if self.adapter_absent == "any":
            return (
                "a transformer file without the audio adapter: the adapter keeps its current weights"
                if is_adapter_name(target)
                else "a transformer file holding only the audio adapter: the base weights stay as loaded"
            )
        return None


def dit_name_to_original(name: str) -> str:
    """Our (diffusers) DiT parameter name -> Wan's original name; the inverse of diffusers' converter.

    Checked against ``convert_wan_transformer_to_diffusers`` on every real name by ``tests/test_manifests.py``.
    """
    prefix_renames = (
        ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
        ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
        ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
        ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
        ("condition_embedder.time_proj.", "time_projection.1."),
        ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
        ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
        ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
        ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
        ("proj_out.", "head.head."),
    )
    if name == "scale_shift_table":
        return "head.modulation"
    for old, new in prefix_renames:
        if name.startswith(old):
            return new + name[len(old) :]
    match = re.match(r"^(blocks\.\d+)\.(.+)$", name)
    if not match:
        return name
    block, rest = match.groups()
    if rest == "scale_shift_table":
        return f"{block}.modulation"
    rest = re.sub(r"^norm([23])\.", lambda m: f"norm{5 - int(m[1])}.", rest)  # diffusers swapped norm2/norm3
    rest = re.sub(r"^ffn\.net\.0\.proj\.", "ffn.0.", rest)
    rest = re.sub(r"^ffn\.net\.2\.", "ffn.2.", rest)
    attn = re.match(r"^attn([12])\.(.+)$", rest)
    if attn:
        part = "self_attn" if attn[1] == "1" else "cross_attn"
        tail = attn[2]
        for old, new in (
            ("to_out.0.", "o."),
            ("to_q.", "q."),
            ("to_k.", "k."),
            ("to_v.", "v."),
            ("add_k_proj.", "k_img."),
            ("add_v_proj.", "v_img."),
            ("norm_added_k.", "norm_k_img."),
        ):
            if tail.startswith(old):
                tail = new + tail[len(old) :]
                break
        rest = f"{part}.{tail}"
    return f"{block}.{rest}"


# --------------------------------------------------------------------------------------------------------------------
# The audio adapter files.

AdapterForm = Literal["fantasytalking", "flat", "comfyui"]

_FANTASYTALKING_NAMES = Templates(
    [
        ("proj_model.{rest}", "proj_model.{rest}"),
        ("audio_processor.blocks.{i}.cross_attn.processor.{kv}.weight", "blocks.{i}.attn2.processor.{kv}.weight"),
    ]
)
"""The released ``fantasytalking_model.ckpt`` ({'proj_model': ..., 'audio_processor': ...}, flattened with a dot) and
the flat safetensors form share these names."""

_COMFYUI_NAMES = Templates(
    [
        ("proj_model.{rest}", "proj_model.{rest}"),
        ("blocks.{i}.cross_attn.{kv}.weight", "blocks.{i}.attn2.processor.{kv}.weight"),
    ]
)

ADAPTER_ONLY_ABSENT = "an adapter file holds only the audio adapter: the base weights stay as loaded"


class AdapterFileAdapter(StateDictAdapter):
    """An adapter-only file: the released nested ckpt (flattened), the flat safetensors, or the ComfyUI re-pack."""

    def __init__(self, form: AdapterForm) -> None:
        self.name = form
        self._names = _COMFYUI_NAMES if form == "comfyui" else _FANTASYTALKING_NAMES

    def targets(self, key: str) -> list[Target] | None:
        target = self._names.forward(key)
        return None if target is None else [(target, IDENTITY)]

    def absent_reason(self, target: str) -> str | None:
        return None if is_adapter_name(target) else ADAPTER_ONLY_ABSENT


def adapter_name_to_form(name: str, form: AdapterForm) -> str:
    """Our adapter parameter name -> its name in an adapter file of ``form`` (flattened for the nested ckpt)."""
    names = _COMFYUI_NAMES if form == "comfyui" else _FANTASYTALKING_NAMES
    stored = names.backward(name)
    if stored is None:
        raise ValueError(f"{name} is not an audio adapter parameter; a {form} adapter file cannot hold it")
    return stored


# --------------------------------------------------------------------------------------------------------------------
# The VAE.


class VaeAdapter(StateDictAdapter):
    """``Wan2.1_VAE.pth`` (Wan names, via diffusers' converter) or the diffusers ``vae/`` folder (identity)."""

    def __init__(self, naming: Literal["original", "diffusers"]) -> None:
        self.name = naming
        self._renames: dict[str, str] = {}

    def prepare(self, keys: Iterable[str]) -> None:
        if self.name == "original":
            self._renames = _converter_renames(_wan_vae_converter(), keys, "Wan VAE")

    def targets(self, key: str) -> list[Target] | None:
        return [(self._renames.get(key, key) if self.name == "original" else key, IDENTITY)]


_VAE_RESNET = (
    ("norm1.gamma", "residual.0.gamma"),
    ("conv1.", "residual.2."),
    ("norm2.gamma", "residual.3.gamma"),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)


def _vae_resnet_tail(tail: str) -> str:
    for new, old in _VAE_RESNET:
        if tail.startswith(new):
            return old + tail[len(new) :]
    return tail


def vae_name_to_original(name: str) -> str:
    """Our (diffusers ``AutoencoderKLWan``) VAE name -> Wan's ``Wan2.1_VAE.pth`` name; the inverse of the converter.

    Holds for Wan2.1's layout (4 levels, 2 residual blocks each: the converter itself hard-codes that).
    """
    for new, old in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
        if name.startswith(new):
            return old + name[len(new) :]
    side, _, rest = name.partition(".")
    for new, old in (("conv_in.", "conv1."), ("norm_out.", "head.0."), ("conv_out.", "head.2.")):
        if rest.startswith(new):
            return f"{side}.{old}{rest[len(new) :]}"
    match = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", rest)
    if match:
        kind, index, tail = match[1], int(match[2]), match[3]
        if kind == "attentions":
            return f"{side}.middle.1.{tail}"
        return f"{side}.middle.{2 * index}.{_vae_resnet_tail(tail)}"
    match = re.match(r"^down_blocks\.(\d+)\.(.+)$", rest)
    if match:
        return f"{side}.downsamples.{match[1]}.{_vae_resnet_tail(match[2])}"
    match = re.match(r"^up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.+)$", rest)
    if match:
        block, kind, index, tail = int(match[1]), match[2], int(match[3]), match[4]
        if kind == "upsamplers":
            return f"{side}.upsamples.{4 * block + 3}.{tail}"
        return f"{side}.upsamples.{4 * block + index}.{_vae_resnet_tail(tail)}"
    return name


# --------------------------------------------------------------------------------------------------------------------
# umT5-XXL: Wan's T5Encoder names <-> transformers' UMT5EncoderModel names (242 tensors, one to one).

T5_NAMES = Templates(
    [
        ("token_embedding.weight", "shared.weight"),
        ("norm.weight", "encoder.final_layer_norm.weight"),
        ("blocks.{i}.norm1.weight", "encoder.block.{i}.layer.0.layer_norm.weight"),
        ("blocks.{i}.attn.{qkvo}.weight", "encoder.block.{i}.layer.0.SelfAttention.{qkvo}.weight"),
        (
            "blocks.{i}.pos_embedding.embedding.weight",
            "encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        ("blocks.{i}.norm2.weight", "encoder.block.{i}.layer.1.layer_norm.weight"),
        ("blocks.{i}.ffn.gate.0.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_0.weight"),
        ("blocks.{i}.ffn.fc1.weight", "encoder.block.{i}.layer.1.DenseReluDense.wi_1.weight"),
        ("blocks.{i}.ffn.fc2.weight", "encoder.block.{i}.layer.1.DenseReluDense.wo.weight"),
    ]
)
"""Wan's T5 (``wan/modules/t5.py``): the gate ``ffn.gate.0`` (GELU-tanh) is transformers' ``wi_0``, ``ffn.fc1`` the
linear branch ``wi_1``, ``ffn.fc2`` the output ``wo``; every block has its own relative position table (umT5)."""

T5_TIED = {"encoder.embed_tokens.weight": "shared.weight"}
"""The encoder's token embedding is the shared embedding (Wan's T5Encoder has one ``token_embedding``); the loader
ties them, so either name (or both) may be stored."""


class T5Adapter(StateDictAdapter):
    """``models_t5_umt5-xxl-enc-bf16.pth`` (Wan names) or the diffusers ``text_encoder/`` (transformers names)."""

    def __init__(self, naming: Literal["original", "diffusers"]) -> None:
        self.name = naming

    def targets(self, key: str) -> list[Target] | None:
        if self.name == "diffusers":
            return [(key, IDENTITY)]
        target = T5_NAMES.forward(key)
        return None if target is None else [(target, IDENTITY)]


def t5_name_to_original(name: str) -> str:
    """transformers' UMT5EncoderModel name -> Wan's T5Encoder name."""
    stored = T5_NAMES.backward(T5_TIED.get(name, name))
    if stored is None:
        raise ValueError(f"{name} has no counterpart in Wan's T5 encoder")
    return stored


# --------------------------------------------------------------------------------------------------------------------
# The CLIP image encoder: open-clip XLM-R ViT-H/14 names <-> transformers' CLIPVisionModel names.

CLIP_VISION_NAMES = Templates(
    [
        ("visual.patch_embedding.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.pre_norm.{p}", "vision_model.pre_layrnorm.{p}"),
        ("visual.post_norm.{p}", "vision_model.post_layernorm.{p}"),
        ("visual.transformer.{i}.norm1.{p}", "vision_model.encoder.layers.{i}.layer_norm1.{p}"),
        ("visual.transformer.{i}.norm2.{p}", "vision_model.encoder.layers.{i}.layer_norm2.{p}"),
        ("visual.transformer.{i}.attn.proj.{p}", "vision_model.encoder.layers.{i}.self_attn.out_proj.{p}"),
        ("visual.transformer.{i}.mlp.0.{p}", "vision_model.encoder.layers.{i}.mlp.fc1.{p}"),
        ("visual.transformer.{i}.mlp.2.{p}", "vision_model.encoder.layers.{i}.mlp.fc2.{p}"),
    ]
)
"""One-to-one renames; the fused q/k/v, the squeezed embeddings and the transposed head are handled apart."""

CLIP_QKV = ("q_proj", "k_proj", "v_proj")
"""Order of the slices of open-clip's fused ``to_qkv`` (Wan views its output as [B, L, 3, heads, head_dim])."""

CLIP_TEXT_TOWER_IGNORED = (
    "XLM-RoBERTa text tower of the CLIP: Wan's I2V uses only the image tower's penultimate features"
)
CLIP_LOG_SCALE_IGNORED = "CLIP's contrastive temperature: only used to compare image and text embeddings"
CLIP_PROJECTION_IGNORED = (
    "projection into the joint image-text space: Wan uses the penultimate hidden states, never the projected "
    "embedding, and CLIPVisionModel has no projection"
)


class ClipVisionAdapter(StateDictAdapter):
    """The open-clip ``.pth`` (whole CLIP, text tower included) or the diffusers ``image_encoder/`` folder.

    ``model_prefix`` is where the vision tower's names start in the model being filled: ``"vision_model."`` for a
    transformers 4 ``CLIPVisionModel`` or a ``CLIPVisionModelWithProjection``, ``""`` for a transformers 5
    ``CLIPVisionModel``. Stored names are read with or without the ``vision_model.`` prefix.
    """

    def __init__(self, naming: Literal["original", "diffusers"], model_prefix: str = "") -> None:
        self.name = naming
        self.model_prefix = model_prefix

    def _ours(self, name: str) -> str:
        return name if name == "visual_projection.weight" else self.model_prefix + name.removeprefix("vision_model.")

    def targets(self, key: str) -> list[Target] | None:
        if self.name == "diffusers":
            return [(self._ours(key), IDENTITY)]
        if key == "visual.cls_embedding":
            return [(self._ours("embeddings.class_embedding"), Transform("squeeze", keep=1))]
        if key == "visual.pos_embedding":
            return [(self._ours("embeddings.position_embedding.weight"), Transform("squeeze", keep=2))]
        if key == "visual.head":
            return [("visual_projection.weight", Transform("transpose"))]
        match = re.match(r"^visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)$", key)
        if match:
            return [
                (
                    self._ours(f"encoder.layers.{match[1]}.self_attn.{part}.{match[2]}"),
                    Transform("chunk", index=i, parts=3),
                )
                for i, part in enumerate(CLIP_QKV)
            ]
        target = CLIP_VISION_NAMES.forward(key)
        return None if target is None else [(self._ours(target), IDENTITY)]

    def ignore_reason(self, key: str) -> str | None:
        if self.name == "original" and key.startswith("textual."):
            return CLIP_TEXT_TOWER_IGNORED
        if self.name == "original" and key == "log_scale":
            return CLIP_LOG_SCALE_IGNORED
        return None

    def surplus_reason(self, target: str) -> str | None:
        return CLIP_PROJECTION_IGNORED if target == "visual_projection.weight" else None


def clip_vision_to_original(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPVisionModel(WithProjection) state dict -> open-clip ``visual.*`` names (q/k/v fused, shapes as stored).

    Names are read with or without the ``vision_model.`` prefix (transformers 5 dropped it from CLIPVisionModel).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name != "visual_projection.weight" and not name.startswith("vision_model."):
            name = "vision_model." + name
        match = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv]_proj)\.(weight|bias)$", name)
        if match:
            fused.setdefault((match[1], match[3]), {})[match[2]] = tensor
        elif name == "vision_model.embeddings.class_embedding":
            out["visual.cls_embedding"] = tensor.reshape(1, 1, -1)
        elif name == "vision_model.embeddings.position_embedding.weight":
            out["visual.pos_embedding"] = tensor.unsqueeze(0)
        elif name == "visual_projection.weight":
            out["visual.head"] = tensor.t().contiguous()
        elif name == "vision_model.embeddings.position_ids":
            continue
        else:
            stored = CLIP_VISION_NAMES.backward(name)
            if stored is None:
                raise ValueError(f"{name} has no counterpart in open-clip's visual tower")
            out[stored] = tensor
    for (layer, kind), parts in fused.items():
        out[f"visual.transformer.{layer}.attn.to_qkv.{kind}"] = torch.cat([parts[p] for p in CLIP_QKV], dim=0)
    return out


# --------------------------------------------------------------------------------------------------------------------
# wav2vec2-base-960h: the released Wav2Vec2ForCTC file <-> Wav2Vec2Model names.

WAV2VEC2_LM_HEAD_IGNORED = (
    "CTC character head of Wav2Vec2ForCTC: FantasyTalking uses the encoder's last_hidden_state, not letter logits"
)
_WAV2VEC2_LEGACY = (
    ("encoder.pos_conv_embed.conv.weight_g", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
    ("encoder.pos_conv_embed.conv.weight_v", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
)


class Wav2Vec2Adapter(StateDictAdapter):
    """The released ``facebook/wav2vec2-base-960h`` weights (``wav2vec2.`` prefix, ``lm_head``, legacy weight-norm
    names ``weight_g``/``weight_v``, either spelling accepted) onto a ``Wav2Vec2Model``; plain model names too."""

    name = "wav2vec2"

    def targets(self, key: str) -> list[Target] | None:
        name = key.removeprefix("wav2vec2.")
        for legacy, current in _WAV2VEC2_LEGACY:
            if name == legacy:
                name = current
        return [(name, IDENTITY)]

    def ignore_reason(self, key: str) -> str | None:
        return WAV2VEC2_LM_HEAD_IGNORED if key.startswith("lm_head.") else None


def wav2vec2_to_released(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wav2Vec2ForCTC state dict -> the released file's names (legacy ``weight_g``/``weight_v`` for the pos conv)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        for legacy, current in _WAV2VEC2_LEGACY:
            name = name.replace(current, legacy)
        out[name] = tensor
    return out
