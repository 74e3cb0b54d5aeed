"""The package's import graph has no circle: data flows one way (collect -> plan -> kernels
-> reduce -> apply), so no module imports, at any depth, a module that imports it back.

Every import counts, also those inside functions (a lazy import hides a circle, it does not
remove it) and those under ``if TYPE_CHECKING:`` (a circle a type checker walks is a circle
of the design, even if it never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastgradstats

pytestmark = pytest.mark.backend_independent  # no gradient op routed by the environment

PACKAGE = Path(fastgradstats.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base in modules:
                found.add(base)
            for alias in node.names:  # `from . import core` imports a submodule
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    found.add(sub)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    found.discard(name)
    # a package's own __init__ is imported with any of its submodules: not an edge to follow
    return {m for m in found if not name.startswith(m + ".")}


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := walk(node)):
            return cycle
    return None


def test_the_checker_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _find_cycle(graph) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    graph = _graph()
    assert "fastgradstats.dispatch" in graph and graph["fastgradstats.clip"]
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph) or [])
