"""The import graph of edgeft/, converters/ and devices/, read from the source (nothing is imported).

Every import counts, the ones inside functions too: a function-level import only hides a circle until the
day someone moves it to the top, and a circle means two modules that cannot be understood (or tested) apart.
converters/ is a library edgeft uses: it imports nothing from edgeft/, and what it needs of its host (the
llama.cpp tree, where to put a private dependency) it takes as an argument it defines
(converters.compare.ReferenceTree).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# folder -> the package its modules are imported as (pyproject.toml ships converters/ and devices/ inside
# edgeft); a bare `converters.x` (a script run from the checkout) names the same file.
FOLDERS = {"edgeft": "edgeft", "converters": "edgeft.converters", "devices": "edgeft.devices"}
ALIASES = {"converters": "edgeft.converters", "devices": "edgeft.devices"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _canonical(name: str) -> str:
    for alias, real in ALIASES.items():
        if name == alias or name.startswith(alias + "."):
            return real + name[len(alias):]
    return name


def _imported(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement may bind: `from a import b` is a.b when b is a module, else a."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    if node.level:
        base = package[:len(package) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    return [f"{source}.{a.name}" for a in node.names] + [source]


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module of ours: first line}, for every import anywhere in the module."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for name in _imported(module, path, node):
                name = _canonical(name)
                while name and name not in modules:  # a name inside a module: the module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.setdefault(name, node.lineno)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_sees_function_level_imports():
    """The reader itself: a module we know imports another only inside a function is seen to."""
    graph = import_graph()
    assert "edgeft.train" in graph["edgeft.export.gguf"]  # --imatrix train, imported inside _imatrix
    assert "edgeft.converters.compare" in graph["edgeft.llamacpp"]  # inside reference_tree
    assert "edgeft.run" in graph["edgeft.devices.deploy"]  # `from ..run import`: up out of devices/


def test_no_import_cycle():
    graph = import_graph()
    described = []
    for component in _cycles(graph):
        described.append("; ".join(
            f"{m} imports {', '.join(f'{d} (line {graph[m][d]})' for d in graph[m] if d in component)}"
            for m in component))
    assert not described, "import cycles:\n" + "\n".join(described)


def test_the_cycle_finder_finds_one():
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_converters_import_nothing_of_edgeft():
    graph = import_graph()
    upward = {m: [d for d in deps if not d.startswith("edgeft.converters")] for m, deps in graph.items()
              if m.startswith("edgeft.converters")}
    assert not {m: d for m, d in upward.items() if d}, "converters/ takes what it needs of edgeft as arguments"
