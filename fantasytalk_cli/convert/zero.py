"""`ftalk convert-zero`: a training checkpoint (ZeRO-1/2/3 partitions, FSDP shards, or our plain weights) into the
files inference tools load: the adapter in the released FantasyTalking form (flat safetensors + the nested
``fantasytalking_model.ckpt``), ComfyUI's re-pack, diffusers or original Wan names; or a whole transformer, the
trained weights merged into the frozen base streamed from the model folder.

Memory: the adapter is streamed tensor by tensor from the source into size-capped shards; a transformer holds the fp32
trained set plus one output shard (the base is read one tensor at a time). The frozen base is never read for an
adapter. The output folder appears complete or not at all (see `sharding.atomic_output`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast, get_args

import torch
from torch import nn

from fantasytalk_cli.checkpoints.folder import (
    ADAPTER_CKPT_NAME,
    STEMS,
    WEIGHTS_NAME,
    ConversionError,
    ConversionUsageError,
    recorded_model_config,
)
from fantasytalk_cli.checkpoints.sources import CheckpointSource, open_checkpoint
from fantasytalk_cli.convert.choices import OutDtype, OutFormat, What
from fantasytalk_cli.convert.lora_export import CheckpointLora, checkpoint_lora
from fantasytalk_cli.convert.sharding import Entry, atomic_output, check_output, parse_size, plan_shards
from fantasytalk_cli.convert.sharding import write_shards as _write_shards
from fantasytalk_cli.fileio import format_size
from fantasytalk_cli.locks import beside, hold
from fantasytalk_cli.models.adapter_file import adapter_to_format, plan_adapter_file, read_adapter_file
from fantasytalk_cli.models.dit_config import dit_files
from fantasytalk_cli.models.key_mapping import Shape
from fantasytalk_cli.models.layout import ModelLoadError
from fantasytalk_cli.models.state_dict_adapters import DitAdapter
from fantasytalk_cli.models.trainable import is_adapter_name, is_lora_name
from fantasytalk_cli.models.transformer import FantasyTalkingTransformer
from fantasytalk_cli.models.weights import build_empty, init_kwargs, model_shapes, plan_for
from fantasytalk_cli.runtime.dtypes import DTYPES

__all__ = [
    "ConversionError",
    "ConversionUsageError",
    "ConvertOptions",
    "ConvertReport",
    "convert_checkpoint",
    "parse_size",
]

NAME_FORMS: dict[str, Any] = {
    "fantasytalking": "flat",
    "comfyui": "comfyui",
    "diffusers": "diffusers",
    "original": "original",
    "kohya": "flat",
}
"""`adapter_to_format` form giving each output's tensor names (the released ckpt's names, flattened, for ours)."""


@dataclass(frozen=True)
class ConvertOptions:
    """What to write; the CLI flags one to one."""

    what: What = "adapter"
    """``adapter``: the trained weights only; ``transformer``: merged into the base model's frozen weights."""
    format: OutFormat = "fantasytalking"
    dtype: OutDtype = "bf16"
    max_shard_size: str | int = "10GB"
    tag: str | None = None
    """DeepSpeed tag folder (default: the checkpoint's ``latest``)."""
    pretrained_model_name_or_path: Path | None = None
    """Base model folder for ``transformer`` (default: the one in the checkpoint's meta.json)."""
    exclude_frozen_parameters: bool = False
    overwrite: bool = False


