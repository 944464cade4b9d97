"""Load the base model from its real on-disk layouts, and the adapter from its released forms.

Two base layouts: the original Wan2.1 folder (sharded DiT safetensors with original names + ``config.json``,
``models_t5_umt5-xxl-enc-bf16.pth``, the open-clip ``.pth``, ``Wan2.1_VAE.pth``, ``google/umt5-xxl/``) and the
diffusers folder (``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``image_encoder/``...). Every model is built on the meta device and filled tensor by tensor (``safe_open`` per
tensor, ``torch.load(weights_only=True, mmap=True)`` for ``.pth``), cast on the way, so peak memory is about one
copy of the model. Each file goes through a `state_dict_adapters` map that is checked on names and shapes before a
byte of weights is read: a missing, unexpected or wrong-shape key is a `ModelLoadError` naming the file and keys;
a key absent on purpose is on an allow-list with its reason.

Public API: `detect_layout`, `load_transformer`, `load_vae`, `load_text_encoder`, `load_tokenizer`,
`load_image_encoder`, `load_adapter_or_transformer`, `adapter_to_format`, `read_adapter_file`, `ModelLoadError`.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from fantasytalk_cli.config.wan_yaml import WanModelYaml, load_wan_yaml
from fantasytalk_cli.errors import FtalkError
from fantasytalk_cli.models.state_dict_adapters import (
    AdapterFileAdapter,
    ClipVisionAdapter,
    DitAdapter,
    MappingPlan,
    Shape,
    StateDictAdapter,
    T5Adapter,
    VaeAdapter,
    Wav2Vec2Adapter,
    adapter_name_to_form,
    dit_name_to_original,
    is_adapter_name,
    plan_mapping,
)

if TYPE_CHECKING:
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionModel, PreTrainedTokenizerBase, UMT5EncoderModel

    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

Layout = Literal["original", "diffusers"]
AdapterFormat = Literal["fantasytalking", "flat", "comfyui", "diffusers", "original"]
Device = str | torch.device

DIT_SHARD_PREFIX = "diffusion_pytorch_model"
"""File stem of the DiT (and diffusers VAE) weights: ``<stem>.safetensors`` or ``<stem>-0000i-of-0000n`` + index."""

WAN_CLIP_HEADS = 16
"""Attention heads of Wan's open-clip XLM-R ViT-H/14 (width 1280, heads of 80). The ``.pth`` does not record it
(every other size is read from tensor shapes), so the original-layout loader takes it from Wan's model definition."""

WAN_T5_REL_MAX_DISTANCE = 128
"""umT5's relative position ``max_distance`` (Wan's ``T5RelativeEmbedding`` default); not visible in shapes."""

