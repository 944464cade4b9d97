"""Command-line flags generated from the config schema, so a field and its flag never drift apart.

Each leaf field `name` becomes `--name` (booleans also get a hidden `--no-name`), its docstring the help
text, its section the help panel. The app normalises dashes to underscores in option names
(`normalize_flag`), so `--name-with-dashes` works too. Every command accepts every field (one argument
list serves validate, plan and train); its `--help` lists the sections it reads. Flags left out stay
`None` and do not override the YAML file.
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
from fantasytalk_cli.errors import FtalkUsageError

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


NEGATED = "no_"
"""Prefix of the hidden parameter that carries a boolean flag's `--no-name` form."""


def normalize_flag(token: str) -> str:
    """Click's `token_normalize_func` for the app: `--video-sample-size` and `--video_sample_size` are one
    flag (option names only; values are never touched), so the dashed alias needs no line in `--help`."""
    return token.replace("-", "_")


def _shown(section: str, name: str, shown: Sequence[str]) -> bool:
    return section in shown or f"{section}.{name}" in shown


def _parameters(shown: Sequence[str]) -> list[inspect.Parameter]:
    """One keyword parameter per config field of every section (so one argument list serves every command);
    those not in `shown` (section names or `section.field`) are accepted but hidden from `--help`."""
    params = []
    for section, model in SECTIONS.items():
        for name, field in model.model_fields.items():
            typ, note = _option_type(field.annotation)
            hidden = not _shown(section, name, shown)
            default = field.get_default(call_default_factory=True)
            option = typer.Option(
                f"--{name}",
                help=(field.description or "") + note + ("" if default is None else f" (default: {default})"),
                rich_help_panel=f"{section} settings",
                show_default=False,
                hidden=hidden,
            )
            params.append(
                inspect.Parameter(
                    name,
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    annotation=Annotated[Optional[typ], option],  # noqa: UP045 (Typer needs Optional)
                )
            )
            if typ is bool:  # `--no-name` overrides a YAML `true`; hidden: the help names it once, above
                negated = typer.Option(f"--no-{name}", help=f"Set {name} to false.", hidden=True)
                params.append(
                    inspect.Parameter(
                        NEGATED + name,
                        inspect.Parameter.KEYWORD_ONLY,
                        default=False,
                        annotation=Annotated[bool, negated],
                    )
                )
    return params


class FlagConflictError(FtalkUsageError, ValueError):
    """A boolean flag was given both as `--name` and `--no-name`."""


def _collect(kwargs: dict[str, Any], names: set[str]) -> dict[str, Any]:
    """Pop the generated flags out of `kwargs`: the given ones as `{field: value}`."""
    flags: dict[str, Any] = {}
    for name in names:
        value = kwargs.pop(name, None)
        negated = kwargs.pop(NEGATED + name, False)
        if negated:
            if value:
                raise FlagConflictError(f"--{name} and --no-{name} were both given: keep one")
            value = False
        if value is not None:
            flags[name] = value
    return flags


def with_config_flags(*shown: str) -> Callable[[F], F]:
    """Give a command one flag per config field (of every section, so the whole training argument list is
    accepted); `--help` lists those of `shown` (section names, or `section.field`). The command receives the
    given flags as `flags`, or exits 2 on `--name --no-name`."""

    def decorate(func: F) -> F:
        generated = _parameters(shown)
        names = {name for model in SECTIONS.values() for name in model.model_fields}
        hints = typing.get_type_hints(func, include_extras=True)  # resolve string annotations
        own = [
            p.replace(annotation=hints.get(p.name, p.annotation))
            for p in inspect.signature(func).parameters.values()
            if p.name != "flags"
        ]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                flags = _collect(kwargs, names)
            except FlagConflictError as exc:
                raise typer.BadParameter(str(exc)) from exc
            return func(*args, flags=flags, **kwargs)

        params = own + generated
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # Typer must read the generated signature, not the original one
        return wrapper  # type: ignore[return-value]

    return decorate


def config_to_argv(cfg: BaseModel) -> list[str]:
    """Command-line flags that reproduce `cfg` (the inverse of the flags above; `None` values and empty lists left out),
    e.g. to hand a resolved config to `accelerate launch -m fantasytalk_cli train`."""
    argv: list[str] = []
    for section in cfg.model_dump(mode="json").values():
        for key, value in section.items():
            if value is None:
                continue
            if isinstance(value, bool):
                argv.append(f"--{key}" if value else f"--no-{key}")
            elif isinstance(value, list):
                if value:  # an empty list has no flag form: it is every list field's default
                    argv += [f"--{key}", *map(str, value)]
            else:
                argv.append(f"--{key}={value}")
    return argv
