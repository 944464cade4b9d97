"""Build an `FtalkConfig` from its sources: defaults < YAML file < command-line flags.

Errors name the dotted key (``buckets.video_sample_size``), the source file and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from fantasytalk_cli.config.schema import SECTIONS, FtalkConfig
from fantasytalk_cli.errors import FtalkUsageError


class ConfigError(FtalkUsageError, ValueError):
    """A configuration source is unreadable or holds a bad key or value."""


def leaf_fields() -> dict[str, str]:
    """Map every leaf field name (also its flag name) to the section holding it."""
    owners: dict[str, str] = {}
    for section, model in SECTIONS.items():
        for name in model.model_fields:
            if name in owners:  # a schema bug, caught by the tests
                raise RuntimeError(f"config field {name!r} is defined in both {owners[name]} and {section}")
            owners[name] = section
    return owners


def _describe_allowed(model: type[BaseModel], path: tuple[str | int, ...]) -> str:
    """Names allowed at `path` (used when a key is unknown)."""
    current: Any = model
    for part in path[:-1]:
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        current = field.annotation
    return ", ".join(sorted(current.model_fields))


def format_validation_error(err: ValidationError, source: str) -> str:
    """Turn pydantic's error into lines naming the dotted key, the problem and the fix."""
    lines = [f"invalid configuration in {source}:"]
    for item in err.errors():
        loc = tuple(item["loc"])
        dotted = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            allowed = _describe_allowed(FtalkConfig, loc)
            lines.append(f"  {dotted}: unknown key; allowed here: {allowed}")
        else:
            given = item.get("input")
            shown = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  {dotted}: {item['msg']}{shown}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a config YAML file; an empty file is an empty mapping."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections ({', '.join(SECTIONS)}), not {type(data).__name__}"
        )
    return data


def _merge(base: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Place flat `{field: value}` overrides into their sections of a nested mapping."""
    owners = leaf_fields()
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for name, value in overrides.items():
        if name not in owners:
            raise ConfigError(f"unknown option {name!r}")
        section = merged.setdefault(owners[name], {})
        if not isinstance(section, dict):
            raise ConfigError(f"section {owners[name]!r} must be a mapping")
        section[name] = value
    return merged


def load_config(
    path: Path | None = None, overrides: Mapping[str, Any] | None = None, *, base: Mapping[str, Any] | None = None
) -> FtalkConfig:
    """Resolve the configuration: defaults, then ``base`` (sections, e.g. the config a checkpoint recorded), then
    the YAML file at `path`, then `overrides` (flags)."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "defaults"
    if base is not None:
        data = {name: {**dict(base.get(name) or {}), **dict(data.get(name) or {})} for name in {*base, *data}}
        source = f"the recorded config + {source}" if path is not None else "the recorded config"
    if overrides:
        data = _merge(data, overrides)
        source = f"{source} + command-line flags" if path is not None else "command-line flags"
    try:
        return FtalkConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from exc


def config_to_yaml(cfg: FtalkConfig) -> str:
    """The YAML text of a resolved config (loading it back gives an equal config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_hash(section: BaseModel) -> str:
    """A short stable hash of a config (or one section), for checkpoints and plan files."""
    text = json.dumps(section.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two dumped configs, as `key: old -> new` lines."""
    lines: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        dotted = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            lines.extend(config_diff(a, b, dotted + "."))
        elif a != b:
            lines.append(f"{dotted}: {a!r} -> {b!r}")
    return lines