WAN_DIT_DEFAULTS: dict[str, Any] = {
    "model_type": "t2v",
    "patch_size": [1, 2, 2],
    "text_len": 512,
    "in_dim": 16,
    "dim": 2048,
    "ffn_dim": 8192,
    "freq_dim": 256,
    "text_dim": 4096,
    "out_dim": 16,
    "num_heads": 16,
    "num_layers": 32,
    "window_size": [-1, -1],
    "qk_norm": True,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
"""Wan's ``WanModel`` constructor defaults: what an original ``config.json`` leaves out means these."""


class ModelLoadError(FtalkError):
    """A model file is missing, unreadable, or does not match the model; the message names the file and keys."""


# --------------------------------------------------------------------------------------------------------------------
# Layout and paths.


def _yaml(wan_yaml: WanModelYaml | None) -> WanModelYaml:
    return wan_yaml if wan_yaml is not None else load_wan_yaml(None)


def detect_layout(model_dir: Path, wan_yaml: WanModelYaml | None = None) -> Layout:
    """``"diffusers"`` when the folder has ``model_index.json``; ``"original"`` when it has the Wan DiT's
    ``config.json`` or shards (where ``transformer_subpath`` says); otherwise a `ModelLoadError` listing the folder."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir}: base model folder not found")
    if (model_dir / "model_index.json").is_file():
        return "diffusers"
    dit_dir = model_dir / _yaml(wan_yaml).transformer_additional_kwargs.transformer_subpath
    if (dit_dir / "config.json").is_file() or any(dit_dir.glob(f"{DIT_SHARD_PREFIX}*.safetensors*")):
        return "original"
    found = sorted(p.name for p in model_dir.iterdir())[:20]
    raise ModelLoadError(
        f"{model_dir} is neither the original Wan2.1 layout (config.json, {DIT_SHARD_PREFIX}-*.safetensors + index, "
        "Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, ...) nor the diffusers layout (model_index.json, "
        f"transformer/, vae/, text_encoder/, ...); it holds: {found}"
    )


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise ModelLoadError(f"{path}: missing ({what})")
    return path


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(_need(path, what).read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# --------------------------------------------------------------------------------------------------------------------
# Stored tensors: safetensors (one file or shards + index) and torch .pth files.


def _diagnose_safetensors(path: Path) -> str:
    """Say what is wrong with an unreadable safetensors file, naming the first tensor a truncation cuts."""
    size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if size < 8 or 8 + header_len > size:
                return f"the header claims {header_len} bytes but the file has {size}: truncated or not safetensors"
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        return f"the header is unreadable ({exc})"
    data_len = size - 8 - header_len
    entries = sorted((v["data_offsets"][1], k) for k, v in header.items() if k != "__metadata__")
    for end, key in entries:
        if end > data_len:
            return f"truncated: tensor {key!r} needs {end} bytes of data but the file holds {data_len}"
    return "the file is corrupt"


@contextmanager
def _open_safetensors(path: Path) -> Iterator[Any]:
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{path}: missing") from exc
    except Exception as exc:  # safetensors raises its own SafetensorError for every header problem
        raise ModelLoadError(f"{path}: cannot read safetensors: {_diagnose_safetensors(path)} ({exc})") from exc
    with handle as f:
        yield f


def _torch_load(path: Path) -> Any:
    """``torch.load`` a checkpoint safely (``weights_only=True``) and lazily (``mmap=True``) where the format allows."""
    _need(path, "torch checkpoint")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise ModelLoadError(f"{path}: cannot read the torch checkpoint (truncated or corrupt?): {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the torch checkpoint (truncated or corrupt?): {exc}") from exc
    try:  # the legacy (pre-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read the torch checkpoint (truncated or corrupt?): {exc}") from exc


@dataclass
class TensorSource:
    """Where one model's stored tensors are: ``key -> file`` and ``key -> shape``, known before any data is read."""

    where: Path
    """The file, or the index file of a sharded set: what error messages name."""
    files: dict[Path, list[str]]
    """Each file with its keys, in reading order."""
    shapes: dict[str, Shape]
    state: dict[str, torch.Tensor] | None = None
    """For a ``.pth``: the lazily loaded (memory-mapped) state dict."""

    def file_of(self, key: str) -> str:
        """The file name holding ``key``."""
        return next((path.name for path, keys in self.files.items() if key in keys), self.where.name)

    @contextmanager
    def reader(self, path: Path) -> Iterator[Callable[[str], torch.Tensor]]:
        """A function reading one tensor of ``path`` at a time."""
        if self.state is not None:
            state = self.state
            yield lambda key: state[key]
            return
        with _open_safetensors(path) as handle:
            yield lambda key: _read_tensor(handle, key, path)


def _read_tensor(handle: Any, key: str, path: Path) -> torch.Tensor:
    """One tensor out of an open safetensors file (the only place loaders read safetensors data)."""
    try:
        return handle.get_tensor(key)
    except Exception as exc:
        raise ModelLoadError(f"{path}: cannot read tensor {key!r}: {exc}") from exc


def safetensors_source(folder: Path, stem: str, what: str, *, single_only: bool = False) -> TensorSource:
    """The tensors of the shards listed in ``<stem>.safetensors.index.json``, else of ``<stem>.safetensors``
    (only the latter with ``single_only``).

    Each shard's header is read (not its data) and must hold exactly the keys the index gives it.
    """
    index_path = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index_path.is_file() and not single_only:
        weight_map = _read_json(index_path, what).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index_path}: no weight_map")
        by_file: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            by_file.setdefault(folder / name, []).append(key)
        where = index_path
    elif single.is_file():
        by_file, where = {single: []}, single
    else:
        raise ModelLoadError(f"{single} (or its sharded index {index_path.name}): missing ({what})")
    shapes: dict[str, Shape] = {}
    files: dict[Path, list[str]] = {}
    for path, listed in sorted(by_file.items()):
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: missing shard ({what}; the index maps {len(listed)} keys to it, e.g. {listed[0]!r})"
            )
        with _open_safetensors(path) as handle:
            keys = sorted(handle.keys())
            for key in keys:
                shapes[key] = tuple(handle.get_slice(key).get_shape())
        if listed and set(listed) != set(keys):
            extra, lost = sorted(set(keys) - set(listed)), sorted(set(listed) - set(keys))
            raise ModelLoadError(
                f"{path}: keys differ from {index_path.name}: in the shard but not the index {extra[:10]}, "
                f"in the index but not the shard {lost[:10]}"
            )
        files[path] = keys
    return TensorSource(where, files, shapes)


