"""No function of the package outside ``fastgradstats/kernels/`` is longer than 80 lines.

A function is measured from its ``def`` line to its last line (``end_lineno - lineno + 1``),
docstring included; methods and nested functions count on their own. The Triton kernels
are exempt: a kernel is one launch, and splitting it into jit helpers only moves code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import fastgradstats

pytestmark = pytest.mark.backend_independent  # reads source files, runs no gradient op

PACKAGE = Path(fastgradstats.__file__).parent
MAX_LINES = 80


def long_functions(root: Path, max_lines: int = MAX_LINES) -> dict[str, int]:
    """``{"path/relative/to/root.py:qualified.name": lines}`` of every function longer than
    ``max_lines`` under ``root``, ``kernels/`` left out."""
    found: dict[str, int] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "kernels":
            continue

        def visit(node: ast.AST, prefix: str, rel: Path = rel) -> None:
            for child in ast.iter_child_nodes(node):
                name = prefix
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}."
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = child.end_lineno - child.lineno + 1
                    if lines > max_lines:
                        found[f"{rel.as_posix()}:{name[:-1]}"] = lines
                visit(child, name)

        visit(ast.parse(path.read_text(), filename=str(path)), "")
    return found


def _lines(indent: str, count: int) -> str:
    return "".join(f"{indent}x{i} = {i}\n" for i in range(count))


def test_the_measure_finds_a_planted_long_function(tmp_path):
    # A.ok: its def line + 79 = 80 lines (allowed); A.long and nested inner: 81 each;
    # the kernel (81) is exempt.
    (tmp_path / "mod.py").write_text(
        "class A:\n"
        f"    def ok(self):\n{_lines(' ' * 8, 79)}"
        f"    def long(self):\n{_lines(' ' * 8, 80)}"
        f"def outer():\n    def inner():\n{_lines(' ' * 8, 80)}    return inner\n"
    )
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "k.py").write_text(f"def kernel():\n{_lines(' ' * 4, 80)}")
    assert long_functions(tmp_path) == {"mod.py:A.long": 81, "mod.py:outer": 83,
                                        "mod.py:outer.inner": 81}  # fmt: skip


def test_no_function_outside_the_kernels_is_longer_than_80_lines():
    every = long_functions(PACKAGE, max_lines=0)
    assert "clip.py:clip_grad_norm_" in every and not any(k.startswith("kernels/") for k in every)
    too_long = long_functions(PACKAGE)
    assert not too_long, (
        f"functions over {MAX_LINES} lines (split them into helpers that each do one thing): "
        + ", ".join(f"{name} ({lines})" for name, lines in sorted(too_long.items()))
    )
