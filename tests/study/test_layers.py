"""kdscope.study is a straight chain: spec < graph < store < jobs < tables < executors < run. A module imports only
modules before it, never from inside a function (which would hide a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import kdscope.study

CHAIN = ("spec", "graph", "store", "jobs", "tables", "executors", "run")
PACKAGE = Path(kdscope.study.__file__).parent


def _imports(tree: ast.AST) -> list[tuple[ast.ImportFrom, bool]]:
    """Relative imports of a module, each with whether it sits inside a function."""
    found: list[tuple[ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ImportFrom) and child.level:
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)))

    visit(tree, False)
    return found


def test_study_modules_import_only_down_the_chain() -> None:
    assert sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__") == sorted(CHAIN)
    for position, name in enumerate(CHAIN):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node, in_function in _imports(tree):
            assert not in_function, f"study/{name}.py line {node.lineno}: function-local kdscope import"
            if node.level == 1:  # a sibling in the package
                sibling = (node.module or "").split(".")[0]
                assert CHAIN.index(sibling) < position, f"study/{name}.py imports study/{sibling}.py (later)"
            else:
                assert node.module != "cli", f"study/{name}.py imports the CLI"
