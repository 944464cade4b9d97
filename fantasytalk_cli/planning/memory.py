"""Peak memory per device of one training step, from an explicit model whose every term is shown.

No weights are needed: parameter counts come from the model configs (`planning.model_size`), activations from a
per-token per-layer byte model of the Wan block as autograd saves it. Units: GB = 10^9 bytes.

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
from typing import Any, Literal

from fantasytalk_cli.data.buckets import latent_frames, token_count
from fantasytalk_cli.models.trainable import DEFAULT_TRAINABLE_MODULES, trainable_count
from fantasytalk_cli.planning.model_size import (
    CPU_ENCODERS_WITH_LOW_VRAM,
    FP32_ENCODERS,
    TransformerDims,
    block_linear_params,
    block_params,
    encoder_params,
    transformer_params,
)

Strategy = Literal["ddp", "zero2", "zero3", "fsdp"]
AttentionImpl = Literal["flash", "math"]
Device = Literal["cuda", "cpu"]

GB = 1e9
RISK_FRACTION = 0.9
"""A bucket is at risk when its estimate exceeds this fraction of the device memory (allocator slack)."""

CONTEXT_TOKENS = (512, 257)
"""Text tokens (umT5, padded to 512) and CLIP image tokens of the I2V cross-attention."""
AUDIO_WINDOW_TOKENS = 17
"""wav2vec2 tokens per latent frame's audio window (81 frames at 23 fps; ``docs/model.md#audio-windows``)."""

VAE_ENCODE_BYTES_PER_PIXEL_FIXED = 900
VAE_ENCODE_BYTES_PER_PIXEL_PER_CHANNEL = 32
"""Peak live bytes of the step's video encode (the posterior of the clip, then the first-frame condition: two Wan
VAE encodes) per frame pixel, per dtype byte: FIXED + PER_CHANNEL x base_dim. Measured on CPU (diffusers
`AutoencoderKLWan`, fp32, RSS): 15.7 KB per pixel at base_dim 96 (the real VAE), 4.6 KB at base_dim 8 (the tiny
one), linear in the pixels (96 to 384 px squares), the same for 17 and 33 frames (causal chunks)."""
VAE_DTYPE_BYTES = 4
"""Training runs the VAE in fp32 whatever the mixed precision (`load_training_models`: `vae_dtype=torch.float32`)."""

RUNTIME_OVERHEAD_BYTES: dict[str, int] = {"cuda": int(1.0 * GB), "cpu": int(0.45 * GB)}
"""cuda: context + cuBLAS/NCCL workspaces; cpu: Python with torch, diffusers, transformers imported (~0.36 GB RSS
measured with torch 2.13, plus allocator slack)."""


def encoder_bytes(name: str, params: int, weight_bytes: int) -> int:
    """Bytes of one frozen encoder's weights as training holds them (fp32 for `FP32_ENCODERS`)."""
    return params * _encoder_dtype_bytes(name, weight_bytes)


def _encoder_dtype_bytes(name: str, weight_bytes: int) -> int:
    return 4 if name in FP32_ENCODERS else weight_bytes


def _encoder_formula(encoders: Mapping[str, int], weight_bytes: int) -> str:
    return " + ".join(
        f"{name} {count / 1e9:.2f}B x {_encoder_dtype_bytes(name, weight_bytes)} B" for name, count in encoders.items()
    )


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