@dataclass
class ConvertReport:
    """What `convert_checkpoint` read and wrote."""

    checkpoint: Path
    kind: str
    description: str
    output: Path
    what: str
    format: str
    dtype: str
    files: list[str]
    tensors: int
    total_bytes: int
    shards: int
    max_shard_bytes: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for the console."""
        lines = [
            f"checkpoint: {self.checkpoint}",
            f"kind: {self.kind}: {self.description}",
            f"wrote the {self.what} ({self.format} format, {self.dtype}): {self.tensors} tensors, "
            f"{format_size(self.total_bytes)} in {self.shards} shard(s) of at most {format_size(self.max_shard_bytes)}",
            f"to {self.output}: {', '.join(self._file_names())}",
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    def _file_names(self) -> list[str]:
        if self.shards <= 3:
            return self.files
        return [f"{self.files[0]} .. {self.files[self.shards - 1]}", *self.files[self.shards :]]


def _check_options(options: ConvertOptions) -> None:
    if options.dtype not in get_args(OutDtype):
        raise ConversionUsageError(f"--dtype {options.dtype!r}: choose fp32, fp16 or bf16")
    if options.format not in STEMS:
        raise ConversionUsageError(f"--format {options.format!r}: choose {', '.join(STEMS)}")
    if options.what not in ("adapter", "transformer"):
        raise ConversionUsageError(f"--what {options.what!r}: choose adapter or transformer")
    if options.what == "transformer" and options.format in ("fantasytalking", "comfyui", "kohya"):
        raise ConversionUsageError(
            f"--format {options.format} holds only the audio adapter (and a LoRA); a transformer is written with "
            "--format diffusers or original"
        )
    if options.what == "transformer" and options.exclude_frozen_parameters:
        raise ConversionUsageError(
            "--exclude_frozen_parameters leaves the frozen weights out, --what transformer needs them: choose one"
        )


def _stored_names(names: list[str], fmt: str) -> dict[str, str]:
    """Our name -> the name in a file of ``fmt`` (through `adapter_to_format`, on names only)."""
    try:
        renamed = adapter_to_format(cast(dict[str, torch.Tensor], {n: n for n in names}), NAME_FORMS[fmt])
    except ValueError as exc:
        raise ConversionUsageError(
            f"--format {fmt}: {exc}; the checkpoint trained more than the adapter: use --format diffusers or original"
        ) from exc
    return {cast(str, ours): stored for stored, ours in renamed.items()}


def _cross_check(source: CheckpointSource) -> list[str]:
    """Our checkpoints also hold the gathered ``trainable.safetensors``: its names and shapes must agree."""
    path = source.folder / WEIGHTS_NAME
    if source.kind == "plain" or not path.is_file():
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            saved = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    except Exception as exc:
        return [f"{path} is unreadable ({exc}); converted from the {source.kind} shards"]
    if saved != source.trainable:
        differ = sorted(set(saved.items()) ^ set(source.trainable.items()))[:5]
        return [f"{path} does not name the same tensors as the {source.kind} shards (e.g. {differ})"]
    return []


def _base_folder(source: CheckpointSource, options: ConvertOptions) -> Path:
    if options.pretrained_model_name_or_path is not None:
        return Path(options.pretrained_model_name_or_path)
    recorded = recorded_model_config(source.folder).get("pretrained_model_name_or_path")
    if recorded:
        return Path(recorded)
    raise ConversionUsageError(
        "--what transformer merges the trained weights into the base model: pass --pretrained_model_name_or_path "
        "(the Wan2.1 model folder, original or diffusers layout)"
    )


# --------------------------------------------------------------------------------------------------------------------
# A whole transformer: the base folder streamed, the trained weights put in place.


@dataclass
class _TransformerPlan:
    order: list[tuple[str, Shape]]
    tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    config_files: dict[str, str]
    base_count: int


def _transformer_plan(base: Path, source: CheckpointSource, fmt: str, lora: CheckpointLora | None) -> _TransformerPlan:
    import diffusers

    try:
        layout, folder, config, base_source = dit_files(base, None)
        kwargs = init_kwargs(FantasyTalkingTransformer, config, folder / "config.json")
    except ModelLoadError as exc:
        raise ConversionUsageError(f"--pretrained_model_name_or_path: {exc}") from exc
    proj = source.trainable.get("proj_model.proj.weight") or _frozen_projector_shape(source)
    if proj is not None:  # the adapter's sizes are in its weights, not in a base folder
        for key, size in (("audio_in_dim", proj[1]), ("audio_proj_dim", proj[0])):
            if kwargs.setdefault(key, size) != size:
                raise ConversionError(f"{folder / 'config.json'}: {key} {kwargs[key]}, the trained adapter has {size}")
    model = build_empty(lambda: FantasyTalkingTransformer(**kwargs))
    shapes, aliases = model_shapes(model)
    try:
        plan = plan_for(model, base_source, DitAdapter(layout, adapter_absent="base"))
    except ModelLoadError as exc:
        raise ConversionError(str(exc)) from exc
    trained = {n: shape for n, shape in source.trainable.items() if not is_lora_name(n)}
    merge = lora.merger() if lora is not None else lambda _, tensor: tensor
    unknown = [n for n in trained if n not in shapes]
    if lora is not None:
        unknown += sorted(lora.weight_names() - set(shapes))
    wrong = [f"{n} {list(s)} (model {list(shapes[n])})" for n, s in trained.items() if n in shapes and shapes[n] != s]
    if unknown or wrong:
        raise ConversionError(
            f"the checkpoint's trained weights do not fit the base model {base}: not in the model {unknown[:10]}, "
            f"wrong shape {wrong[:10]}"
        )
    order: list[tuple[str, Shape]] = []
    for keys in base_source.files.values():
        order += [(target, shapes[target]) for key in keys for target, _ in plan.moves.get(key, [])]
    from_base, base_entries = {name for name, _ in order}, len(order)
    order += [(name, shape) for name, shape in trained.items() if name not in from_base]
    lacking = sorted(set(shapes) - set(aliases) - {name for name, _ in order})
    frozen_adapter = _frozen_adapter(source, model, lacking)
    order += [(name, shapes[name]) for name in lacking if name in frozen_adapter]
    lacking = [name for name in lacking if name not in frozen_adapter]
    if lacking:
        raise ConversionError(
            f"neither the base model {base} nor the checkpoint provides {len(lacking)} tensors, e.g. {lacking[:10]} "
            "(was only part of the adapter trained, or none with no --transformer_path to start from?)"
        )

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        weights = {**frozen_adapter, **dict(source.read(list(trained)))}
        for path, keys in base_source.files.items():
            with base_source.reader(path) as get:
                for key in keys:
                    for target, transform in plan.moves.get(key, []):
                        yield target, weights[target] if target in weights else merge(target, transform.apply(get(key)))
        for name, _ in order[base_entries:]:  # trained tensors the base lacks, then a frozen adapter's
            yield name, weights[name]

    if fmt == "diffusers":
        cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
        config_text = json.dumps(
            {"_class_name": "FantasyTalkingTransformer", "_diffusers_version": diffusers.__version__, **cfg}, indent=2
        )
    elif layout == "original":
        config_text = (folder / "config.json").read_text()
    else:
        config_text = json.dumps(_wan_config(dict(model.config)), indent=2)
    return _TransformerPlan(order, tensors, {"config.json": config_text + "\n"}, len(from_base))


def _frozen_adapter_path(source: CheckpointSource) -> Path | None:
    """The `--transformer_path` a run that trained no adapter (only a LoRA) kept frozen, when it is a file."""
    path = recorded_model_config(source.folder).get("transformer_path")
    if any(is_adapter_name(n) for n in source.trainable) or not path or not Path(path).is_file():
        return None
    return Path(path)


def _frozen_projector_shape(source: CheckpointSource) -> Shape | None:
    """The projector's shape in a run's frozen adapter (the sizes of the model to build), as `adapter_dims` reads."""
    path = _frozen_adapter_path(source)
    return read_adapter_file(path)[1].shapes.get("proj_model.proj.weight") if path is not None else None


def _frozen_adapter(source: CheckpointSource, model: nn.Module, lacking: list[str]) -> dict[str, torch.Tensor]:
    """The audio adapter a run kept frozen (it trained only a LoRA): read from the `--transformer_path` it
    recorded, when the merge lacks exactly the adapter's tensors; else {}."""
    path = _frozen_adapter_path(source)
    if not lacking or not all(is_adapter_name(n) for n in lacking) or path is None:
        return {}
    try:
        checked = plan_adapter_file(path, model)
    except ModelLoadError as exc:
        raise ConversionError(f"the run's frozen adapter (--transformer_path): {exc}") from exc
    wanted, found = set(lacking), {}
    for file, keys in checked.source.files.items():
        with checked.source.reader(file) as get:
            for key in keys:
                for target, transform in checked.plan.moves.get(key, []):
                    if target in wanted:
                        found[target] = transform.apply(get(key)).float()
    return found if set(found) == wanted else {}


