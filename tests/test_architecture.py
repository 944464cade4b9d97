"""The house rules the code itself can be checked for (STYLE.md; issue "Rooms for what comes next"): which package
may import which, where the distributed strategy is known, who takes the root config, how long a module may be."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fantasytalk_cli"
LAYERED = (
    *("data", "models", "cache", "planning", "sample", "convert", "train", "checkpoints", "runtime", "prepare"),
    "evaluate",
)
"""The packages that must form no import cycle among themselves."""
ROOT_CONFIG_ENTRIES = {
    "cache/build.py:build_cache",  # ftalk cache
    "planning/report.py:make_plan_report",  # ftalk plan-buckets
    "train/loop.py:run_training",  # ftalk train ...
    "train/setup.py:set_up",  # ... whose set-up takes the sections apart
    "demo.py:demo_config",  # ftalk demo builds its config
}
"""The only functions outside `config/` and the CLI that take the root `FtalkConfig`: one set-up entry per command."""


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _package(relative: str) -> str:
    parts = Path(relative).parts
    return parts[0] if len(parts) > 1 else Path(relative).stem


def _imports(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for relative, tree in _modules().items():
        mine = _package(relative)
        for name in _imports(tree):
            parts = name.split(".")
            if parts[0] == "fantasytalk_cli" and len(parts) > 1 and parts[1] != mine:
                graph.setdefault(mine, set()).add(parts[1])
    return graph


def test_lower_packages_import_nothing_from_train() -> None:
    graph = _package_graph()
    for package in ("sample", "cache", "data", "models", "runtime", "checkpoints", "planning", "convert", "prepare"):
        assert "train" not in graph.get(package, set()), package


def test_models_import_no_accelerate_or_deepspeed() -> None:
    for relative, tree in _modules().items():
        if _package(relative) == "models":
            heavy = {n for n in _imports(tree) if n.split(".")[0] in ("accelerate", "deepspeed")}
            assert not heavy, (relative, heavy)


def test_no_import_cycle_among_the_packages() -> None:
    graph = {p: {q for q in deps if q in LAYERED} for p, deps in _package_graph().items() if p in LAYERED}

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        stack = [start]
        while stack:
            for nxt in graph.get(stack.pop(), set()):
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
        return seen

    cycles = sorted((a, b) for a in LAYERED for b in LAYERED if a < b and b in reaches(a) and a in reaches(b))
    assert not cycles


def test_strategy_names_are_compared_only_in_distributed() -> None:
    for relative, tree in _modules().items():
        if relative == "train/distributed.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                for side in (node.left, *node.comparators):
                    is_name = isinstance(side, ast.Attribute) and side.attr == "name"
                    assert not (is_name and "strategy" in ast.unparse(side.value)), (relative, ast.unparse(node))


def test_only_the_command_entries_take_the_root_config() -> None:
    takers = set()
    for relative, tree in _modules().items():
        if _package(relative) == "config" or relative == "cli.py":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                hints = [a.annotation for a in (*node.args.args, *node.args.kwonlyargs) if a.annotation is not None]
                if any("FtalkConfig" in ast.unparse(hint) for hint in hints):
                    takers.add(f"{relative}:{node.name}")
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.AnnAssign) and "FtalkConfig" in ast.unparse(item.annotation):
                        takers.add(f"{relative}:{node.name}.{ast.unparse(item.target)}")
    assert takers <= ROOT_CONFIG_ENTRIES, sorted(takers - ROOT_CONFIG_ENTRIES)


def test_no_module_over_600_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600
    }
    assert not long


def test_no_private_name_is_imported_across_modules() -> None:
    crossing = [
        f"{relative}: {node.module}.{alias.name}"
        for relative, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fantasytalk_cli")
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")  # dunders (`__version__`) are public
    ]
    assert not crossing
