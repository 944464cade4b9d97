"""The choices of `ftalk convert-zero`: what to write, in which naming and precision. Torch-free, so the command
line takes its option types from here without importing the converter."""

from __future__ import annotations

from typing import Literal

What = Literal["adapter", "transformer"]
OutFormat = Literal["fantasytalking", "diffusers", "original", "comfyui", "kohya"]
OutDtype = Literal["bf16", "fp16", "fp32"]
"""In the order `--help` lists them."""

LORA_FILES: dict[str, str] = {
    "fantasytalking": "lora_wan.safetensors",
    "original": "lora_wan.safetensors",
    "comfyui": "lora_comfyui.safetensors",
    "diffusers": "pytorch_lora_weights.safetensors",
    "kohya": "lora_kohya.safetensors",
}
"""The LoRA file each `--format` writes beside the adapter (diffusers' own default name for its layout)."""
