"""Load what a training run needs: the transformer (frozen base + trainable adapter, in the right
dtypes), the frozen encoders and wav2vec2, from `cfg.model`.

Precision: frozen weights in the mixed-precision dtype (bf16), trainable weights in fp32 (the
reference updates bf16 weights directly). FSDP flattens each unit's parameters together and needs one
dtype per unit, so under FSDP the base stays fp32 and FSDP's mixed-precision policy computes in bf16. With
`--base_weights_dtype fp8` the frozen DiT's linears are read straight into float8 (computed in the frozen dtype).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fantasytalk_cli.config.schema import ModelConfig, TrainConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.fileio import format_size
from fantasytalk_cli.models.adapter_file import load_adapter_or_transformer
from fantasytalk_cli.models.audio import Wav2Vec2Features
from fantasytalk_cli.models.dit_config import adapter_dims, find_wav2vec
from fantasytalk_cli.models.dit_loading import load_transformer
from fantasytalk_cli.models.encoders import FrozenEncoders, load_frozen_encoders
from fantasytalk_cli.models.lora import add_lora, lora_of
from fantasytalk_cli.models.trainable import set_trainable
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import ShardedBuild
from fantasytalk_cli.runtime.dtypes import DTYPES
from fantasytalk_cli.runtime.memory_options import store_in_fp8


class ModelSetupError(FtalkError, RuntimeError):
    """The model config points at something that cannot be loaded for training."""


@dataclass
class TrainingModels:
    transformer: FantasyTalkingTransformer
    encoders: FrozenEncoders
    wav2vec: Wav2Vec2Features | None
    """None when the feature cache holds every audio feature the run needs."""
    trainable_parameters: int
    frozen_dtype: torch.dtype
    notes: list[str] = field(default_factory=list)


def load_training_models(
    model: ModelConfig,
    train: TrainConfig,
    *,
    device: torch.device,
    uniform_dtype: bool,
    sharded: ShardedBuild | None = None,
    cached: frozenset[str] = frozenset(),
) -> TrainingModels:
    """Everything built on the CPU (the accelerator placement is accelerate's job), encoders on
    `device` unless `low_vram`. `uniform_dtype`: keep the whole transformer in fp32 (FSDP).
    `sharded`: ZeRO-3 init, the transformer is built partitioned (DeepSpeed keeps fp32 masters). `cached`: the
    kinds of features ("text", "audio", "video") the feature cache holds for the whole run: umT5, wav2vec2, or
    the VAE and CLIP are then not loaded."""
    if model.pretrained_model_name_or_path is None:
        raise ModelSetupError("--pretrained_model_name_or_path is required: the Wan2.1-I2V base model folder")
    base = model.pretrained_model_name_or_path
    wan_yaml = load_wan_yaml(model.config_path)
    frozen = DTYPES[train.mixed_precision]
    notes: list[str] = []
    wav2vec_dir = find_wav2vec(model)

    def fp8_storage(meta: FantasyTalkingTransformer) -> None:  # on meta: refused before, and streamed as, fp8
        if model.trainable_modules:
            set_trainable(meta, model.trainable_modules)
        store_in_fp8(meta, frozen)

    transformer = load_transformer(
        base,
        dtype=torch.float32 if uniform_dtype else frozen,
        wan_yaml=wan_yaml,
        adapter_dtype=torch.float32,
        sharded=sharded,
        on_meta=fp8_storage if model.base_weights_dtype == "fp8" else None,
        **adapter_dims(wav2vec_dir, model.transformer_path),
    )
    if model.transformer_path is not None:
        notes.append(load_adapter_or_transformer(model.transformer_path, transformer, sharded).summary())
    lora = lora_of(model)
    if lora is not None:  # after the base weights (and their float8 storage): peft wraps the loaded linears
        lora_count = add_lora(transformer, lora, train.seed)
        notes.append(f"{lora.describe()}: {lora_count:,} parameters, float32")
    count = set_trainable(transformer, model.trained_patterns())
    if model.base_weights_dtype == "fp8":
        frozen_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters() if not p.requires_grad)
        notes.append(f"frozen DiT weights stored in float8_e4m3fn: {format_size(frozen_bytes)}")
    for param in transformer.parameters():
        if sharded is None and param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # trainable weights and their optimizer state stay fp32
    if model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    wav2vec = None if "audio" in cached else Wav2Vec2Features.from_pretrained(wav2vec_dir, dtype=torch.float32)
    encoders = load_frozen_encoders(
        base,
        dtype=frozen,
        wan_yaml=wan_yaml,
        vae_mini_batch=model.vae_mini_batch,
        device=device,
        low_vram=model.low_vram,
        vae_dtype=torch.float32,
        text="text" not in cached,
        video="video" not in cached,
    )
    if not model.low_vram and wav2vec is not None:
        wav2vec.to(device)
    notes.append(f"trainable: {count:,} parameters matching {list(model.trained_patterns())}")
    return TrainingModels(transformer, encoders, wav2vec, count, frozen, notes)