def torch_source(path: Path, what: str) -> TensorSource:
    """The tensors of a ``.pth`` state dict (memory-mapped; nothing is copied until a tensor is used)."""
    state = _torch_load(_need(path, what))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: expected a flat state dict of tensors ({what})")
    return TensorSource(path, {path: sorted(state)}, {k: tuple(v.shape) for k, v in state.items()}, state)


# --------------------------------------------------------------------------------------------------------------------
# Streaming into a meta-built model.


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with its parameters on the meta device (buffers stay real: RoPE tables, position ids)."""
    with init_empty_weights(include_buffers=False):
        return factory()


def model_shapes(model: nn.Module) -> tuple[dict[str, Shape], dict[str, str]]:
    """Every parameter and persistent buffer name with its shape, and ``alias -> canonical`` for tied tensors."""
    shapes: dict[str, Shape] = {}
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 partitions know their full shape
        canonical = first.setdefault(id(param), name)
        if canonical != name:
            aliases[name] = canonical
    for module_name, module in model.named_modules():
        for leaf, buf in module._buffers.items():
            if buf is not None and leaf not in module._non_persistent_buffers_set:
                shapes[f"{module_name}.{leaf}" if module_name else leaf] = tuple(buf.shape)
    return shapes, aliases


def _fp32_rule(model: nn.Module, dtype: torch.dtype) -> Callable[[str], bool]:
    """Which names stay float32 when loading in a lower precision: the model class's own rule, as
    diffusers (``_keep_in_fp32_modules``, any dtype) and transformers (fp16 only, or ``..._strict``) apply it."""
    if dtype == torch.float32:
        return lambda name: False
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    modules: set[str] = set()
    if isinstance(model, ModelMixin):
        modules |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    elif isinstance(model, PreTrainedModel):
        modules |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
        if dtype == torch.float16:
            modules |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return lambda name: bool(modules.intersection(name.split(".")))


def set_tensor(
    model: nn.Module, name: str, value: torch.Tensor, *, dtype: torch.dtype, device: Device, own: bool = False
) -> None:
    """Put ``value`` into parameter/buffer ``name``: assigned when still on meta (no second copy), copied into the
    existing tensor otherwise (keeping its dtype and device).

    ``own=True`` makes an assigned tensor own its memory even when no cast or move copied it: a tensor read from a
    safetensors shard is a view of the shard's memory map, and one surviving view (say a float32-kept norm) would
    keep the whole mapped shard resident after the shard is done.
    """
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    slots = module._parameters if leaf in module._parameters else module._buffers if leaf in module._buffers else None
    if slots is None:
        raise ModelLoadError(f"{type(model).__name__} has no parameter or buffer {name!r}")
    old = slots[leaf]
    if old is not None and not old.is_meta:
        with torch.no_grad():
            old.copy_(value.to(device=old.device, dtype=old.dtype))
        return
    tensor = value.to(device=device, dtype=dtype)
    if own and tensor.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
        tensor = tensor.clone()
    if slots is module._parameters:
        slots[leaf] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else False)
    else:
        slots[leaf] = tensor


def plan_for(model: nn.Module, source: TensorSource, adapter: StateDictAdapter) -> MappingPlan:
    """Plan ``source`` into ``model`` by names and shapes; a `ModelLoadError` lists every problem, each stored key
    with the shard holding it."""
    shapes, aliases = model_shapes(model)
    origin = source.file_of if len(source.files) > 1 else None
    plan = plan_mapping(adapter, source.shapes, shapes, aliases, origin)
    if not plan.ok:
        raise ModelLoadError(plan.problems(str(source.where)))
    return plan


def stream_into(
    model: nn.Module,
    source: TensorSource,
    plan: MappingPlan,
    *,
    dtype: torch.dtype,
    device: Device,
    dtype_for: Callable[[str], torch.dtype] | None = None,
) -> int:
    """Read ``source`` one tensor at a time into ``model`` following ``plan``; returns the tensors read."""
    keep_fp32 = _fp32_rule(model, dtype)
    mapped = source.state is None  # safetensors shards are memory-mapped and closed one by one
    read = 0
    for path, keys in source.files.items():
        with source.reader(path) as get:
            for key in keys:
                targets = plan.moves.get(key)
                if not targets:
                    continue
                tensor = get(key)
                read += 1
                for target, transform in targets:
                    want = dtype_for(target) if dtype_for else (torch.float32 if keep_fp32(target) else dtype)
                    set_tensor(model, target, transform.apply(tensor), dtype=want, device=device, own=mapped)
                del tensor
    source.state = None  # drop the memory map of a .pth
    return read


def _assert_materialised(model: nn.Module, where: Path) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ModelLoadError(f"{where}: parameters left unfilled after loading: {left[:20]}")


def _load(
    model: nn.Module, source: TensorSource, adapter: StateDictAdapter, *, dtype: torch.dtype, device: Device
) -> MappingPlan:
    plan = plan_for(model, source, adapter)
    stream_into(model, source, plan, dtype=dtype, device=device)
    return plan


def _init_kwargs(cls: type, config: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Constructor kwargs from a diffusers ``config.json``: ``_``-keys dropped, unknown keys an error."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelLoadError(f"{path}: keys {cls.__name__} does not take: {unknown}")
    return kwargs


# --------------------------------------------------------------------------------------------------------------------
# The DiT.


def dit_config_from_original(config: Mapping[str, Any], shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """An original Wan ``config.json`` (``dim``, ``num_heads``, ``in_dim``...) -> diffusers constructor kwargs.

    Keys it leaves out take ``WanModel``'s defaults; the CLIP width (``image_dim``), which ``WanModel`` hard-codes
    to 1280, is read from the stored ``img_emb.proj.0.weight`` shape.
    """
    unknown = sorted(k for k in config if not k.startswith("_") and k not in WAN_DIT_DEFAULTS)
    if unknown:
        raise ModelLoadError(f"{path}: keys Wan's WanModel does not take: {unknown}")
    cfg = {**WAN_DIT_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if cfg["model_type"] != "i2v":
        raise ModelLoadError(f"{path}: model_type {cfg['model_type']!r}; FantasyTalking needs the I2V DiT ('i2v')")
    if list(cfg["window_size"]) != [-1, -1]:
        raise ModelLoadError(f"{path}: window_size {cfg['window_size']} (local attention) is not supported")
    dim, heads = int(cfg["dim"]), int(cfg["num_heads"])
    if dim % heads:
        raise ModelLoadError(f"{path}: dim {dim} is not divisible by num_heads {heads}")
    image_key = "img_emb.proj.0.weight"
    if image_key not in shapes:
        raise ModelLoadError(f"{path}: the I2V DiT weights lack {image_key!r} (the CLIP image embedding)")
    return {
        "patch_size": list(cfg["patch_size"]),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(cfg["in_dim"]),
        "out_channels": int(cfg["out_dim"]),
        "text_dim": int(cfg["text_dim"]),
        "freq_dim": int(cfg["freq_dim"]),
        "ffn_dim": int(cfg["ffn_dim"]),
        "num_layers": int(cfg["num_layers"]),
        "cross_attn_norm": bool(cfg["cross_attn_norm"]),
        "qk_norm": "rms_norm_across_heads" if cfg["qk_norm"] else None,
        "eps": float(cfg["eps"]),
        "image_dim": int(shapes[image_key][0]),
        "added_kv_proj_dim": dim,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def dit_files(model_dir: Path, wan_yaml: WanModelYaml | None) -> tuple[Layout, Path, dict[str, Any], TensorSource]:
    """The DiT of a model folder in either layout: (layout, folder, diffusers-style config, tensor source)."""
    layout = detect_layout(model_dir, wan_yaml)
    if layout == "original":
        folder = model_dir / _yaml(wan_yaml).transformer_additional_kwargs.transformer_subpath
        source = safetensors_source(folder, DIT_SHARD_PREFIX, "Wan DiT weights")
        config_path = folder / "config.json"
        config = dit_config_from_original(_read_json(config_path, "Wan DiT config"), source.shapes, config_path)
    else:
        folder = model_dir / "transformer"
        source = safetensors_source(folder, DIT_SHARD_PREFIX, "diffusers transformer weights")
        config = _read_json(folder / "config.json", "diffusers transformer config")
    return layout, folder, config, source


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
    """
    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    model_dir = Path(model_dir)
    layout, folder, config, source = dit_files(model_dir, wan_yaml)
    kwargs = _init_kwargs(FantasyTalkingTransformer, config, folder / "config.json")
    for key, given, default in (("audio_in_dim", audio_in_dim, 768), ("audio_proj_dim", audio_proj_dim, 2048)):
        if given is not None and key in kwargs and kwargs[key] != given:
            raise ModelLoadError(f"{folder / 'config.json'}: {key} is {kwargs[key]}, but {given} was asked for")
        kwargs[key] = kwargs.get(key, given if given is not None else default)
    model = build_empty(lambda: FantasyTalkingTransformer(**kwargs))
    plan = plan_for(model, source, DitAdapter(layout, adapter_absent="base"))
    if sharded is not None:
        return _load_sharded(kwargs, source, plan, sharded)
    adapter_dtype = adapter_dtype or dtype
    keep_fp32 = _fp32_rule(model, dtype)

    def dtype_for(name: str) -> torch.dtype:
        if is_adapter_name(name):
            return adapter_dtype
        return torch.float32 if keep_fp32(name) else dtype

    stream_into(model, source, plan, dtype=dtype, device=device, dtype_for=dtype_for)
    _init_absent_adapter(model, sorted(plan.absent), device=device, dtype=adapter_dtype, where=source.where)
    _assert_materialised(model, source.where)
    return model.eval()


