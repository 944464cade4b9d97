"""How `ftalk COMMAND --help` is laid out: click's plain formatter, options grouped by section, usage lines that
show required arguments bare."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand


class PanelHelpCommand(TyperCommand):
    """Plain help (one option per line, its help beside it or below a long name: nothing is ever cut, at
    any terminal width), with the options grouped under their panel ("data settings", ...)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """`CHECKPOINT OUTPUT [METADATA]`: required arguments bare, optional ones in brackets (Typer writes
        `{CHECKPOINT}`, a notation most users read as a placeholder set)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.display_name_raw
                pieces.append(name if param.required else f"[{name}]")
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        groups: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            default = "Arguments" if param.param_type_name == "argument" else "Options"
            groups.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        for name, rows in groups.items():
            with formatter.section(name):
                formatter.write_dl(rows)
