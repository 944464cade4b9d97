"""The FantasyTalking transformer: diffusers' Wan2.1 DiT with the audio cross-attention adapter.

Public API (the loaders, the trainer and the checkpoint code build on exactly these names):
- ``FantasyTalkingTransformer(**WanTransformer3DModel kwargs, audio_in_dim=768, audio_proj_dim=2048)``, a
  ``WanTransformer3DModel`` subclass (``from_config`` / ``save_pretrained`` as usual, audio dims in its config):
  - ``forward(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
    audio_features=None, audio_scale=1.0, return_dict=False) -> (sample,)`` or ``Transformer2DModelOutput``;
  - ``prepare_audio(audio_features, num_latent_frames) -> (windows [B, T_lat, L_win, C], valid [T_lat, L_win])``;
  - ``trainable_parameter_names(patterns) -> list[str]``; ``reset_adapter_parameters()`` (also materialises adapter
    tensors that ``from_pretrained`` of a base-only folder leaves on the meta device);
  - ``proj_model`` (``AudioProjModel``) and ``blocks`` (``AudioAttentionBlock``).
- ``AudioAttentionBlock``: ``WanTransformerBlock`` whose ``attn2.processor`` is an ``AudioCrossAttnProcessor``
  (FSDP wraps this class by name).
- ``adapter_state_dict(model) -> dict[str, Tensor]`` (what trains: ``models/trainable.py``).
- ``WAN21_I2V_14B_CONFIG``, ``TINY_CONFIG`` (from ``dims``).

Parameter names are diffusers' ``WanTransformer3DModel`` names plus ``proj_model.{proj.weight,norm.weight,norm.bias}``
and ``blocks.{i}.attn2.processor.{k_proj,v_proj}.weight``, so a diffusers-layout state dict loads strictly next to
the adapter keys.

Relies on diffusers internals (pinned range in pyproject, checked by tests/test_transformer.py): the
``WanTransformerBlock`` / ``WanAttention`` module layout and ``forward`` (``attn2`` called with no extra arguments,
``set_processor`` assigning the processor as an attribute), ``WanAttnProcessor``'s arithmetic (mirrored by
``AudioCrossAttnProcessor`` with ``attention_dispatch.dispatch_attention_fn``), ``WanTransformer3DModel.__init__``
building ``blocks`` from ``num_layers``, the submodules our ``forward`` runs in diffusers' order (``rope``,
``patch_embedding``, ``condition_embedder``, ``norm_out``, ``proj_out``, ``scale_shift_table``),
``_gradient_checkpointing_func``, and ``from_pretrained`` leaving missing keys on the meta device.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel, WanTransformerBlock
from torch import nn

from fantasytalk_cli.models.audio_adapter import (
    AUDIO_EXPAND_LENGTH,
    AudioContext,
    AudioCrossAttnProcessor,
    AudioProjModel,
    audio_windows,
)
from fantasytalk_cli.models.dims import TINY_CONFIG, WAN21_I2V_14B_CONFIG
from fantasytalk_cli.models.trainable import adapter_weights, matching_names

__all__ = [
    "TINY_CONFIG",
    "WAN21_I2V_14B_CONFIG",
    "AudioAttentionBlock",
    "FantasyTalkingTransformer",
    "adapter_state_dict",
]


class AudioAttentionBlock(WanTransformerBlock):
    """A Wan DiT block whose cross-attention also attends to the latent frame's audio window.

    diffusers' block forward is reused unchanged; the audio input reaches ``attn2.processor`` for the duration of
    this call. Under gradient checkpointing this whole call is re-run, audio included, so recomputation matches.
    """

    def __init__(
        self,
        dim: int,
        ffn_dim: int,
        num_heads: int,
        qk_norm: str = "rms_norm_across_heads",
        cross_attn_norm: bool = False,
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
        audio_proj_dim: int = 2048,
    ) -> None:
        super().__init__(dim, ffn_dim, num_heads, qk_norm, cross_attn_norm, eps, added_kv_proj_dim)
        # set_processor assigns an attribute; nn.Module registers a Module value as the submodule "processor".
        self.attn2.set_processor(AudioCrossAttnProcessor(audio_proj_dim, dim))

    @contextmanager
    def _audio_handover(self, audio: AudioContext | None) -> Iterator[None]:
        """Give ``audio`` to the cross-attention processor for one call, and take it back even on error."""
        processor = self.attn2.processor
        processor.audio = audio
        try:
            yield
        finally:
            processor.audio = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor],
        audio_windows: torch.Tensor | None = None,
        audio_valid: torch.Tensor | None = None,
        audio_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """diffusers' block forward; with ``audio_windows`` [B, T_lat, L_win, C], ``audio_valid`` [T_lat, L_win] and
        ``audio_scale`` [B] (plain tensors, so checkpointing sees them as inputs) the cross-attention adds audio."""
        audio = None
        if audio_windows is not None:
            if audio_valid is None or audio_scale is None:
                raise ValueError("audio_windows needs audio_valid and audio_scale")
            audio = AudioContext(audio_windows, audio_valid, audio_scale)
        with self._audio_handover(audio):
            return super().forward(hidden_states, encoder_hidden_states, temb, rotary_emb)


class FantasyTalkingTransformer(WanTransformer3DModel):
    """Wan2.1 I2V DiT (diffusers' modules and names) + FantasyTalking's ``proj_model`` and per-block audio k/v."""

    _no_split_modules = ["AudioAttentionBlock"]
    _repeated_blocks = ["AudioAttentionBlock"]
    _cp_plan = None  # the audio windows need whole latent frames: sequence-split context parallelism is unsupported

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        audio_in_dim: int = 768,
        audio_proj_dim: int = 2048,
    ) -> None:
        # Build the DiT without blocks (instead of building plain blocks to throw away: 14B of wasted init), then add
        # ours. The parent's decorated __init__ re-registers its kwargs, so num_layers is registered again after.
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=0,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        self.register_to_config(num_layers=num_layers)
        inner_dim = num_attention_heads * attention_head_dim
        self.blocks = nn.ModuleList(
            AudioAttentionBlock(
                inner_dim,
                ffn_dim,
                num_attention_heads,
                qk_norm=qk_norm,
                cross_attn_norm=cross_attn_norm,
                eps=eps,
                added_kv_proj_dim=added_kv_proj_dim,
                audio_proj_dim=audio_proj_dim,
            )
            for _ in range(num_layers)
        )
        self.proj_model = AudioProjModel(audio_in_dim, audio_proj_dim)

    def audio_processors(self) -> list[AudioCrossAttnProcessor]:
        """The per-block audio processors, in block order."""
        return [block.attn2.processor for block in self.blocks]

    def reset_adapter_parameters(self) -> None:
        """(Re-)initialise the adapter: zero k/v (output = base model's), default projector.

        Adapter tensors still on the meta device (``from_pretrained`` of a base-only diffusers folder leaves missing
        keys there) are first materialised on the device of the base weights, keeping their dtype.
        """
        device = self.patch_embedding.weight.device
        for module in (self.proj_model, *self.audio_processors()):
            if any(p.is_meta for p in module.parameters()):
                module.to_empty(device=device)
            module.reset_parameters()

    def trainable_parameter_names(self, patterns: Iterable[str]) -> list[str]:
        """Names of the parameters containing any of ``patterns`` as a substring (the seed's selection rule)."""
        return matching_names(self, patterns)

    def prepare_audio(self, audio_features: torch.Tensor, num_latent_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Project wav2vec2 features [B, L, audio_in_dim] over the whole clip, then cut one window per latent frame.

        Returns ``windows`` [B, T_lat, L_win, audio_proj_dim] with exact zeros in padding slots (zeros in the
        projected space, not projected zeros, which LayerNorm would turn into its bias) and ``valid`` [T_lat, L_win].
        """
        if audio_features.ndim != 3 or audio_features.shape[-1] != self.config.audio_in_dim:
            raise ValueError(
                f"audio_features must be [B, L, {self.config.audio_in_dim}], got {tuple(audio_features.shape)}"
            )
        projected = self.proj_model(audio_features.to(self.proj_model.proj.weight.dtype))
        indices, valid = audio_windows(num_latent_frames, projected.shape[1], AUDIO_EXPAND_LENGTH)
        indices, valid = indices.to(projected.device), valid.to(projected.device)
        windows = projected[:, indices.flatten()].unflatten(1, indices.shape)
        windows = torch.where(valid[None, :, :, None], windows, torch.zeros_like(windows))
        return windows, valid

    def _audio_inputs(
        self,
        audio_features: torch.Tensor | None,
        audio_scale: float | torch.Tensor,
        batch_size: int,
        num_latent_frames: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(windows, valid, scale [B]) for the blocks, or Nones when there is no audio (plain Wan output)."""
        if audio_features is None or (not isinstance(audio_scale, torch.Tensor) and audio_scale == 0):
            return None, None, None
        if audio_features.shape[0] != batch_size:
            raise ValueError(f"audio_features has batch {audio_features.shape[0]}, hidden_states {batch_size}")
        scale = torch.as_tensor(audio_scale, dtype=torch.float32, device=audio_features.device)
        if scale.ndim == 0:
            scale = scale.expand(batch_size)
        elif scale.shape != (batch_size,):
            raise ValueError(f"audio_scale must be a number or a tensor [B={batch_size}], got {tuple(scale.shape)}")
        windows, valid = self.prepare_audio(audio_features, num_latent_frames)
        return windows, valid, scale

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_scale: float | torch.Tensor = 1.0,
        return_dict: bool = False,
    ) -> tuple[torch.Tensor] | Transformer2DModelOutput:
        """Predict the flow for ``hidden_states`` [B, in_channels, T_lat, H, W] at ``timestep`` [B].

        ``encoder_hidden_states`` [B, 512, text_dim], ``encoder_hidden_states_image`` [B, 257, image_dim] (CLIP),
        ``audio_features`` [B, L, audio_in_dim] (wav2vec2 hidden states of the clip), ``audio_scale`` a number or a
        tensor [B] (0 = no audio: exactly the plain Wan I2V output). The steps are diffusers'
        ``WanTransformer3DModel.forward`` (Wan2.1: one timestep per sample), with the audio passed to each block.
        """
        batch_size, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        frames, rows, cols = num_frames // p_t, height // p_h, width // p_w
        if timestep.ndim != 1:
            raise ValueError(f"timestep must be [B] (Wan2.1), got shape {tuple(timestep.shape)}")
        audio = self._audio_inputs(audio_features, audio_scale, batch_size, frames)

        rotary_emb = self.rope(hidden_states)
        hidden_states = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # frame-major
        temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if encoder_hidden_states_image is not None:
            encoder_hidden_states = torch.concat([encoder_hidden_states_image, encoder_hidden_states], dim=1)

        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        for block in self.blocks:
            args = (hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, *audio)
            hidden_states = self._gradient_checkpointing_func(block, *args) if checkpointing else block(*args)

        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = (self.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = self.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, frames, rows, cols, p_t, p_h, p_w, -1)
        output = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return Transformer2DModelOutput(sample=output) if return_dict else (output,)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under our names: ``proj_model.*`` and ``*.processor.*`` (k/v of every block)."""
    return adapter_weights(model.state_dict())