@dataclass(frozen=True)
class StepSetup:
    """What shapes one training step's memory: the sample shape and batch, the parallelism, precision and options."""

    shape: tuple[int, int, int]
    """(height, width, frames) of a sample."""
    batch_size: int
    strategy: Strategy
    devices: int
    mixed_precision: str
    gradient_checkpointing: bool
    low_vram: bool
    attention_impl: AttentionImpl
    device: Device
    context_tokens: Sequence[int]
    audio_window_tokens: int
    vae_base_dim: int
    vae_mini_batch: int
    fp8_base: bool = False
    """The frozen DiT's block linears stored in float8 (`--base_weights_dtype fp8`)."""
    activation_offload: bool = False
    """The tensors the backward needs kept in host memory (`--activation_offload`)."""
    blocks_offloaded: int = 0
    """Blocks whose frozen weights live in host memory (`--blocks_to_offload`)."""
    trainable_modules: tuple[str, ...] = DEFAULT_TRAINABLE_MODULES
    """`--trainable_modules`: what trains (`models/trainable.py` counts it on the meta model)."""
    lora: tuple[int, tuple[str, ...]] | None = None
    """(`--lora_rank`, `--lora_target_modules`) of a LoRA on the DiT, counted from the real injection."""

    @property
    def tokens(self) -> int:
        """DiT tokens per sample."""
        height, width, frames = self.shape
        return token_count(height, width, frames)

    @property
    def weight_bytes(self) -> int:
        """Bytes per frozen weight, which is also the autocast compute dtype's size."""
        return 4 if self.mixed_precision == "no" else 2

    @property
    def weight_dtype(self) -> str:
        return "fp32" if self.mixed_precision == "no" else self.mixed_precision

    @property
    def sharded(self) -> bool:
        """Whether the weights themselves are sharded across devices (ZeRO-3, FSDP)."""
        return self.strategy in ("zero3", "fsdp")

    @property
    def unit(self) -> str:
        return "GPU" if self.device == "cuda" else "process"

    @property
    def encoders_offloaded(self) -> bool:
        """With `low_vram` on a GPU the encoders live in CPU memory between steps."""
        return self.low_vram and self.device == "cuda"


def activation_bytes_per_token_layer(config: Mapping[str, Any], compute_bytes: int) -> int:
    """Bytes autograd keeps per token per Wan block (flash attention): 24*D + 8*p*D + p*F + 16*heads + 36."""
    dims = TransformerDims.from_config(config)
    return 24 * dims.dim + 8 * compute_bytes * dims.dim + compute_bytes * dims.ffn + 16 * dims.heads + 36


LORA_VIDEO_INPUTS: dict[str, str] = {
    "attn1.to_q": "dim",
    "attn1.to_k": "dim",
    "attn1.to_v": "dim",
    "attn1.to_out.0": "dim",
    "attn2.to_q": "dim",
    "attn2.to_out.0": "dim",
    "ffn.net.0.proj": "dim",
    "ffn.net.2": "ffn",
}
"""LoRA targets whose input is the video tokens, with its width (attn2's k/v read the short context instead).
attn1's q/k/v share one input tensor."""


