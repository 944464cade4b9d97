"""Peak memory per device of one training step, from an explicit model whose every term is shown.

No weights are needed: parameter counts come from the model configs (the diffusers kwargs dicts of
`fantasytalk_cli.models.dims`, and the encoder configs below), activations from a per-token per-layer byte
model of the Wan block as autograd saves it. Units: GB = 10^9 bytes.

The terms (per device, N = number of devices):
- frozen DiT weights in the weight dtype (bf16/fp16: 2 B, no mixed precision: 4 B); replicated under
  ddp/zero2, sharded by N under zero3/fsdp (plus two gathered blocks in flight);
- trainable adapter: fp32 weights 4 B + grads 4 B + AdamW moments 8 B per parameter; zero2 shards grads
  and moments, zero3/fsdp shard all three; ddp also keeps 4 B/param gradient buckets for all-reduce;
- frozen encoders (umT5-XXL and CLIP ViT-H/14 in the weight dtype, the Wan VAE and wav2vec2 in fp32, as
  `load_training_models` keeps them), resident unless `low_vram`: then they sit in CPU memory between steps and
  all but wav2vec2 (which runs on the CPU) move to the GPU together while encoding (`FrozenEncoders.on`);
- activations saved for backward, per token per block (p = compute dtype bytes, measured on the diffusers
  Wan block with `saved_tensors_hooks`, see tests/test_memory.py): 24*D (six fp32 D-wide tensors: the three
  LayerNorm inputs and the q/k RMSNorm inputs, which autocast and the norms keep in fp32) + 8*p*D (q, k, v
  and the outputs of the self, text, image and audio attention, and the per-frame audio query) + p*F (the
  FFN hidden) + 16*heads (SDPA log-sum-exps) + 36 (norm statistics); all blocks without gradient
  checkpointing, else one p*D block input per block plus one recomputed block; plus backward working
  memory, the per-sample cross-attention context and, with `attention_impl="math"`, the B*heads*S^2
  attention probabilities (flash / memory-efficient SDPA never materialise them; torch's CPU SDPA uses a
  flash kernel too);
- the encode phase, which runs before the DiT step: the VAE encode's working memory plus, with `low_vram`, the
  encoders moved onto the GPU for it. The peak is max(DiT step, encode phase) on top of what stays resident, so
  only what the encode phase needs above the step's transient memory counts (it sets the peak with `low_vram`
  at low resolutions, and for small models);
- runtime overhead (CUDA context and workspaces, or the Python process with torch and diffusers loaded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from fantasytalk_cli.config.schema import ModelConfig

Strategy = Literal["ddp", "zero2", "zero3", "fsdp"]
AttentionImpl = Literal["flash", "math"]
Device = Literal["cuda", "cpu"]

GB = 1e9
RISK_FRACTION = 0.9
"""A bucket is at risk when its estimate exceeds this fraction of the device memory (allocator slack)."""

CONTEXT_TOKENS = (512, 257)
"""Text tokens (umT5, padded to 512) and CLIP image tokens of the I2V cross-attention."""
AUDIO_WINDOW_TOKENS = 17
"""wav2vec2 tokens per latent frame's audio window (81 frames at 23 fps; REFERENCE.md 1)."""

VAE_ENCODE_BYTES_PER_PIXEL_PER_CHANNEL = 44
"""Peak live bytes of a Wan VAE encode per frame pixel, per base channel, per dtype byte (diffusers
`AutoencoderKLWan`, measured on CPU: ~16.8 KB per pixel in fp32 at base_dim 96, for 17 or 33 frames alike)."""
VAE_DTYPE_BYTES = 4
"""Training runs the VAE in fp32 whatever the mixed precision (`load_training_models`: `vae_dtype=torch.float32`)."""

UMT5_NAME = "umT5-XXL text encoder"
CLIP_NAME = "CLIP ViT-H/14 image encoder"
VAE_NAME = "Wan2.1 VAE"
WAV2VEC_NAME = "wav2vec2-base audio encoder"
FP32_ENCODERS = (VAE_NAME, WAV2VEC_NAME)
"""Encoders kept in fp32 whatever the mixed precision (the others use the weight dtype)."""
CPU_ENCODERS_WITH_LOW_VRAM = (WAV2VEC_NAME,)
"""With `low_vram` wav2vec2 stays on the CPU and runs there; the other encoders visit the GPU together."""