def _wan_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Our (diffusers) constructor kwargs -> Wan's original ``config.json`` keys (what `load_transformer` reads)."""
    return {
        "_class_name": "WanModel",
        "model_type": "i2v",
        "patch_size": list(cfg["patch_size"]),
        "dim": cfg["num_attention_heads"] * cfg["attention_head_dim"],
        "num_heads": cfg["num_attention_heads"],
        "in_dim": cfg["in_channels"],
        "out_dim": cfg["out_channels"],
        "ffn_dim": cfg["ffn_dim"],
        "freq_dim": cfg["freq_dim"],
        "text_dim": cfg["text_dim"],
        "num_layers": cfg["num_layers"],
        "qk_norm": bool(cfg["qk_norm"]),
        "cross_attn_norm": bool(cfg["cross_attn_norm"]),
        "eps": cfg["eps"],
        "text_len": 512,
    }


# --------------------------------------------------------------------------------------------------------------------
# The entry point.


def convert_checkpoint(
    checkpoint: Path,
    output: Path,
    options: ConvertOptions,
    progress: Callable[[int, int], None] | None = None,
) -> ConvertReport:
    """Convert ``checkpoint`` (a ``checkpoint-N`` folder or a run folder) into ``output``.

    Raises `ConversionUsageError` for a bad request (no such folder, existing output, contradictory options) and
    `ConversionError` for a checkpoint that cannot be read (a partition missing or truncated), naming the file.
    """
    _check_options(options)
    output = Path(output).absolute()
    output.parent.mkdir(parents=True, exist_ok=True)
    # One writer per output: a second conversion would clean this one's temporary folder away as stale.
    with hold(
        beside(output), f"the output {output}", "wait for the other convert-zero to it to end, or pick another output"
    ):
        return _convert(checkpoint, output, options, progress)