def lora_activation_bytes_per_token_layer(
    config: Mapping[str, Any], compute_bytes: int, rank: int, targets: Sequence[str]
) -> int:
    """Bytes a LoRA adds per video token per block for the backward: each distinct input its lora_A saves (the
    frozen linear alone saves none) and each rank-r intermediate lora_B saves."""
    dims = TransformerDims.from_config(config)
    video = [t for t in targets if t in LORA_VIDEO_INPUTS]
    inputs = {("attn1.qkv" if t in ("attn1.to_q", "attn1.to_k", "attn1.to_v") else t) for t in video}
    widths = sum(dims.ffn if t == "ffn.net.2" else dims.dim for t in inputs)
    return compute_bytes * (widths + rank * len(video))


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
    vae_encode: bool = True,
    base_weights_dtype: str = "bf16",
    activation_offload: bool = False,
    blocks_to_offload: int = 0,
    trainable_modules: Sequence[str] = DEFAULT_TRAINABLE_MODULES,
    lora: tuple[int, Sequence[str]] | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory per device of one training step on samples of `shape` = (H, W, frames).

    `config`: transformer kwargs (`WAN21_I2V_14B_CONFIG`, `TINY_CONFIG`); `encoders`: name -> parameters of
    the frozen encoders in use (default: the real ones); `device="cpu"` models CPU training (no CUDA context,
    encoders always resident); `model`: where `config` came from, shown with the estimate; `vae_encode=False`: the
    feature cache holds the latents (no VAE encode phase)."""
    if strategy not in ("ddp", "zero2", "zero3", "fsdp"):
        raise ValueError(f"strategy must be ddp, zero2, zero3 or fsdp, not {strategy!r}")
    if devices < 1 or batch_size < 1:
        raise ValueError("devices and batch_size must be at least 1")
    setup = StepSetup(
        shape=shape,
        batch_size=batch_size,
        strategy=strategy,
        devices=devices,
        mixed_precision=mixed_precision,
        gradient_checkpointing=gradient_checkpointing,
        low_vram=low_vram,
        attention_impl=attention_impl,
        device=device,
        context_tokens=context_tokens,
        audio_window_tokens=audio_window_tokens,
        vae_base_dim=vae_base_dim,
        vae_mini_batch=vae_mini_batch,
        fp8_base=base_weights_dtype == "fp8",
        # on the CPU host memory is the device's: offloading there moves nothing out of it
        activation_offload=activation_offload and device == "cuda",
        blocks_offloaded=blocks_to_offload if device == "cuda" else 0,
        trainable_modules=tuple(trainable_modules),
        lora=(lora[0], tuple(lora[1])) if lora else None,
    )
    encoder_counts = dict(encoder_params() if encoders is None else encoders)
    resident = _weight_terms(config, setup)
    encoder_term, visiting_bytes = _encoder_term(encoder_counts, setup)
    step = _step_terms(config, setup)
    step_transient = sum(term.bytes for term in step)
    encode_term, encode_bytes = _encode_phase_term(visiting_bytes, step_transient, setup, vae_encode)
    overhead = RUNTIME_OVERHEAD_BYTES[device] if runtime_overhead_bytes is None else runtime_overhead_bytes
    what = "CUDA context, cuBLAS/NCCL workspaces" if device == "cuda" else "Python + torch + diffusers process"
    notes = []
    if device != "cuda" and (activation_offload or blocks_to_offload):
        notes.append("activation and block offload save nothing on the CPU: host memory is the device's memory")
    if not gradient_checkpointing and device == "cuda":
        notes.append("gradient_checkpointing off: every block keeps its activations (turn it on to save most of them)")
    if encode_bytes > step_transient:
        notes.append(
            f"the encode phase ({encode_bytes / GB:.1f} GB) sets the peak, not the DiT step "
            f"({step_transient / GB:.1f} GB)"
            + (": with low_vram the encoders visit the GPU together to encode" if setup.encoders_offloaded else "")
        )
    return MemoryEstimate(
        terms=[*resident, encoder_term, *step, encode_term, MemoryTerm("runtime overhead", what, overhead)],
        strategy=strategy,
        devices=devices,
        device=device,
        shape=shape,
        batch_size=batch_size,
        tokens=setup.tokens,
        capacity_bytes=int(capacity_gb * GB) if capacity_gb else None,
        notes=notes,
        model=model,
    )


def _weight_terms(config: Mapping[str, Any], setup: StepSetup) -> list[MemoryTerm]:
    """The transformer's resident weights and optimizer state: frozen DiT, trainable weights, grads, AdamW moments."""
    dims = TransformerDims.from_config(config)
    adapter, lora = trainable_count(config, setup.trainable_modules, setup.lora)
    frozen = sum(transformer_params(config)) - adapter  # the LoRA adds parameters beside the frozen ones
    devices, weight_bytes = setup.devices, setup.weight_bytes
    if setup.sharded:
        where = f" / {devices} {setup.unit}s, sharded ({setup.strategy})"
    else:
        where = f", replicated on every {setup.unit} ({setup.strategy})"
    terms = [_frozen_term(dims, frozen, setup, where)]
    if setup.sharded and devices > 1:
        per_block = block_params(dims) + 2 * dims.audio_proj_dim * dims.dim
        terms.append(
            MemoryTerm(
                "gathered blocks in flight",
                f"2 blocks x {per_block:,} params x {weight_bytes} B",
                2 * per_block * weight_bytes,
            )
        )
    weights_split = devices if setup.sharded else 1
    state_split = devices if setup.strategy != "ddp" else 1
    weights_note = f" / {devices}" if weights_split > 1 else ", replicated"
    state_note = f" / {devices}" if state_split > 1 else ""
    trained = adapter + lora
    count = f"{trained:,} params" + (f" ({adapter:,} adapter + {lora:,} LoRA)" if lora else "")
    terms += [
        MemoryTerm("trainable weights (fp32)", f"{count} x 4 B{weights_note}", trained * 4 // weights_split),
        MemoryTerm("gradients (fp32)", f"{count} x 4 B{state_note}", trained * 4 // state_split),
        MemoryTerm(
            "AdamW moments (fp32)",
            f"{count} x 8 B (exp_avg + exp_avg_sq){state_note}",
            trained * 8 // state_split,
        ),
    ]
    if setup.strategy == "ddp" and devices > 1:
        terms.append(MemoryTerm("DDP gradient buckets", f"{count} x 4 B", trained * 4))
    return terms


def _frozen_term(dims: TransformerDims, frozen: int, setup: StepSetup, where: str) -> MemoryTerm:
    """The frozen DiT's weights: in the weight dtype, or with the block linears in float8 (one byte each), plus
    the upcast copies autograd keeps for the backward (one block's with gradient checkpointing, else all); minus
    the blocks offloaded to host memory, plus those in flight (the computing one and the prefetched one with
    gradient checkpointing; without it autograd keeps every offloaded block's device copy)."""
    weight_bytes, share = setup.weight_bytes, setup.devices if setup.sharded else 1
    linear = block_linear_params(dims)
    others = block_params(dims) - linear
    block_bytes = linear * (1 if setup.fp8_base else weight_bytes) + others * weight_bytes
    offloaded = min(setup.blocks_offloaded, dims.layers)
    in_flight = min(offloaded, 2) if setup.gradient_checkpointing else offloaded
    moved = (offloaded - in_flight) * block_bytes
    offload_text = (
        f", - {offloaded} blocks in host memory + {in_flight} in flight ({block_bytes / GB:.2f} GB each)"
        if offloaded
        else ""
    )
    if not setup.fp8_base:
        total = frozen * weight_bytes
        return MemoryTerm(
            "frozen DiT weights",
            f"{frozen:,} params x {weight_bytes} B ({setup.weight_dtype}) = {total / GB:.1f} GB{where}{offload_text}",
            total // share - moved,
        )
    all_linear = dims.layers * linear
    kept = 1 if setup.gradient_checkpointing else dims.layers
    upcast = kept * linear * weight_bytes
    total = all_linear + (frozen - all_linear) * weight_bytes
    return MemoryTerm(
        "frozen DiT weights (fp8 blocks)",
        f"{all_linear:,} block linear params x 1 B + {frozen - all_linear:,} others x {weight_bytes} B = "
        f"{total / GB:.1f} GB{where}, + {kept} block(s) upcast to {setup.weight_dtype} for the backward{offload_text}",
        total // share + upcast - moved,
    )


def _encoder_term(encoders: Mapping[str, int], setup: StepSetup) -> tuple[MemoryTerm, int]:
    """The frozen encoders' resident weights, and the bytes of those that visit the GPU to encode (`low_vram`).

    With `low_vram` the encoders are loaded into CPU memory; all but wav2vec2 visit the GPU together to encode."""
    weight_bytes = setup.weight_bytes
    if not setup.encoders_offloaded:
        resident = sum(encoder_bytes(name, count, weight_bytes) for name, count in encoders.items())
        return MemoryTerm("frozen encoders", _encoder_formula(encoders, weight_bytes) or "none", resident), 0
    visiting = {name: count for name, count in encoders.items() if name not in CPU_ENCODERS_WITH_LOW_VRAM}
    visiting_bytes = sum(encoder_bytes(name, count, weight_bytes) for name, count in visiting.items())
    term = MemoryTerm(
        "frozen encoders",
        f"{sum(encoders.values()):,} params in CPU memory between steps (low_vram); "
        f"{visiting_bytes / GB:.1f} GB of them on the GPU while encoding: see the encode phase",
        0,
    )
    return term, visiting_bytes


def _step_terms(config: Mapping[str, Any], setup: StepSetup) -> list[MemoryTerm]:
    """The DiT step's transient memory: saved activations, backward working memory, inputs and context, and the
    attention probabilities where the math SDPA materialises them."""
    dims = TransformerDims.from_config(config)
    height, width, frames = setup.shape
    tokens, batch, compute = setup.tokens, setup.batch_size, setup.weight_bytes
    per_layer = activation_bytes_per_token_layer(config, compute)
    per_token = (
        f"(24*{dims.dim} + 8*{compute}*{dims.dim} + {compute}*{dims.ffn} + 16*{dims.heads} + 36) "
        f"= {per_layer:,} B/token/layer"
    )
    context = sum(setup.context_tokens)
    # per sample per block: cross-attention context keys/values (+ pre-norm keys) and the audio windows' k/v
    audio_kv = latent_frames(frames) * setup.audio_window_tokens * (dims.audio_proj_dim + 2 * dims.dim) * compute
    context_per_block = 3 * context * dims.dim * compute + audio_kv
    if setup.activation_offload:  # what the backward needs waits in host memory; one block's worth is on the GPU
        saved = per_layer * tokens * batch
        formula = f"1 block {per_token} x {tokens:,} tokens x {batch} (the rest in host memory: activation offload)"
        context_bytes = context_per_block * batch
    elif setup.gradient_checkpointing:
        saved = dims.layers * compute * dims.dim * tokens * batch + per_layer * tokens * batch
        formula = (
            f"{dims.layers} layers x {compute}*{dims.dim} B block inputs x {tokens:,} tokens x {batch} "
            f"+ 1 recomputed block {per_token}"
        )
        context_bytes = context_per_block * batch
    else:
        saved = dims.layers * per_layer * tokens * batch
        formula = f"{dims.layers} layers x {per_token} x {tokens:,} tokens x {batch}"
        context_bytes = dims.layers * context_per_block * batch
    checkpointing = "with" if setup.gradient_checkpointing else "no"
    if setup.activation_offload:
        checkpointing += " + offload"
    working = (2 * compute * dims.dim + 4 * dims.dim + 2 * compute * dims.ffn) * tokens * batch
    patch = math.prod(dims.patch)
    io_per_token = (
        4 * dims.dim
        + 2 * compute * dims.dim
        + 8 * dims.head_dim
        + patch * (5 * dims.out_channels * 4 + 2 * dims.in_channels * compute)
    )
    pixels = batch * frames * 3 * height * width * 4
    terms = [
        MemoryTerm(f"activations ({checkpointing} grad. checkpointing)", formula, saved),
        MemoryTerm(
            "backward working memory",
            f"(2*{compute}*{dims.dim} + 4*{dims.dim} + 2*{compute}*{dims.ffn}) B x {tokens:,} tokens x {batch}",
            working,
        ),
        MemoryTerm(
            "inputs, context, head, loss",
            f"{io_per_token:,} B/token x {tokens:,} x {batch} + context {context_bytes:,} B + pixels "
            f"{batch}x{frames}x3x{height}x{width} x 4 B",
            io_per_token * tokens * batch + context_bytes + pixels + context * dims.dim * compute * batch,
        ),
    ]
    if setup.lora is not None:
        rank, targets = setup.lora
        lora_per = lora_activation_bytes_per_token_layer(config, compute, rank, targets)
        kept = 1 if setup.gradient_checkpointing or setup.activation_offload else dims.layers
        terms.append(
            MemoryTerm(
                "LoRA activations",
                f"{kept} block(s) x {lora_per:,} B/token (lora_A inputs + rank-{rank} outputs) x {tokens:,} tokens "
                f"x {batch}",
                kept * lora_per * tokens * batch,
            )
        )
    if setup.attention_impl == "math":
        keys = context + setup.audio_window_tokens
        probs = dims.heads * tokens * (tokens + keys) * compute * batch
        kept = 1 if setup.gradient_checkpointing else dims.layers
        terms.append(
            MemoryTerm(
                "attention probabilities (math SDPA)",
                f"({kept} + 2 working) x {batch} x {dims.heads} heads x {tokens:,} x ({tokens:,} + {keys}) x "
                f"{compute} B",
                (kept + 2) * probs,
            )
        )
    return terms


def _encode_phase_term(
    visiting_bytes: int, step_transient: int, setup: StepSetup, vae_encode: bool = True
) -> tuple[MemoryTerm, int]:
    """What the encode phase needs above the DiT step's transient memory, and the encode phase's own bytes.

    The encoders run before the DiT step, whose activations are freed by then: the peak is the larger of the two
    phases on top of the resident terms. Encode phase = the VAE encode's working memory (causal chunks, so
    independent of the frame count; umT5 and CLIP activations are far smaller) + with low_vram the encoders moved
    onto the GPU for it."""
    height, width, _ = setup.shape
    videos = min(setup.batch_size, setup.vae_mini_batch)
    per_channel = VAE_ENCODE_BYTES_PER_PIXEL_PER_CHANNEL
    per_pixel = (VAE_ENCODE_BYTES_PER_PIXEL_FIXED + per_channel * setup.vae_base_dim) * VAE_DTYPE_BYTES
    vae = per_pixel * height * width * videos if vae_encode else 0  # the feature cache holds the latents
    encode = visiting_bytes + vae
    moved = f"encoders moved to the GPU {visiting_bytes / GB:.2f} GB (low_vram) + " if setup.encoders_offloaded else ""
    term = MemoryTerm(
        "encode phase above the DiT step",
        f"max(0, {moved}VAE encode ({VAE_ENCODE_BYTES_PER_PIXEL_FIXED} + {per_channel}*{setup.vae_base_dim})"
        f"*{VAE_DTYPE_BYTES} B x "
        f"{height}x{width} pixels x {videos} videos = {vae / GB:.2f} GB - DiT step {step_transient / GB:.2f} GB)",
        max(0, encode - step_transient),
    )
    return term, encode
