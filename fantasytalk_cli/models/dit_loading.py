"""The FantasyTalking DiT with the Wan2.1 base weights, from either base layout (``docs/weights.md``), streamed
shard by shard into a meta-built model, or into a model partitioned as it is built (ZeRO-3 init)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fantasytalk_cli.config.wan_yaml import WanModelYaml
from fantasytalk_cli.models.dit_config import dit_files
from fantasytalk_cli.models.key_mapping import MappingPlan
from fantasytalk_cli.models.layout import Layout, ModelLoadError
from fantasytalk_cli.models.state_dict_adapters import DitAdapter
from fantasytalk_cli.models.trainable import is_adapter_name
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import (
    Device,
    ShardedBuild,
    TensorSource,
    assert_materialised,
    build_empty,
    fp32_rule,
    init_kwargs,
    plan_for,
    stream_into,
    write_sharded,
)


def _transformer_kwargs(
    model_dir: Path, wan_yaml: WanModelYaml | None, audio_in_dim: int | None, audio_proj_dim: int | None
) -> tuple[Layout, TensorSource, dict[str, Any]]:
    """(layout, DiT tensor source, constructor kwargs) with the adapter dims: the config's, else the given ones,
    else FantasyTalking's 768 / 2048; a given value the config contradicts is an error."""
    layout, folder, config, source = dit_files(model_dir, wan_yaml)
    kwargs = init_kwargs(FantasyTalkingTransformer, config, folder / "config.json")
    for key, given, default in (("audio_in_dim", audio_in_dim, 768), ("audio_proj_dim", audio_proj_dim, 2048)):
        if given is not None and key in kwargs and kwargs[key] != given:
            raise ModelLoadError(f"{folder / 'config.json'}: {key} is {kwargs[key]}, but {given} was asked for")
        kwargs[key] = kwargs.get(key, given if given is not None else default)
    return layout, source, kwargs


def meta_transformer(
    model_dir: Path,
    *,
    wan_yaml: WanModelYaml | None = None,
    audio_in_dim: int | None = None,
    audio_proj_dim: int | None = None,
) -> FantasyTalkingTransformer:
    """The transformer ``load_transformer`` would build, on the meta device and without weights: its names and
    shapes, to check files against before anything is read."""
    _, _, kwargs = _transformer_kwargs(Path(model_dir), wan_yaml, audio_in_dim, audio_proj_dim)
    return build_empty(lambda: FantasyTalkingTransformer(**kwargs))


FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def load_transformer(
    model_dir: Path,
    *,
    dtype: torch.dtype = torch.float32,
    wan_yaml: WanModelYaml | None = None,
    device: Device = "cpu",
    audio_in_dim: int | None = None,
    audio_proj_dim: int | None = None,
    adapter_dtype: torch.dtype | None = None,
    sharded: ShardedBuild | None = None,
    on_meta: Callable[[FantasyTalkingTransformer], None] | None = None,
) -> FantasyTalkingTransformer:
    """The FantasyTalking DiT with the Wan2.1 base weights of ``model_dir`` (either layout), streamed shard by shard.

    The adapter is not in a base folder (allow-listed): it starts fresh (zero k/v) unless the folder's diffusers
    config says otherwise; load the released one with `load_adapter_or_transformer`. ``audio_in_dim`` /
    ``audio_proj_dim`` default to the config's values, else FantasyTalking's 768 / 2048 (the tiny world uses 32).
    Base weights are cast to ``dtype`` (diffusers' ``_keep_in_fp32_modules`` stay float32), the adapter to
    ``adapter_dtype`` (default ``dtype``). Returned in eval mode.

    With ``sharded`` (ZeRO-3 ``zero3_init``) the model is built inside its context, so every rank holds
    only its partition; each tensor is read on the reading rank only and written through ``sharded.write``
    (which gathers that one parameter): no rank ever holds the whole transformer.

    ``on_meta`` is called with the model built on the meta device, before any weight is read (not with
    ``sharded``): a parameter it gives a float8 dtype (`store_in_fp8`) is read straight into float8, one tensor
    at a time, so the host's peak stays near the float8 size instead of the load dtype's.
    """
    layout, source, kwargs = _transformer_kwargs(Path(model_dir), wan_yaml, audio_in_dim, audio_proj_dim)
    model = build_empty(lambda: FantasyTalkingTransformer(**kwargs))
    plan = plan_for(model, source, DitAdapter(layout, adapter_absent="base"))
    if sharded is not None:
        if on_meta is not None:
            raise ValueError("on_meta does not apply to a transformer built partitioned (ZeRO-3)")
        return _load_sharded(kwargs, source, plan, sharded)
    if on_meta is not None:
        on_meta(model)
    stored = {name: p.dtype for name, p in model.named_parameters() if p.dtype in FLOAT8_DTYPES}
    adapter_dtype = adapter_dtype or dtype
    keep_fp32 = fp32_rule(model, dtype)

    def dtype_for(name: str) -> torch.dtype:
        if name in stored:
            return stored[name]
        if is_adapter_name(name):
            return adapter_dtype
        return torch.float32 if keep_fp32(name) else dtype

    stream_into(model, source, plan, dtype=dtype, device=device, dtype_for=dtype_for)
    _init_absent_adapter(model, sorted(plan.absent), device=device, dtype=adapter_dtype, where=source.where)
    assert_materialised(model, source.where)
    return model.eval()


def _load_sharded(
    kwargs: dict[str, Any], source: TensorSource, plan: MappingPlan, sharded: ShardedBuild
) -> FantasyTalkingTransformer:
    with sharded.context():
        model = FantasyTalkingTransformer(**kwargs)  # zero k/v, default projector: the fresh adapter
    write_sharded(model, source, plan, sharded)
    return model.eval()


def _init_absent_adapter(
    model: FantasyTalkingTransformer, absent: list[str], *, device: Device, dtype: torch.dtype, where: Path
) -> None:
    """Give the adapter fresh weights (zero k/v, default projector) when the base folder has none of it."""
    if not absent:
        return
    adapter = sorted(n for n, _ in model.named_parameters() if is_adapter_name(n))
    if absent != adapter:
        lacking = sorted(set(adapter) & set(absent))
        raise ModelLoadError(f"{where}: holds part of the audio adapter; lacks {len(lacking)}, e.g. {lacking[:10]}")
    owners = {name.rpartition(".")[0] for name in absent}
    for owner in owners:
        model.get_submodule(owner).to_empty(device=device, recurse=False)
    model.reset_adapter_parameters()
    for owner in owners:
        model.get_submodule(owner).to(dtype=dtype)