RUNTIME_OVERHEAD_BYTES: dict[str, int] = {"cuda": int(1.0 * GB), "cpu": int(0.45 * GB)}
"""cuda: context + cuBLAS/NCCL workspaces; cpu: Python with torch, diffusers, transformers imported (~0.36 GB RSS
measured with torch 2.13, plus allocator slack)."""

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


# ---------------------------------------------------------------------------------------------- counts


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


def _encoder_dtype_bytes(name: str, weight_bytes: int) -> int:
    """Bytes per parameter of one frozen encoder as training holds it (fp32 for `FP32_ENCODERS`)."""
    return 4 if name in FP32_ENCODERS else weight_bytes


def encoder_bytes(name: str, params: int, weight_bytes: int) -> int:
    """Bytes of one frozen encoder's weights as training holds them."""
    return params * _encoder_dtype_bytes(name, weight_bytes)


def _encoder_formula(enc: Mapping[str, int], weight_bytes: int) -> str:
    return " + ".join(
        f"{name} {count / 1e9:.2f}B x {_encoder_dtype_bytes(name, weight_bytes)} B" for name, count in enc.items()
    )


# ---------------------------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class MemoryTerm:
    """One line of the estimate: what, how it is computed, how many bytes."""

    name: str
    formula: str
    bytes: int

    @property
    def gb(self) -> float:
        return self.bytes / GB


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory per device of one training step for one sample shape."""

    terms: list[MemoryTerm]
    strategy: str
    devices: int
    device: str
    shape: tuple[int, int, int]
    batch_size: int
    tokens: int
    capacity_bytes: int | None = None
    notes: list[str] = field(default_factory=list)
    model: str = ""
    """Where the transformer dims came from (shown with the estimate)."""

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.terms)

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    @property
    def at_risk(self) -> bool:
        return self.capacity_bytes is not None and self.total_bytes > RISK_FRACTION * self.capacity_bytes

    def lines(self) -> list[str]:
        """The estimate as text: one line per term with its formula, then the total."""
        h, w, f = self.shape
        out = [
            f"peak memory per {'GPU' if self.device == 'cuda' else 'process'}, {self.strategy} on {self.devices} "
            f"{'GPU' if self.device == 'cuda' else 'process'}{'s' if self.devices != 1 else ''}, "
            f"batch {self.batch_size} x {h}x{w}x{f} ({self.tokens:,} tokens per sample)"
            + (f", model dims from {self.model}:" if self.model else ":")
        ]
        width = max(len(t.name) for t in self.terms)
        for t in self.terms:
            out.append(f"  {t.name:<{width}}  {t.gb:8.2f} GB  = {t.formula}")
        total = f"  {'total':<{width}}  {self.total_gb:8.2f} GB"
        if self.capacity_bytes is not None:
            share = self.total_bytes / self.capacity_bytes
            total += f"  of {self.capacity_bytes / GB:.0f} GB ({share:.0%})" + ("  AT RISK" if self.at_risk else "")
        out.append(total)
        out.extend(f"  note: {n}" for n in self.notes)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "devices": self.devices,
            "device": self.device,
            "shape": list(self.shape),
            "batch_size": self.batch_size,
            "tokens_per_sample": self.tokens,
            "terms": [{"name": t.name, "formula": t.formula, "bytes": t.bytes} for t in self.terms],
            "total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes,
            "at_risk": self.at_risk,
            "notes": self.notes,
            "model": self.model,
        }


def _dtype_bytes(mixed_precision: str) -> tuple[int, str]:
    return (4, "fp32") if mixed_precision == "no" else (2, mixed_precision)


def activation_bytes_per_token_layer(config: Mapping[str, Any], compute_bytes: int) -> int:
    """Bytes autograd keeps per token per Wan block (flash attention): 24*D + 8*p*D + p*F + 16*heads + 36."""
    d = TransformerDims.from_config(config)
    return 24 * d.dim + 8 * compute_bytes * d.dim + compute_bytes * d.ffn + 16 * d.heads + 36


def estimate_memory(
    config: Mapping[str, Any],
    shape: tuple[int, int, int],
    *,
    batch_size: int = 1,
    strategy: Strategy = "ddp",
    devices: int = 1,
    mixed_precision: str = "bf16",
    gradient_checkpointing: bool = False,
    low_vram: bool = False,
    attention_impl: AttentionImpl = "flash",
    device: Device = "cuda",
    encoders: Mapping[str, int] | None = None,
    capacity_gb: float | None = None,
    runtime_overhead_bytes: int | None = None,
    model: str = "",
    context_tokens: Sequence[int] = CONTEXT_TOKENS,
    audio_window_tokens: int = AUDIO_WINDOW_TOKENS,
    vae_base_dim: int = 96,
    vae_mini_batch: int = 1,
) -> MemoryEstimate:
    """Estimate the peak memory per device of one training step on samples of `shape` = (H, W, frames).

    `config`: transformer kwargs (`WAN21_I2V_14B_CONFIG`, `TINY_CONFIG`); `encoders`: name -> parameters of
    the frozen encoders in use (default: the real ones); `device="cpu"` models CPU training (no CUDA context,
    encoders always resident); `model`: where `config` came from, shown with the estimate."""
    from fantasytalk_cli.data.buckets import latent_frames, token_count

    if strategy not in ("ddp", "zero2", "zero3", "fsdp"):
        raise ValueError(f"strategy must be ddp, zero2, zero3 or fsdp, not {strategy!r}")
    if devices < 1 or batch_size < 1:
        raise ValueError("devices and batch_size must be at least 1")
    d = TransformerDims.from_config(config)
    h, w, f = shape
    tokens = token_count(h, w, f)
    s, b, n = tokens, batch_size, devices
    wb, wname = _dtype_bytes(mixed_precision)
    p = wb  # autocast compute dtype = weight dtype
    frozen, adapter = transformer_params(config)
    sharded = strategy in ("zero3", "fsdp")
    terms: list[MemoryTerm] = []

    unit = "GPU" if device == "cuda" else "process"
    where = f" / {n} {unit}s, sharded ({strategy})" if sharded else f", replicated on every {unit} ({strategy})"
    terms.append(
        MemoryTerm(
            "frozen DiT weights",
            f"{frozen:,} params x {wb} B ({wname}) = {frozen * wb / GB:.1f} GB{where}",
            frozen * wb // (n if sharded else 1),
        )
    )
    if sharded and n > 1:
        per_block = block_params(d) + 2 * d.audio_proj_dim * d.dim
        terms.append(
            MemoryTerm("gathered blocks in flight", f"2 blocks x {per_block:,} params x {wb} B", 2 * per_block * wb)
        )
    weights_div = n if sharded else 1
    state_div = n if strategy != "ddp" else 1
    terms.append(
        MemoryTerm(
            "trainable weights (fp32)",
            f"{adapter:,} params x 4 B" + (f" / {n}" if weights_div > 1 else ", replicated"),
            adapter * 4 // weights_div,
        )
    )
    terms.append(
        MemoryTerm(
            "gradients (fp32)",
            f"{adapter:,} params x 4 B" + (f" / {n}" if state_div > 1 else ""),
            adapter * 4 // state_div,
        )
    )
    terms.append(
        MemoryTerm(
            "AdamW moments (fp32)",
            f"{adapter:,} params x 8 B (exp_avg + exp_avg_sq)" + (f" / {n}" if state_div > 1 else ""),
            adapter * 8 // state_div,
        )
    )
    if strategy == "ddp" and n > 1:
        terms.append(MemoryTerm("DDP gradient buckets", f"{adapter:,} params x 4 B", adapter * 4))

    enc = dict(encoder_params() if encoders is None else encoders)
    offloaded = low_vram and device == "cuda"
    # with low_vram the encoders are loaded into CPU memory; all but wav2vec2 visit the GPU together to encode
    visiting = {k: v for k, v in enc.items() if k not in CPU_ENCODERS_WITH_LOW_VRAM} if offloaded else {}
    visiting_bytes = sum(encoder_bytes(k, v, wb) for k, v in visiting.items())
    if offloaded:
        terms.append(
            MemoryTerm(
                "frozen encoders",
                f"{sum(enc.values()):,} params in CPU memory between steps (low_vram); "
                f"{visiting_bytes / GB:.1f} GB of them on the GPU while encoding: see the encode phase",
                0,
            )
        )
    else:
        enc_bytes = sum(encoder_bytes(k, v, wb) for k, v in enc.items())
        terms.append(MemoryTerm("frozen encoders", _encoder_formula(enc, wb) or "none", enc_bytes))

    step_from = len(terms)  # the terms from here on are the DiT step's transient memory
    per_layer = activation_bytes_per_token_layer(config, p)
    formula_tok = f"(24*{d.dim} + 8*{p}*{d.dim} + {p}*{d.ffn} + 16*{d.heads} + 36) = {per_layer:,} B/token/layer"
    t_lat = latent_frames(f)
    ctx = sum(context_tokens)
    # per sample per block: cross-attention context keys/values (+ pre-norm keys) and the audio windows' k/v
    ctx_block = 3 * ctx * d.dim * p + t_lat * audio_window_tokens * (d.audio_proj_dim + 2 * d.dim) * p
    if gradient_checkpointing:
        saved = d.layers * p * d.dim * s * b + per_layer * s * b
        formula = (
            f"{d.layers} layers x {p}*{d.dim} B block inputs x {s:,} tokens x {b} + 1 recomputed block {formula_tok}"
        )
        ctx_bytes = ctx_block * b
    else:
        saved = d.layers * per_layer * s * b
        formula = f"{d.layers} layers x {formula_tok} x {s:,} tokens x {b}"
        ctx_bytes = d.layers * ctx_block * b
    terms.append(
        MemoryTerm(
            f"activations ({'with' if gradient_checkpointing else 'no'} grad. checkpointing)",
            formula,
            saved,
        )
    )
    working = (2 * p * d.dim + 4 * d.dim + 2 * p * d.ffn) * s * b
    terms.append(
        MemoryTerm(
            "backward working memory", f"(2*{p}*{d.dim} + 4*{d.dim} + 2*{p}*{d.ffn}) B x {s:,} tokens x {b}", working
        )
    )
    patch = math.prod(d.patch)
    io_tok = 4 * d.dim + 2 * p * d.dim + 8 * d.head_dim + patch * (5 * d.out_channels * 4 + 2 * d.in_channels * p)
    pixels = b * f * 3 * h * w * 4
    terms.append(
        MemoryTerm(
            "inputs, context, head, loss",
            f"{io_tok:,} B/token x {s:,} x {b} + context {ctx_bytes:,} B + pixels {b}x{f}x3x{h}x{w} x 4 B",
            io_tok * s * b + ctx_bytes + pixels + ctx * d.dim * p * b,
        )
    )
    if attention_impl == "math":
        probs = d.heads * s * (s + ctx + audio_window_tokens) * p * b
        kept = 1 if gradient_checkpointing else d.layers
        terms.append(
            MemoryTerm(
                "attention probabilities (math SDPA)",
                f"({kept} + 2 working) x {b} x {d.heads} heads x {s:,} x ({s:,} + {ctx + audio_window_tokens}) x {p} B",
                (kept + 2) * probs,
            )
        )
    # The encoders run before the DiT step, whose activations are freed by then: the peak is the larger of the
    # two phases on top of the resident terms. Encode phase = the VAE encode's working memory (causal chunks, so
    # independent of the frame count; umT5 and CLIP activations are far smaller) + with low_vram the encoders
    # moved onto the GPU for it.
    step_transient = sum(t.bytes for t in terms[step_from:])
    videos = min(b, vae_mini_batch)
    vae = VAE_ENCODE_BYTES_PER_PIXEL_PER_CHANNEL * vae_base_dim * VAE_DTYPE_BYTES * h * w * videos
    encode = visiting_bytes + vae
    moved = f"encoders moved to the GPU {visiting_bytes / GB:.2f} GB (low_vram) + " if offloaded else ""
    terms.append(
        MemoryTerm(
            "encode phase above the DiT step",
            f"max(0, {moved}VAE encode {VAE_ENCODE_BYTES_PER_PIXEL_PER_CHANNEL}*{vae_base_dim}*{VAE_DTYPE_BYTES} B x "
            f"{h}x{w} pixels x {videos} videos = {vae / GB:.2f} GB - DiT step {step_transient / GB:.2f} GB)",
            max(0, encode - step_transient),
        )
    )
    overhead = RUNTIME_OVERHEAD_BYTES[device] if runtime_overhead_bytes is None else runtime_overhead_bytes
    what = "CUDA context, cuBLAS/NCCL workspaces" if device == "cuda" else "Python + torch + diffusers process"
    terms.append(MemoryTerm("runtime overhead", what, overhead))
    notes = []
    if not gradient_checkpointing and device == "cuda":
        notes.append("gradient_checkpointing off: every block keeps its activations (turn it on to save most of them)")
    if encode > step_transient:
        notes.append(
            f"the encode phase ({encode / GB:.1f} GB) sets the peak, not the DiT step ({step_transient / GB:.1f} GB)"
            + (": with low_vram the encoders visit the GPU together to encode" if offloaded else "")
        )
    return MemoryEstimate(
        terms=terms,
        strategy=strategy,
        devices=n,
        device=device,
        shape=(h, w, f),
        batch_size=b,
        tokens=tokens,
        capacity_bytes=int(capacity_gb * GB) if capacity_gb else None,
        notes=notes,
        model=model,
    )


def default_transformer_config() -> dict[str, Any]:
    """The real model's transformer config (Wan2.1-I2V-14B + FantasyTalking adapter)."""
    from fantasytalk_cli.models.dims import WAN21_I2V_14B_CONFIG

    return dict(WAN21_I2V_14B_CONFIG)


