"""Import cycles among the plugin's own modules, read from the source (nothing is imported).

    python scripts/import_cycles.py [--all]

Prints every cycle among module-level imports (those run when a module is imported) and exits
1 when there is one. ``--all`` also counts imports inside functions and methods, which Python
resolves only when they run: a cycle through them does not fail at import time, but still ties
the modules together, so it is reported apart.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = "napari_brain_uad"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The modules an ``from ... import ...`` names: the module itself, and each imported name
    that is a submodule (``from . import nifti``)."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{alias.name}" for alias in node.names]


def imports(path: Path, modules: set[str], include_nested: bool) -> set[str]:
    module = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                continue  # never runs
            if isinstance(child, ast.Import) and (include_nested or not nested):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and (include_nested or not nested):
                found.update(resolve(module, path.name == "__init__.py", child))
            visit(child, inner)

    visit(tree, False)
    # A submodule import also runs its packages' __init__; the package of a module is not a
    # cycle with it (Python imports the package first by design), so only the named modules count.
    return {name for name in found if name in modules and name != module}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph(include_nested: bool) -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules, include_nested) for p in paths}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(edges[node]):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
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

    sys.setrecursionlimit(10_000)
    for node in sorted(edges):
        if node not in index:
            connect(node)
    return sorted(found)


def describe(component: list[str], edges: dict[str, set[str]]) -> str:
    inside = set(component)
    links = [f"  {a} -> {b}" for a in component for b in sorted(edges[a] & inside)]
    return "\n".join([", ".join(component)] + links)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="also report cycles through imports inside functions")
    args = parser.parse_args()
    top = cycles(graph(include_nested=False))
    print(f"module-level import cycles: {len(top)}")
    for component in top:
        print(describe(component, graph(include_nested=False)))
    if args.all:
        edges = graph(include_nested=True)
        every = [c for c in cycles(edges)]
        print(f"\ncycles counting imports inside functions: {len(every)}")
        for component in every:
            print(describe(component, edges))
    return 1 if top else 0


if __name__ == "__main__":
    sys.exit(main())
