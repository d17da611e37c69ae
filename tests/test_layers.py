"""The house rules of kdscope's import graph (issue 14), over every module under src/kdscope:

- imports point down the pipeline: a layer imports only layers listed before it in `LAYERS` (a layer is a top-level
  module or subpackage); inside `kdscope.study` the same holds for the chain in `STUDY_CHAIN`;
- no import cycle between modules, counting function-local imports and the package ``__init__`` an import runs;
- no function-local import of a kdscope module (it would hide a cycle); lazy imports of heavy optional third-party
  packages stay allowed;
- no source file over 500 lines.

The checker runs on a planted tree too, so a rule that silently stopped checking would fail here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import kdscope

SRC = Path(kdscope.__file__).parent

# The pipeline, bottom first. "kdscope" is the package's own __init__ (the version).
LAYERS: tuple[str, ...] = (
    "kdscope", "errors", "files", "progress",
    "prompts", "padding", "synthetic", "tasks", "data", "labels",
    "models", "teacher", "losses", "fused", "xtok", "cache",
    "distributed", "train", "evaluation", "fidelity",
    "stats", "plots", "report", "study", "cli",
)
STUDY_CHAIN: tuple[str, ...] = ("spec", "graph", "store", "jobs", "tables", "executors", "run")
MAX_LINES = 500


def _modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for the package at ``root`` (its folder name is the top-level name)."""
    mods = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(tree: ast.AST) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement of a module, each with whether it sits inside a function."""
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append((child, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, mods: dict[str, Path]) -> set[str]:
    """The package modules an import statement names: ``from .x import y`` is ``x.y`` when that is a module, else
    ``x``; relative and absolute alike."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[: len(package) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module or ""
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = set()
    for name in names:
        while name and name not in mods:  # `import kdscope.x.y` names x.y; an attribute path ends at a module
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _packages_run(importer: str, target: str, mods: dict[str, Path]) -> set[str]:
    """The package ``__init__``s importing ``target`` runs, except the importer's own (already running)."""
    parts = target.split(".")
    return {p for p in (".".join(parts[:i]) for i in range(1, len(parts)))
            if p in mods and not (importer == p or importer.startswith(p + "."))}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def problems(root: Path, layers: tuple[str, ...] = LAYERS, study_chain: tuple[str, ...] = STUDY_CHAIN) -> list[str]:
    """Every breach of the rules in the package at ``root``, one line each (empty when it keeps them)."""
    mods = _modules(root)
    top = root.name
    out = []
    unplaced = sorted({_layer(m) for m in mods} - set(layers))
    if unplaced:
        out.append(f"not in LAYERS (place them in the pipeline order): {', '.join(unplaced)}")
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in sorted(mods.items()):
        where = path.relative_to(root.parent)
        for node, in_function in _imports(ast.parse(path.read_text(), str(path))):
            targets = _targets(module, path.name == "__init__.py", node, mods) - {module}
            if in_function and targets:
                out.append(f"{where}:{node.lineno}: function-local import of {', '.join(sorted(targets))}")
            for target in targets:
                graph[module] |= {target} | _packages_run(module, target, mods)
                mine, theirs = _layer(module), _layer(target)
                if mine in layers and theirs in layers and layers.index(theirs) > layers.index(mine):
                    out.append(f"{where}:{node.lineno}: {mine} imports {target}, a later layer")
                study = f"{top}.study."
                if mine == theirs == "study" and module.startswith(study) and target.startswith(study):
                    a, b = module.removeprefix(study), target.removeprefix(study)
                    if a in study_chain and b in study_chain and study_chain.index(b) > study_chain.index(a):
                        out.append(f"{where}:{node.lineno}: study.{a} imports study.{b}, later in the study chain")
    for cycle in _cycles(graph):
        out.append("import cycle: " + " <-> ".join(cycle))
    for module, path in sorted(mods.items()):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            out.append(f"{path.relative_to(root.parent)}: {lines} lines (over {MAX_LINES})")
    return out


def test_the_package_keeps_the_rules() -> None:
    assert problems(SRC) == []


def test_the_study_chain_names_every_study_module() -> None:
    assert sorted(p.stem for p in (SRC / "study").glob("*.py") if p.stem != "__init__") == sorted(STUDY_CHAIN)


def _plant(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "kdscope" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "kdscope"


_CLEAN = {
    "__init__.py": "",
    "errors.py": "class InputError(Exception): ...\n",
    "models.py": "from .errors import InputError\nimport json\n\n\ndef f():\n    import vllm  # optional, heavy\n",
    "study/__init__.py": "from .graph import expand\n",
    "study/spec.py": "from ..errors import InputError\n",
    "study/graph.py": "from .spec import InputError\nfrom kdscope.models import f\n\n\ndef expand(): ...\n",
}


def test_a_clean_planted_tree_passes(tmp_path: Path) -> None:
    assert problems(_plant(tmp_path, _CLEAN)) == []


def test_each_planted_breach_is_found(tmp_path: Path) -> None:
    cases = {
        "a later layer": {"models.py": "from .study.graph import expand\n"},
        "later in the study chain": {"study/spec.py": "from . import graph\n"},
        "function-local import of kdscope.models": {"errors.py": "def f():\n    from kdscope import models\n"},
        "import cycle: kdscope.errors <-> kdscope.models": {
            "errors.py": "def f():\n    import kdscope.models.f\n"},
        "import cycle: kdscope.models <-> kdscope.study <-> kdscope.study.graph": {
            "models.py": "from . import study\n"},
        "501 lines (over 500)": {"errors.py": "x = 1\n" * 501},
        "not in LAYERS": {"newstage.py": ""},
    }
    for i, (expected, files) in enumerate(cases.items()):
        found = problems(_plant(tmp_path / str(i), {**_CLEAN, **files}))
        assert any(expected in line for line in found), (expected, found)


def test_the_readme_layout_lists_every_layer_in_order() -> None:
    """README's Layout section is the tree in a few lines: every layer, in the order of `LAYERS`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = [name.strip().rstrip("/") for line in block.strip().splitlines()
              for name in line.split("  ", 1)[0].split(",")]
    assert listed == [layer for layer in LAYERS if layer != "kdscope"]
