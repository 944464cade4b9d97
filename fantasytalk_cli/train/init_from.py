"""`--init_from`: a new run that starts from another run's trained weights (the paper's second stage from its first):
the trainable tensors only, from any form `ftalk sample --adapter` takes (a checkpoint, a run folder, a convert-zero
folder, an adapter file), into this run's own config, optimizer and schedule, at step 0.

Checked before anything slow against the configured model built on the meta device (names and shapes: a checkpoint
of another model size, or another LoRA, is refused naming what differs); loaded once the models are built, before
the strategy wraps them."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fantasytalk_cli.config.schema import ModelConfig
from fantasytalk_cli.config.wan_yaml import load_wan_yaml
from fantasytalk_cli.errors import FtalkUsageError
from fantasytalk_cli.models.dit_config import adapter_dims, find_wav2vec
from fantasytalk_cli.models.dit_loading import meta_transformer
from fantasytalk_cli.models.layout import ModelLoadError
from fantasytalk_cli.models.lora import inject_lora, lora_of
from fantasytalk_cli.sample.adapter_source import AdapterSource, check_adapter, load_adapter, resolve_adapter

INIT_FROM_REFUSED = ("zero3",)
"""Strategies whose transformer is built partitioned, where the weights cannot be copied in place before wrapping."""


class InitFromError(FtalkUsageError):
    """`--init_from` names weights this run cannot start from."""


def check_init_from(path: Path, model: ModelConfig, strategy: str) -> AdapterSource:
    """What `--init_from` holds, checked against this run's model (see the module docstring)."""
    if strategy in INIT_FROM_REFUSED:
        raise InitFromError(
            f"--init_from cannot run under {strategy}: the transformer is built partitioned there. Start stage 2 "
            "with DDP, ZeRO-2 or FSDP, or convert the weights (convert-zero) and give them as --transformer_path"
        )
    source = resolve_adapter(Path(path))
    want = lora_of(model)
    held = None if source.lora is None else (source.lora.rank, tuple(sorted(source.lora.targets)))
    if held is not None and (want is None or (want.rank, tuple(sorted(want.targets))) != held):
        asked = "no LoRA" if want is None else f"LoRA rank {want.rank} on {', '.join(want.targets)}"
        raise InitFromError(
            f"--init_from {path}: it holds a {source.lora.describe()}; this run asks for {asked}: give the same "  # type: ignore[union-attr]
            "--lora_rank and --lora_target_modules to start from it"
        )
    assert model.pretrained_model_name_or_path is not None
    meta = meta_transformer(
        model.pretrained_model_name_or_path,
        wan_yaml=load_wan_yaml(model.config_path),
        **adapter_dims(find_wav2vec(model), model.transformer_path),
    )
    if want is not None:
        inject_lora(meta, want)
    try:
        check_adapter(source, meta)
    except ModelLoadError as exc:
        raise InitFromError(f"--init_from {path}: {exc}") from exc
    return source


def init_from(source: AdapterSource, transformer: nn.Module) -> str:
    """Copy the weights of ``source`` into the built transformer (dtypes and devices kept); one line for the log."""
    return f"initialised from {load_adapter(source, transformer)}"
