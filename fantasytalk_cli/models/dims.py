"""Constructor kwargs of `FantasyTalkingTransformer`: the real Wan2.1-I2V-14B + adapter, and a tiny test twin.

Plain dicts (JSON-shaped, lists not tuples) so they can be written as a diffusers ``config.json`` as they are.
The keys are `WanTransformer3DModel`'s constructor kwargs plus ``audio_in_dim`` / ``audio_proj_dim``.
"""

from __future__ import annotations

from typing import Any

# docs/model.md#base-dit-dimensions; identical to the Wan-I2V-14B-720p entry of diffusers' convert_wan_to_diffusers.py
# (the source of the manifest diffusers_wan21_i2v_14b_transformer.json) plus the FantasyTalking adapter dims.
WAN21_I2V_14B_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 40,
    "attention_head_dim": 128,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 13824,
    "num_layers": 40,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": 1280,
    "added_kv_proj_dim": 5120,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
    "audio_in_dim": 768,
    "audio_proj_dim": 2048,
}

# Same structure at dim 32 (2 heads x 16: RoPE splits the head 8/4/4 for t/h/w). in/out channels stay 36/16
# because the VAE's z_dim (16) is fixed; the CLIP width (image_dim) and the wav2vec2 width shrink to 32.
TINY_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "in_channels": 36,
    "out_channels": 16,
    "text_dim": 32,
    "freq_dim": 32,
    "ffn_dim": 64,
    "num_layers": 2,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "image_dim": 32,
    "added_kv_proj_dim": 32,
    "rope_max_seq_len": 1024,
    "pos_embed_seq_len": None,
    "audio_in_dim": 32,
    "audio_proj_dim": 32,
}

AUDIO_CONFIG_KEYS: tuple[str, ...] = ("audio_in_dim", "audio_proj_dim")
"""Keys of the configs above that `WanTransformer3DModel` itself does not take."""


def wan_config(config: dict[str, Any]) -> dict[str, Any]:
    """The plain `WanTransformer3DModel` kwargs of a FantasyTalking config (the audio keys dropped)."""
    return {k: v for k, v in config.items() if k not in AUDIO_CONFIG_KEYS}
