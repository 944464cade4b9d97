"""The trainable FantasyTalking audio adapter: window arithmetic, projector and audio cross-attention processor.

Public API:
- ``audio_windows(num_latent_frames, audio_len, expand_length=4) -> (indices [T_lat, L_win], valid [T_lat, L_win])``:
  which wav2vec2 tokens each latent frame attends to (upstream's integer arithmetic, reproduced exactly).
- ``AudioProjModel(audio_in_dim=768, audio_proj_dim=2048)``: ``proj`` Linear (no bias) then ``norm`` LayerNorm.
- ``AudioContext(windows, valid, scale)``: the per-call audio input of one cross-attention.
- ``AudioCrossAttnProcessor(audio_proj_dim, inner_dim)``: an ``nn.Module`` attention processor for diffusers'
  ``WanAttention`` (the I2V cross-attention) that adds the audio branch; holds ``k_proj`` / ``v_proj``.
- ``TEXT_CONTEXT_LEN`` (512) and ``AUDIO_EXPAND_LENGTH`` (4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

TEXT_CONTEXT_LEN = 512
"""Text tokens at the end of the cross-attention context (umT5, zero-padded); the image tokens come first."""

AUDIO_EXPAND_LENGTH = 4
"""Tokens each audio window is widened by on both sides (upstream's ``expand_length``)."""


def audio_windows(
    num_latent_frames: int, audio_len: int, expand_length: int = AUDIO_EXPAND_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Index the wav2vec2 tokens each latent frame attends to, as FantasyTalking does.

    Upstream's arithmetic, kept bit for bit because the released adapter was trained with it:
    ``num_frames = 4*(T_lat-1)+1``, ``tpf = L/num_frames``, ``half = int(2*tpf)``; latent ``i >= 1`` is centred at
    ``int((tpf*a + tpf*b) / 2) - 1`` with ``a = 4i-3``, ``b = 4i+1`` (float operations in exactly this order) and
    covers ``[c-half, c+half]``; latent 0 has the same width and ends where latent 1 starts. Every range is widened
    by ``expand_length`` on both sides; the in-range tokens come first and the out-of-range positions (front or
    back) become padding slots at the end of the window.

    Returns ``indices`` (LongTensor [T_lat, L_win], padding slots index 0) and ``valid`` (BoolTensor, True for real
    tokens), with ``L_win = 2*half + 1 + 2*expand_length``.
    """
    if num_latent_frames < 2:
        raise ValueError(f"audio windows need at least 2 latent frames (5 video frames), got {num_latent_frames}")
    if audio_len < 1:
        raise ValueError(f"audio_len must be at least 1 wav2vec2 token, got {audio_len}")
    if expand_length < 0:
        raise ValueError(f"expand_length must be >= 0, got {expand_length}")

    num_frames = 4 * (num_latent_frames - 1) + 1
    tpf = audio_len / num_frames
    half = int(2 * tpf)
    centres = [int((tpf * (4 * i - 3) + tpf * (4 * i + 1)) / 2) - 1 for i in range(1, num_latent_frames)]
    starts = [c - half for c in centres]
    starts.insert(0, starts[0] - 2 * half)  # latent 0: same width, ending where latent 1 starts
    width = 2 * half + 1 + 2 * expand_length

    indices = torch.zeros(num_latent_frames, width, dtype=torch.long)
    valid = torch.zeros(num_latent_frames, width, dtype=torch.bool)
    for i, start in enumerate(starts):
        first = max(start - expand_length, 0)
        last = min(start + width - 1 - expand_length, audio_len - 1)
        count = max(last - first + 1, 0)
        indices[i, :count] = torch.arange(first, first + count)
        valid[i, :count] = True
    return indices, valid


class AudioProjModel(nn.Module):
    """Projects wav2vec2 hidden states into the audio context space (FantasyTalking's ``proj_model``)."""

    def __init__(self, audio_in_dim: int = 768, audio_proj_dim: int = 2048) -> None:
        super().__init__()
        self.proj = nn.Linear(audio_in_dim, audio_proj_dim, bias=False)
        self.norm = nn.LayerNorm(audio_proj_dim, eps=1e-5, elementwise_affine=True)

    def reset_parameters(self) -> None:
        """Fresh initialisation (PyTorch defaults), e.g. after building on the meta device."""
        self.proj.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, audio_features: torch.Tensor) -> torch.Tensor:
        """[B, L, audio_in_dim] -> [B, L, audio_proj_dim]."""
        return self.norm(self.proj(audio_features))


@dataclass
class AudioContext:
    """The audio input of one cross-attention call.

    ``windows``: [B, T_lat, L_win, audio_proj_dim], projected tokens with exact zeros in padding slots;
    ``valid``: [T_lat, L_win] bool, False for padding slots; ``scale``: [B] weight of the audio branch per sample.
    """

    windows: torch.Tensor
    valid: torch.Tensor
    scale: torch.Tensor


class AudioCrossAttnProcessor(nn.Module):
    """Wan I2V cross-attention (text + image branches as diffusers computes them) plus FantasyTalking's audio branch.

    One query ``q = norm_q(to_q(x))`` serves all three branches. Audio: ``k = k_proj(a)``, ``v = v_proj(a)`` (no
    key norm), each latent frame's tokens (frame-major) attend only to their frame's window, padding slots masked out;
    output ``to_out(x_text + x_img + scale * x_audio)``. Without audio the arithmetic is exactly diffusers'
    ``WanAttnProcessor``. Being an ``nn.Module`` registered as ``attn2.processor``, its weights are named
    ``...attn2.processor.{k,v}_proj.weight`` and match the ``--trainable_modules "processor."`` pattern.

    The audio input is handed over by the owning block through ``self.audio`` for the duration of one call, because
    diffusers' block forward (reused unchanged) calls ``attn2`` without extra arguments.
    """

    _attention_backend = None  # set by diffusers' set_attention_backend, as on WanAttnProcessor
    _parallel_config = None

    def __init__(self, audio_proj_dim: int, inner_dim: int) -> None:
        super().__init__()
        self.k_proj = nn.Linear(audio_proj_dim, inner_dim, bias=False)
        self.v_proj = nn.Linear(audio_proj_dim, inner_dim, bias=False)
        self.audio: AudioContext | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero k/v: a fresh adapter leaves the base model's output unchanged."""
        nn.init.zeros_(self.k_proj.weight)
        nn.init.zeros_(self.v_proj.weight)

    def forward(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Cross-attention of ``hidden_states`` [B, S, dim] over [image ; text] context and the audio windows."""
        if encoder_hidden_states is None or rotary_emb is not None:
            raise ValueError("AudioCrossAttnProcessor is a cross-attention processor (context given, no RoPE)")
        if getattr(attn, "fused_projections", False):
            raise NotImplementedError("fused projections are not supported with the audio processor")

        context_img = None
        if attn.add_k_proj is not None:
            image_len = encoder_hidden_states.shape[1] - TEXT_CONTEXT_LEN
            context_img = encoder_hidden_states[:, :image_len]
            encoder_hidden_states = encoder_hidden_states[:, image_len:]

        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
        value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))

        out_img = None
        if context_img is not None:
            key_img = attn.norm_added_k(attn.add_k_proj(context_img)).unflatten(2, (attn.heads, -1))
            value_img = attn.add_v_proj(context_img).unflatten(2, (attn.heads, -1))
            out_img = self._dispatch(query, key_img, value_img, None).flatten(2, 3).type_as(query)

        out = self._dispatch(query, key, value, attention_mask).flatten(2, 3).type_as(query)
        if out_img is not None:
            out = out + out_img
        if self.audio is not None:
            out_audio = self._audio_attention(query, self.audio)
            out = out + out_audio * self.audio.scale.to(out_audio.dtype).view(-1, 1, 1)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _dispatch(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Text/image attention through diffusers' backend dispatch, exactly as ``WanAttnProcessor`` calls it."""
        return dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=None,
        )

    def _audio_attention(self, query: torch.Tensor, audio: AudioContext) -> torch.Tensor:
        """Per-latent-frame masked attention of ``query`` [B, S, H, D] over the audio windows -> [B, S, H*D]."""
        batch, seq_len, heads, head_dim = query.shape
        _, frames, win_len, _ = audio.windows.shape
        if seq_len % frames:
            raise ValueError(f"{seq_len} video tokens do not split into {frames} latent frames")
        windows = audio.windows.to(self.k_proj.weight.dtype)
        key = self.k_proj(windows).reshape(batch * frames, win_len, heads, head_dim).transpose(1, 2)
        value = self.v_proj(windows).reshape(batch * frames, win_len, heads, head_dim).transpose(1, 2)
        query = query.reshape(batch * frames, seq_len // frames, heads, head_dim).transpose(1, 2)

        # A window with no real token (possible only for tiny audio with expand_length 0) would make softmax NaN:
        # let it attend to its zero slots (k = v = 0 since k_proj/v_proj have no bias) and zero its output.
        has_token = audio.valid.any(dim=-1, keepdim=True)
        mask = (audio.valid | ~has_token).to(query.device)
        mask = mask.expand(batch, frames, win_len).reshape(batch * frames, 1, 1, win_len)
        out = F.scaled_dot_product_attention(query, key.to(query.dtype), value.to(query.dtype), attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, frames, seq_len // frames, heads * head_dim)
        out = torch.where(has_token.to(out.device).view(1, frames, 1, 1), out, torch.zeros_like(out))
        return out.reshape(batch, seq_len, heads * head_dim).type_as(query)