@dataclass(frozen=True)
class ShardedBuild:
    """How to build and fill a transformer whose parameters are partitioned as it is built (ZeRO-3 init)."""

    context: Callable[[], Any]
    """A context manager inside which modules are built partitioned."""
    write: Callable[[nn.Parameter, torch.Tensor | None], None]
    """Collective: write a whole tensor (given on the reading rank, None elsewhere) into one parameter."""
    reads: bool
    """Whether this rank reads the files."""


def _load_sharded(
    kwargs: dict[str, Any], source: TensorSource, plan: MappingPlan, sharded: ShardedBuild
) -> FantasyTalkingTransformer:
    from fantasytalk_cli.models.transformer import FantasyTalkingTransformer

    with sharded.context():
        model = FantasyTalkingTransformer(**kwargs)  # zero k/v, default projector: the fresh adapter
    _write_sharded(model, source, plan, sharded)
    return model.eval()


def _write_sharded(model: nn.Module, source: TensorSource, plan: MappingPlan, sharded: ShardedBuild) -> int:
    """Every rank walks the same keys in the same order (each write is a collective); returns tensors read."""
    params = dict(model.named_parameters())
    read = 0
    for path, keys in source.files.items():
        with source.reader(path) as get:
            for key in keys:
                for target, transform in plan.moves.get(key, ()):
                    if target not in params:
                        raise ModelLoadError(f"{source.where}: {key} maps to {target}, not a parameter")
                    sharded.write(params[target], transform.apply(get(key)) if sharded.reads else None)
                    read += 1
    source.state = None
    return read


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