def _convert(
    checkpoint: Path, output: Path, options: ConvertOptions, progress: Callable[[int, int], None] | None
) -> ConvertReport:
    """`convert_checkpoint` once the output's lock is held."""
    max_bytes = parse_size(options.max_shard_size)
    check_output(output, options.overwrite)
    dtype = DTYPES[options.dtype]
    source = open_checkpoint(Path(checkpoint), options.tag)
    try:
        notes = list(source.notes)
        warnings = _cross_check(source)
        if not source.trainable:
            raise ConversionError(f"{source.folder}: the {source.kind} checkpoint holds no trained parameters")
        config_files: dict[str, str] = {}
        lora = checkpoint_lora(source)
        if lora is not None:
            notes += lora.notes
        if options.what == "adapter":
            names = [n for n in source.trainable if not is_lora_name(n)]
            order = [(n, source.trainable[n]) for n in names]
            tensors = source.read(names)
            if source.frozen_count:
                notes.append(
                    f"the checkpoint also stores {source.frozen_count} frozen tensors: left out "
                    "(--what transformer merges the trained weights into the base model)"
                )
            if options.exclude_frozen_parameters:
                notes.append("--exclude_frozen_parameters: an adapter output never holds frozen parameters")
        else:
            base = _base_folder(source, options)
            merged = _transformer_plan(base, source, options.format, lora)
            order, tensors, config_files = merged.order, merged.tensors(), merged.config_files
            notes.append(f"frozen weights from {base} ({merged.base_count} tensors, trained ones replaced)")
            if lora is not None:
                notes.append(f"the LoRA is merged into {len(lora.pairs)} base weights (W + alpha/rank * B @ A)")
        stored = _stored_names([n for n, _ in order], options.format)
        entries = [Entry(name, stored[name], shape, dtype) for name, shape in order]
        plan = plan_shards(entries, STEMS[options.format], max_bytes)
        warnings += [
            f"{e.stored} ({format_size(e.nbytes)}) is larger than --max_shard_size {format_size(max_bytes)}: "
            "written alone in its shard"
            for e in plan.oversized
        ]
        keep: dict[str, torch.Tensor] | None = (
            {} if options.what == "adapter" and options.format in ("fantasytalking", "kohya") else None
        )
        with atomic_output(Path(output), options.overwrite) as tmp:
            files = []
            if entries:  # a LoRA trained alone has no adapter to write
                try:
                    files = _write_shards(tmp, plan, tensors, keep=keep, progress=progress)
                except ModelLoadError as exc:  # a base model shard that cannot be read
                    raise ConversionError(str(exc)) from exc
            if keep:
                torch.save(adapter_to_format(keep, "fantasytalking"), tmp / ADAPTER_CKPT_NAME)
                files.append(ADAPTER_CKPT_NAME)
            if lora is not None and options.what == "adapter":
                files.append(lora.write(tmp, options.format, dtype))
            for name, text in config_files.items():
                (tmp / name).write_text(text)
                files.append(name)
        return ConvertReport(
            checkpoint=source.folder,
            kind=source.kind,
            description=source.description,
            output=Path(output),
            what=options.what,
            format=options.format,
            dtype=options.dtype,
            files=files,
            tensors=len(entries),
            total_bytes=plan.total_bytes,
            shards=len(plan.shards) if entries else 0,
            max_shard_bytes=max_bytes,
            notes=notes,
            warnings=warnings,
        )
    finally:
        source.close()
