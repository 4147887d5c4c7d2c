"""The package's layering (docs/architecture.md): a module imports only from below, no cycles.

Read from the source with ast, so imports inside functions count as much as those at the top:
a function-level import that closes a circle still makes the parser breakable from the heads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "detkit"

# docs/architecture.md's picture, bottom first. A module may import its own rank or below;
# within a rank the no-cycle test keeps the order one-way.
RANKS = [
    {"detkit.errors", "detkit.boxes", "detkit.native", "detkit.registry", "detkit.atomic",
     "detkit.memory", "detkit.openmp"},
    {"detkit.cfg"},
    {"detkit.layers"},
    {"detkit.heads"},
    {"detkit.model", "detkit.weights"},
    {"detkit.fast", "detkit.export", "detkit.convert"},
    {"detkit.data", "detkit.engine", "detkit.anchors", "detkit.bench"},
    {"detkit"},
    {"detkit.cli", "detkit.cli_train", "detkit.__main__"},
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """detkit modules that `name` imports anywhere in its source.

    `from X import y` counts as importing X.y when that is a module (`from . import native`),
    else X; a parent package's __init__ is not counted for importing one of its submodules.
    """
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {target for target in found if target in modules and target != name}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def rank(name: str) -> int:
    """The rank of a module: that of the longest listed prefix (detkit.heads.ssd -> heads); -1
    for a module the picture does not place."""
    matches = [(len(prefix), position) for position, group in enumerate(RANKS) for prefix in group
               if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1] if matches else -1


GRAPH = import_graph(MODULES)


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    package = tmp_path / "detkit"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import thing\n")
    (package / "b.py").write_text("def thing():\n    from . import a\n    return a\n")
    fake = {f"detkit.{n}": package / f"{n}.py" for n in ("a", "b")}
    assert cycles(import_graph(fake)) == [["detkit.a", "detkit.b"]]


def test_no_import_cycle_in_the_package():
    assert cycles(GRAPH) == []


def test_every_module_has_a_rank():
    for name in MODULES:
        assert rank(name) >= 0, name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_a_module_imports_only_from_below(name):
    above = sorted(target for target in GRAPH[name] if rank(target) > rank(name))
    assert above == [], f"{name} imports {above}, which sit above it in docs/architecture.md"


def test_the_parser_and_the_registry_know_no_layers():
    assert GRAPH["detkit.cfg"] == {"detkit.errors"}
    assert GRAPH["detkit.registry"] == set()
