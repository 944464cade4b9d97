"""Command-line flags generated from the config schema, so a field and its flag never drift apart.

Each leaf field `name` of the chosen sections becomes `--name` and `--name-with-dashes` (booleans also
get `--no-...`), its docstring the help text, its section the help panel. Flags left out stay `None`
and do not override the YAML file.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel

from fantasytalk_cli.config.schema import SECTIONS

F = TypeVar("F", bound=Callable[..., Any])


def _strip_optional(annotation: Any) -> Any:
    """`X | None` -> X."""
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _option_type(annotation: Any) -> tuple[Any, str]:
    """The type Typer parses a field as, and a short note on allowed values for the help text."""
    inner = _strip_optional(annotation)
    if get_origin(inner) is Literal:
        values = get_args(inner)
        choices = [str(c) for c in values]
        kind = int if all(isinstance(v, int) and not isinstance(v, bool) for v in values) else str
        return kind, f" [{'|'.join(choices)}]"
    if get_origin(inner) is list:
        return list[str], " (one or more values)"
    if inner in (bool, int, float, str, Path):
        return inner, ""
    return str, ""


def list_flags(sections: Sequence[str] | None = None) -> set[str]:
    """Flag spellings (both) of list fields, which take several values after one flag."""
    names: set[str] = set()
    for section in sections or SECTIONS:
        for name, field in SECTIONS[section].model_fields.items():
            if get_origin(_strip_optional(field.annotation)) is list:
                names.update({f"--{name}", f"--{name.replace('_', '-')}"})
    return names


def expand_multi_value_flags(argv: list[str], multi: set[str] | None = None) -> list[str]:
    """Rewrite `--trainable_modules a b` (argparse nargs='+', as in the seed) into repeated flags."""
    multi = list_flags() if multi is None else multi
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in multi:
            i += 1
            values = []
            # values end at the next option, long or short (`-c run.yaml` is not a module name)
            while i < len(argv) and not (argv[i].startswith("-") and len(argv[i]) > 1):
                values.append(argv[i])
                i += 1
            out.extend(x for v in values for x in (token, v))
            if not values:
                out.append(token)  # let the parser report the missing value
            continue
        out.append(token)
        i += 1
    return out


def _parameters(sections: Sequence[str]) -> list[inspect.Parameter]:
    params = []
    for section in sections:
        for name, field in SECTIONS[section].model_fields.items():
            typ, note = _option_type(field.annotation)
            dashed = name.replace("_", "-")
            if typ is bool:
                decls = [f"--{name}/--no-{name}"]
                if dashed != name:
                    decls.append(f"--{dashed}/--no-{dashed}")
            else:
                decls = [f"--{name}"] + ([f"--{dashed}"] if dashed != name else [])
            default = field.get_default(call_default_factory=True)
            shown = "" if default is None else f" (default: {default})"
            option = typer.Option(
                *decls,
                help=(field.description or "") + note + shown,
                rich_help_panel=f"{section} settings",
                show_default=False,
            )
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[Optional[typ], option],  # noqa: UP045 (Typer needs Optional)
                )
            )
    return params


def with_config_flags(*sections: str) -> Callable[[F], F]:
    """Give a command one flag per config field of `sections`; it receives the given ones as `flags`."""

    def decorate(func: F) -> F:
        generated = _parameters(sections)
        names = {p.name for p in generated}
        hints = typing.get_type_hints(func, include_extras=True)  # resolve string annotations
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "flags"
        ]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            flags = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return func(*args, flags={k: v for k, v in flags.items() if v is not None}, **kwargs)

        params = own + generated
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the generated signature, not the original one
        return wrapper  # type: ignore[return-value]

    return decorate


def config_to_argv(cfg: BaseModel) -> list[str]:
    """Command-line flags that reproduce `cfg` (the inverse of the flags above; `None` values left out),
    e.g. to hand a resolved config to `accelerate launch -m fantasytalk_cli train`."""
    argv: list[str] = []
    for section in cfg.model_dump(mode="json").values():
        for key, value in section.items():
            if value is None:
                continue
            if isinstance(value, bool):
                argv.append(f"--{key}" if value else f"--no-{key}")
            elif isinstance(value, list):
                argv += [f"--{key}", *map(str, value)]
            else:
                argv.append(f"--{key}={value}")
    return argv