BUILTIN_MODEL = "the built-in Wan2.1-I2V-14B + FantasyTalking config"


@dataclass(frozen=True)
class ModelDims:
    """The transformer config a memory estimate uses, where it came from, and what the user should know."""

    config: dict[str, Any]
    source: str
    notes: list[str] = field(default_factory=list)


def configured_model_dims(model: ModelConfig) -> ModelDims:
    """The transformer dims of the configured base model, read as training reads them: the loaders' own reader of
    the folder's DiT `config.json` (with the sizes the original layout leaves to the stored shapes), the adapter
    dims from the wav2vec2 width and the adapter file (`adapter_dims`). Without a folder, or when it cannot be
    read, the built-in 14B config, with a note saying so. The encoders are the released Wan2.1 ones either way."""
    base = model.pretrained_model_name_or_path
    if base is None:
        note = f"no --pretrained_model_name_or_path: memory estimated with {BUILTIN_MODEL}"
        return ModelDims(default_transformer_config(), BUILTIN_MODEL, [note])
    from fantasytalk_cli.config.load import ConfigError
    from fantasytalk_cli.config.wan_yaml import load_wan_yaml
    from fantasytalk_cli.models.dims import WAN21_I2V_14B_CONFIG
    from fantasytalk_cli.models.loaders import ModelLoadError, dit_files
    from fantasytalk_cli.train.model_setup import ModelSetupError, adapter_dims, find_wav2vec

    try:
        layout, folder, config, _ = dit_files(Path(base), load_wan_yaml(model.config_path))
    except (ModelLoadError, ConfigError, OSError) as exc:
        note = f"cannot read the transformer config of {base} ({exc}): memory estimated with {BUILTIN_MODEL}"
        return ModelDims(default_transformer_config(), BUILTIN_MODEL, [note])
    notes: list[str] = []
    try:
        given = adapter_dims(find_wav2vec(model), model.transformer_path)
    except (ModelSetupError, ModelLoadError, OSError, KeyError, ValueError) as exc:
        given = {}
        notes.append(f"adapter dims not read ({exc}): FantasyTalking's defaults assumed")
    dims = {k: v for k, v in config.items() if not k.startswith("_")}
    for key in ("audio_in_dim", "audio_proj_dim"):  # as `load_transformer`: the config's, else given, else default
        dims.setdefault(key, given.get(key, WAN21_I2V_14B_CONFIG[key]))
    source = f"{folder / 'config.json'} ({layout} layout)"
    try:
        params = transformer_params(dims)
    except (KeyError, TypeError, ValueError) as exc:
        note = f"{source} lacks a size the estimate needs ({exc}): memory estimated with {BUILTIN_MODEL}"
        return ModelDims(default_transformer_config(), BUILTIN_MODEL, [note])
    if params != transformer_params(WAN21_I2V_14B_CONFIG):
        notes.append("frozen encoders counted at the sizes of the released Wan2.1 ones (not read from the folder)")
    return ModelDims(dims, source, notes)