# --------------------------------------------------------------------------------------------------------------------
# The VAE.


def load_vae(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, wan_yaml: WanModelYaml | None = None, device: Device = "cpu"
) -> AutoencoderKLWan:
    """diffusers' ``AutoencoderKLWan`` from ``Wan2.1_VAE.pth`` (sizes read from its shapes) or from ``vae/``."""
    from diffusers import AutoencoderKLWan

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        path = model_dir / _yaml(wan_yaml).vae_kwargs.vae_subpath
        source = torch_source(path, "Wan VAE weights (vae_kwargs.vae_subpath)")
        kwargs = _vae_config_from_shapes(source.shapes, path)
        adapter = VaeAdapter("original")
    else:
        folder = model_dir / "vae"
        kwargs = _init_kwargs(AutoencoderKLWan, _read_json(folder / "config.json", "diffusers VAE config"), folder)
        source = safetensors_source(folder, DIT_SHARD_PREFIX, "diffusers VAE weights")
        adapter = VaeAdapter("diffusers")
    model = build_empty(lambda: AutoencoderKLWan(**kwargs))
    _load(model, source, adapter, dtype=dtype, device=device)
    _assert_materialised(model, source.where)
    return model.eval().requires_grad_(False)


def _vae_config_from_shapes(shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """Wan2.1's VAE architecture with the two sizes its shapes give: ``base_dim`` and ``z_dim`` (16 in Wan2.1)."""
    for key in ("encoder.conv1.weight", "conv2.weight"):
        if key not in shapes:
            raise ModelLoadError(f"{path}: no {key!r}; not a Wan2.1 VAE state dict")
    z_dim = shapes["conv2.weight"][0]
    if z_dim != 16:
        raise ModelLoadError(f"{path}: z_dim {z_dim}; the Wan2.1 VAE (and its latent mean/std) has 16 channels")
    return {"base_dim": shapes["encoder.conv1.weight"][0], "z_dim": z_dim}


# --------------------------------------------------------------------------------------------------------------------
# The text encoder (umT5) and its tokenizer.


def _t5_config_from_shapes(shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """UMT5Config kwargs from Wan's T5 shapes (vocab, width, heads, buckets, FFN width, layers)."""
    try:
        vocab, d_model = shapes["token_embedding.weight"]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        d_ff = shapes["blocks.0.ffn.fc1.weight"][0]
        inner = shapes["blocks.0.attn.q.weight"][0]
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not Wan's umT5 encoder state dict (no {exc})") from exc
    layers = len({k.split(".")[1] for k in shapes if re.match(r"^blocks\.\d+\.", k)})
    return {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": inner // heads,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_heads": heads,
        "relative_attention_num_buckets": buckets,
        "relative_attention_max_distance": WAN_T5_REL_MAX_DISTANCE,
        "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6,
        "tie_word_embeddings": False,
    }


def build_text_encoder(config: Any) -> UMT5EncoderModel:
    """``UMT5EncoderModel`` on meta with its encoder embedding tied to ``shared`` (one tensor, as in Wan's T5)."""
    from transformers import UMT5EncoderModel

    model = build_empty(lambda: UMT5EncoderModel(config))
    model.encoder.set_input_embeddings(model.shared)
    return model


def load_text_encoder(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, wan_yaml: WanModelYaml | None = None, device: Device = "cpu"
) -> UMT5EncoderModel:
    """transformers' ``UMT5EncoderModel`` from Wan's ``.pth`` (renamed one to one) or from ``text_encoder/``."""
    from transformers import UMT5Config

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        path = model_dir / _yaml(wan_yaml).text_encoder_kwargs.text_encoder_subpath
        source = torch_source(path, "umT5 weights (text_encoder_kwargs.text_encoder_subpath)")
        config = UMT5Config(**_t5_config_from_shapes(source.shapes, path))
        adapter = T5Adapter("original")
    else:
        folder = model_dir / "text_encoder"
        config = UMT5Config.from_dict(_read_json(folder / "config.json", "diffusers text encoder config"))
        source = safetensors_source(folder, "model", "diffusers text encoder weights")
        adapter = T5Adapter("diffusers")
    model = build_text_encoder(config)
    _load(model, source, adapter, dtype=dtype, device=device)
    _assert_materialised(model, source.where)
    return model.eval().requires_grad_(False)


def load_tokenizer(model_dir: Path, *, wan_yaml: WanModelYaml | None = None) -> PreTrainedTokenizerBase:
    """The umT5 tokenizer: ``google/umt5-xxl/`` (``tokenizer_subpath``) or ``tokenizer/``, read offline."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        folder = model_dir / _yaml(wan_yaml).text_encoder_kwargs.tokenizer_subpath
    else:
        folder = model_dir / "tokenizer"
    _need(folder, "umT5 tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(f"{folder}: cannot load the tokenizer: {exc}") from exc


# --------------------------------------------------------------------------------------------------------------------
# The image encoder (CLIP ViT-H/14).


def _clip_config_from_shapes(shapes: Mapping[str, Shape], path: Path) -> dict[str, Any]:
    """CLIPVisionConfig kwargs from open-clip's visual-tower shapes (heads: `WAN_CLIP_HEADS`)."""
    try:
        width, _, patch, _ = shapes["visual.patch_embedding.weight"]
        positions = shapes["visual.pos_embedding"][1]
        intermediate = shapes["visual.transformer.0.mlp.0.weight"][0]
    except (KeyError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not an open-clip ViT state dict (no {exc})") from exc
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1:
        raise ModelLoadError(f"{path}: visual.pos_embedding has {positions} positions, not 1 + a square grid")
    layers = len({k.split(".")[2] for k in shapes if re.match(r"^visual\.transformer\.\d+\.", k)})
    config = {
        "hidden_size": width,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": WAN_CLIP_HEADS,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    }
    if "visual.head" in shapes:
        config["projection_dim"] = shapes["visual.head"][1]
    return config


def clip_model_prefix(model: nn.Module) -> str:
    """Where the vision tower's names start: ``vision_model.`` (transformers 4) or nothing (transformers 5)."""
    return "vision_model." if hasattr(model, "vision_model") else ""


def load_image_encoder(
    model_dir: Path, *, dtype: torch.dtype = torch.float32, wan_yaml: WanModelYaml | None = None, device: Device = "cpu"
) -> CLIPVisionModel:
    """transformers' ``CLIPVisionModel`` from the open-clip ``.pth`` (fused q/k/v split, text tower dropped) or from
    ``image_encoder/``."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    model_dir = Path(model_dir)
    if detect_layout(model_dir, wan_yaml) == "original":
        path = model_dir / _yaml(wan_yaml).image_encoder_kwargs.image_encoder_subpath
        source = torch_source(path, "CLIP weights (image_encoder_kwargs.image_encoder_subpath)")
        config = CLIPVisionConfig(**_clip_config_from_shapes(source.shapes, path))
        naming: Layout = "original"
    else:
        folder = model_dir / "image_encoder"
        config = CLIPVisionConfig.from_dict(_read_json(folder / "config.json", "diffusers image encoder config"))
        source = safetensors_source(folder, "model", "diffusers image encoder weights")
        naming = "diffusers"
    model = build_empty(lambda: CLIPVisionModel(config))
    _load(model, source, ClipVisionAdapter(naming, clip_model_prefix(model)), dtype=dtype, device=device)
    _assert_materialised(model, source.where)
    return model.eval().requires_grad_(False)


def load_wav2vec2(folder: Path, *, dtype: torch.dtype = torch.float32, device: Device = "cpu") -> nn.Module:
    """transformers' ``Wav2Vec2Model`` from a ``wav2vec2-base-960h`` folder (the released ``Wav2Vec2ForCTC`` names:
    ``wav2vec2.`` prefix, legacy weight-norm names, the CTC ``lm_head`` dropped with its reason), strictly."""
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    folder = Path(folder)
    config = Wav2Vec2Config.from_dict(_read_json(folder / "config.json", "wav2vec2 config"))
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        source = safetensors_source(folder, "model", "wav2vec2 weights")
    else:
        source = torch_source(folder / "pytorch_model.bin", "wav2vec2 weights (model.safetensors or pytorch_model.bin)")
    model = build_empty(lambda: Wav2Vec2Model(config))
    _load(model, source, Wav2Vec2Adapter(), dtype=dtype, device=device)
    _assert_materialised(model, source.where)
    return model.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# The adapter (or a whole transformer) from --transformer_path, and back.

FORM_DESCRIPTIONS: dict[str, str] = {
    "fantasytalking": "the released fantasytalking_model.ckpt ({'proj_model': ..., 'audio_processor': ...})",
    "flat": "flat adapter safetensors (proj_model.* / audio_processor.*)",
    "comfyui": "ComfyUI adapter re-pack (proj_model.*, blocks.N.cross_attn.k_proj/v_proj)",
    "diffusers": "transformer weights with diffusers names",
    "original": "transformer weights with original Wan names",
}


@dataclass(frozen=True)
class AdapterLoadReport:
    """What `load_adapter_or_transformer` found and loaded."""

    path: Path
    form: AdapterFormat
    content: Literal["adapter", "transformer", "transformer+adapter"]
    tensors: int

    def summary(self) -> str:
        """One line for the console."""
        return f"{self.path.name}: {FORM_DESCRIPTIONS[self.form]}; loaded {self.content} ({self.tensors} tensors)"


_COMFYUI_KEY = re.compile(r"^blocks\.\d+\.cross_attn\.(k_proj|v_proj)\.weight$")


def _classify(keys: list[str], nested: bool, path: Path) -> AdapterFormat:
    if nested:
        return "fantasytalking"
    if any(k.startswith("audio_processor.") for k in keys):
        return "flat"
    if any(_COMFYUI_KEY.match(k) for k in keys):
        return "comfyui"
    diffusers_marks = ("condition_embedder.", ".attn1.", ".attn2.", "proj_out.", "scale_shift_table")
    original_marks = (".self_attn.", ".cross_attn.", "time_embedding.", "head.head.", "modulation")
    if any(m in k for k in keys for m in diffusers_marks):
        return "diffusers"
    if any(m in k for k in keys for m in original_marks):
        return "original"
    if keys and all(k.startswith("proj_model.") for k in keys):
        return "flat"
    raise ModelLoadError(f"{path}: not an adapter or transformer file I know (first keys: {sorted(keys)[:8]})")


def read_adapter_file(path: Path) -> tuple[AdapterFormat, TensorSource]:
    """Open ``path`` (``.safetensors``, or a torch ``.ckpt``/``.pt``/``.pth``/``.bin``) and say which form it is.

    The released nested ckpt is flattened to ``proj_model.<name>`` / ``audio_processor.<name>``.
    """
    path = Path(path)
    _need(path, "--transformer_path")
    for suffix in (".safetensors", ".safetensors.index.json"):
        if path.name.endswith(suffix):
            stem = path.name.removesuffix(suffix)
            source = safetensors_source(path.parent, stem, "--transformer_path", single_only=suffix == ".safetensors")
            return _classify(list(source.shapes), False, path), source
    data = _torch_load(path)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a dict of tensors, got {type(data).__name__}")
    nested = set(data) == {"proj_model", "audio_processor"} and all(isinstance(v, dict) for v in data.values())
    if nested:
        data = {f"{part}.{name}": tensor for part, sub in data.items() for name, tensor in sub.items()}
    bad = sorted(k for k, v in data.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ModelLoadError(f"{path}: entries that are not tensors: {bad[:10]}")
    source = TensorSource(path, {path: sorted(data)}, {k: tuple(v.shape) for k, v in data.items()}, data)
    return _classify(list(data), nested, path), source


def load_adapter_or_transformer(path: Path, model: nn.Module, sharded: ShardedBuild | None = None) -> AdapterLoadReport:
    """Load ``--transformer_path`` into an already loaded ``model``, whatever its form, strictly.

    Adapter forms (released nested ckpt, flat safetensors, ComfyUI) must fill every adapter parameter; a
    transformer file (diffusers or original names) must fill the whole base, and the adapter fully or not at all.
    Tensors are copied into the model's existing parameters, keeping their dtype and device.
    """
    path = Path(path)
    form, source = read_adapter_file(path)
    if form in ("diffusers", "original"):
        adapter: StateDictAdapter = DitAdapter(form, adapter_absent="any")
    else:
        adapter = AdapterFileAdapter(form)
    plan = plan_for(model, source, adapter)
    names = [n for n, _ in model.named_parameters()]
    filled = plan.filled()
    parts = {
        "adapter": [n for n in names if is_adapter_name(n)],
        "transformer": [n for n in names if not is_adapter_name(n)],
    }
    present = {part: sum(n in filled for n in group) for part, group in parts.items()}
    for part, group in parts.items():
        if 0 < present[part] < len(group):
            lost = [n for n in group if n not in filled]
            raise ModelLoadError(f"{path}: holds part of the {part}; missing {len(lost)} keys, e.g. {lost[:10]}")
    if not any(present.values()):
        raise ModelLoadError(f"{path}: holds no tensor of the model")
    content = "+".join(part for part in ("transformer", "adapter") if present[part])
    if form not in ("diffusers", "original") and present["transformer"]:
        raise ModelLoadError(f"{path}: an adapter file cannot hold base weights")
    if sharded is None:
        read = stream_into(model, source, plan, dtype=torch.float32, device="cpu")
    else:
        read = _write_sharded(model, source, plan, sharded)
    return AdapterLoadReport(path, form, content, read)  # type: ignore[arg-type]


def adapter_to_format(state: Mapping[str, torch.Tensor], fmt: AdapterFormat) -> dict[str, Any]:
    """Our-named tensors (the adapter, or a whole transformer) -> the dict a file of ``fmt`` holds.

    ``fantasytalking`` gives the released nested dict (for ``torch.save``); ``flat`` and ``comfyui`` adapter-only flat
    dicts; ``diffusers`` our names unchanged; ``original`` Wan's names. Each round-trips through
    `load_adapter_or_transformer`.
    """
    if fmt == "diffusers":
        return dict(state)
    if fmt == "original":
        return {dit_name_to_original(name): tensor for name, tensor in state.items()}
    if fmt not in ("fantasytalking", "flat", "comfyui"):
        raise ValueError(f"unknown adapter format {fmt!r}")
    flat = {adapter_name_to_form(name, fmt): tensor for name, tensor in state.items()}
    if fmt != "fantasytalking":
        return flat
    nested: dict[str, dict[str, torch.Tensor]] = {"proj_model": {}, "audio_processor": {}}
    for name, tensor in flat.items():
        part, _, rest = name.partition(".")
        nested[part][rest] = tensor
    return nested
