"""Parameter counts of the FantasyTalking transformer and of the frozen encoders, from their configs alone.

No weights are needed: the transformer's counts come from its diffusers kwargs (`fantasytalk_cli.models.dims`), the
encoders' from the released configs below. Each count is checked against the manifests of the real files
(tests/test_memory.py). The model facts behind them are in ``docs/model.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

UMT5_NAME = "umT5-XXL text encoder"
CLIP_NAME = "CLIP ViT-H/14 image encoder"
VAE_NAME = "Wan2.1 VAE"
WAV2VEC_NAME = "wav2vec2-base audio encoder"
FP32_ENCODERS = (VAE_NAME, WAV2VEC_NAME)
"""Encoders kept in fp32 whatever the mixed precision (the others use the weight dtype)."""
CPU_ENCODERS_WITH_LOW_VRAM = (WAV2VEC_NAME,)
"""With `low_vram` wav2vec2 stays on the CPU and runs there; the other encoders visit the GPU together."""


# Encoder configs (the fields their parameter counts need), from the released configs.
UMT5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "num_heads": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "relative_attention_num_buckets": 32,
    "gated_ffn": True,
    "relative_bias_every_layer": True,  # umT5 (T5 has it in the first layer only)
}
CLIP_VIT_H14_VISION: dict[str, Any] = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "patch_size": 14,
    "image_size": 224,
    "num_channels": 3,
    "projection_dim": 1024,
}
WAN21_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
}
WAV2VEC2_BASE: dict[str, Any] = {
    "conv_dim": [512] * 7,
    "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "intermediate_size": 3072,
    "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16,
}


@dataclass(frozen=True)
class TransformerDims:
    """The dims of a FantasyTalking transformer config (diffusers `WanTransformer3DModel` kwargs + audio)."""

    dim: int
    heads: int
    head_dim: int
    layers: int
    ffn: int
    text_dim: int
    freq_dim: int
    in_channels: int
    out_channels: int
    image_dim: int | None
    added_kv_dim: int | None
    patch: tuple[int, int, int]
    audio_in_dim: int
    audio_proj_dim: int
    qk_norm: bool = True
    cross_attn_norm: bool = True
    pos_embed_seq_len: int | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TransformerDims:
        heads, head_dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
        dim = heads * head_dim
        image_dim = config.get("image_dim")
        added = config.get("added_kv_proj_dim", dim if image_dim else None)
        pos = config.get("pos_embed_seq_len")
        return cls(
            dim=dim,
            heads=heads,
            head_dim=head_dim,
            layers=int(config["num_layers"]),
            ffn=int(config["ffn_dim"]),
            text_dim=int(config["text_dim"]),
            freq_dim=int(config["freq_dim"]),
            in_channels=int(config["in_channels"]),
            out_channels=int(config["out_channels"]),
            image_dim=int(image_dim) if image_dim else None,
            added_kv_dim=int(added) if added else None,
            patch=tuple(int(p) for p in config.get("patch_size", (1, 2, 2))),  # type: ignore[arg-type]
            audio_in_dim=int(config["audio_in_dim"]),
            audio_proj_dim=int(config["audio_proj_dim"]),
            qk_norm=bool(config.get("qk_norm", "rms_norm_across_heads")),
            cross_attn_norm=bool(config.get("cross_attn_norm", True)),
            pos_embed_seq_len=int(pos) if pos else None,
        )


def _linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def block_params(d: TransformerDims) -> int:
    """Frozen parameters of one Wan block (self-attn, I2V cross-attn, FFN, modulation table)."""
    dim, norm = d.dim, d.dim if d.qk_norm else 0
    attn = 4 * _linear(dim, dim) + 2 * norm
    cross = 4 * _linear(dim, dim) + 2 * norm
    if d.added_kv_dim:
        cross += 2 * _linear(d.added_kv_dim, dim) + norm
    norm2 = 2 * dim if d.cross_attn_norm else 0
    ffn = _linear(dim, d.ffn) + _linear(d.ffn, dim)
    return attn + cross + norm2 + ffn + 6 * dim


def block_linear_params(d: TransformerDims) -> int:
    """The frozen linear weights (and biases) of one Wan block: what fp8 storage stores in one byte."""
    linears = 8 * _linear(d.dim, d.dim) + _linear(d.dim, d.ffn) + _linear(d.ffn, d.dim)
    if d.added_kv_dim:
        linears += 2 * _linear(d.added_kv_dim, d.dim)
    return linears


def transformer_params(config: Mapping[str, Any]) -> tuple[int, int]:
    """(frozen DiT parameters, trainable audio-adapter parameters) of a transformer config, analytically.

    Wan2.1-I2V-14B: 16,394,878,784 + 840,437,760 (the manifests' totals)."""
    d = TransformerDims.from_config(config)
    dim = d.dim
    patch = math.prod(d.patch)
    outside = d.in_channels * patch * dim + dim  # patch embedding Conv3d
    outside += _linear(d.freq_dim, dim) + _linear(dim, dim)  # time embedder
    outside += _linear(dim, 6 * dim)  # time projection (modulation)
    outside += _linear(d.text_dim, dim) + _linear(dim, dim)  # text embedder
    if d.image_dim:
        i = d.image_dim
        outside += 2 * i + _linear(i, i) + _linear(i, dim) + 2 * dim  # LN, MLP, LN
    if d.pos_embed_seq_len:
        outside += d.pos_embed_seq_len * dim
    outside += _linear(dim, d.out_channels * patch) + 2 * dim  # proj_out + output modulation table
    frozen = outside + d.layers * block_params(d)
    adapter = d.audio_in_dim * d.audio_proj_dim + 2 * d.audio_proj_dim  # proj (no bias) + LayerNorm
    adapter += d.layers * 2 * d.audio_proj_dim * dim  # per block audio k_proj, v_proj (no bias)
    return frozen, adapter


def umt5_encoder_params(c: Mapping[str, Any] = UMT5_XXL_ENCODER) -> int:
    """umT5 / T5 encoder parameters (5,680,910,336 for umT5-XXL)."""
    dm, inner, ff, n = c["d_model"], c["num_heads"] * c["d_kv"], c["d_ff"], c["num_layers"]
    layer = 4 * dm * inner + dm + (3 if c["gated_ffn"] else 2) * dm * ff + dm
    bias = c["relative_attention_num_buckets"] * c["num_heads"]
    return c["vocab_size"] * dm + n * layer + (n if c["relative_bias_every_layer"] else 1) * bias + dm


def clip_vision_params(c: Mapping[str, Any] = CLIP_VIT_H14_VISION) -> int:
    """CLIP ViT vision tower parameters with its projection (632,076,800 for ViT-H/14)."""
    d, ff, p = c["hidden_size"], c["intermediate_size"], c["patch_size"]
    tokens = (c["image_size"] // p) ** 2 + 1
    layer = 2 * d + 3 * _linear(d, d) + _linear(d, d) + 2 * d + _linear(d, ff) + _linear(ff, d)
    embed = c["num_channels"] * p * p * d + d + tokens * d
    return embed + 2 * d + c["num_hidden_layers"] * layer + 2 * d + d * c["projection_dim"]


def _conv(n_in: int, n_out: int, kernel: int) -> int:
    return n_in * n_out * kernel + n_out


def _vae_res(n_in: int, n_out: int) -> int:
    shortcut = _conv(n_in, n_out, 1) if n_in != n_out else 0
    return n_in + _conv(n_in, n_out, 27) + n_out + _conv(n_out, n_out, 27) + shortcut


def wan_vae_params(c: Mapping[str, Any] = WAN21_VAE) -> int:
    """Wan2.1 VAE parameters (126,892,531): causal 3-D convs, RMS-norm gammas, one mid attention each side."""
    base, z, mult, nres = c["base_dim"], c["z_dim"], list(c["dim_mult"]), c["num_res_blocks"]
    down_t = list(c["temperal_downsample"])
    attn = lambda d: d + _conv(d, 3 * d, 1) + _conv(d, d, 1)  # noqa: E731
    # encoder
    dims = [base * u for u in [1, *mult]]
    total = _conv(3, dims[0], 27)
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        for r in range(nres):
            total += _vae_res(a if r == 0 else b, b)
        if i != len(mult) - 1:
            total += _conv(b, b, 9) + (_conv(b, b, 3) if down_t[i] else 0)
    top = dims[-1]
    total += 2 * _vae_res(top, top) + attn(top) + top + _conv(top, 2 * z, 27)
    total += _conv(2 * z, 2 * z, 1) + _conv(z, z, 1)  # quant / post-quant convs
    # decoder
    up_t = down_t[::-1]
    dims = [base * u for u in [mult[-1], *mult[::-1]]]
    total += _conv(z, dims[0], 27) + 2 * _vae_res(dims[0], dims[0]) + attn(dims[0])
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        a = a // 2 if i in (1, 2, 3) else a
        for r in range(nres + 1):
            total += _vae_res(a if r == 0 else b, b)
        if i != len(mult) - 1:
            total += _conv(b, b // 2, 9) + (_conv(b, 2 * b, 3) if up_t[i] else 0)
    return total + dims[-1] + _conv(dims[-1], 3, 27)


def wav2vec2_params(c: Mapping[str, Any] = WAV2VEC2_BASE) -> int:
    """wav2vec2 model parameters without the CTC head (94,371,712 for wav2vec2-base-960h)."""
    convs, kernels, d, ff = list(c["conv_dim"]), list(c["conv_kernel"]), c["hidden_size"], c["intermediate_size"]
    total, prev = 0, 1
    for ch, k in zip(convs, kernels, strict=True):
        total += prev * ch * k  # feature-extractor convs have no bias
        prev = ch
    total += 2 * convs[0]  # group norm of the first conv
    total += 2 * convs[-1] + _linear(convs[-1], d) + d  # feature projection LN + linear, masked_spec_embed
    k, g = c["num_conv_pos_embeddings"], c["num_conv_pos_embedding_groups"]
    total += d * (d // g) * k + d + k  # positional conv (weight norm: v, g) + bias
    layer = 4 * _linear(d, d) + 2 * d + _linear(d, ff) + _linear(ff, d) + 2 * d
    return total + 2 * d + c["num_hidden_layers"] * layer


def encoder_params() -> dict[str, int]:
    """Parameters of the frozen encoders training keeps loaded (the real model's)."""
    return {
        UMT5_NAME: umt5_encoder_params(),
        CLIP_NAME: clip_vision_params(),
        VAE_NAME: wan_vae_params(),
        WAV2VEC_NAME: wav2vec2_params(),
    }


ENCODERS_OF_KIND: dict[str, tuple[str, ...]] = {
    "text": (UMT5_NAME,),
    "audio": (WAV2VEC_NAME,),
    "video": (VAE_NAME, CLIP_NAME),
}
"""The encoders that compute each kind of feature the feature cache can hold."""


def encoders_in_use(cached: frozenset[str] = frozenset()) -> dict[str, int]:
    """Parameters of the frozen encoders training loads when the cache holds the ``cached`` kinds of features."""
    dropped = {name for kind in cached for name in ENCODERS_OF_KIND[kind]}
    return {name: count for name, count in encoder_params().items() if name not in dropped}
