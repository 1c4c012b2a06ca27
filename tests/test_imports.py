"""No import cycles inside the package: every `flextron.*` import, at module level or inside a
function (a lazy import that dodges a cycle is still one), is an edge of a graph without cycles.
Imports under `if TYPE_CHECKING:` name types for annotations only (`ElasticModel.routers`, loaded
with a checkpoint, is typed by a module built on `elastic`) and are not edges."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"


def module_names() -> dict[str, Path]:
    """flextron's modules by dotted name (a package by its own name, for its __init__)."""
    out = {}
    for path in sorted((SRC / "flextron").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, modules: set[str]) -> set[str]:
    """The flextron modules that `path` imports anywhere in its code."""
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from flextron import api` names a module; `from flextron import __version__` the package.
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                      for alias in node.names}
    return {name for name in found if name in modules}


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports(path, set(modules)) - {name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that comes back to its start, or None."""
    done: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(graph[node]):
            if cycle := visit(nxt):
                return cycle
        stack.pop()
        done.add(node)
        return None

    return next((c for c in map(visit, sorted(graph)) if c), None)


def test_imports_are_read_at_module_and_function_level(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import torch\nimport flextron.cost\nfrom flextron import api, __version__\n\n\n"
                    "def f():\n    from flextron.routers import decode\n\n\n"
                    "if TYPE_CHECKING:\n    from flextron.budgets import select_subnet\n")
    modules = {"flextron", "flextron.api", "flextron.cost", "flextron.routers", "flextron.budgets"}
    assert imports(path, modules) == modules - {"flextron.budgets"}
    assert "flextron.budgets" in import_graph()["flextron.adaptive"]


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    if cycle:
        pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_design_module_table_matches_the_tree():
    """docs/design.md's module table names every module of the package, and no module that is gone."""
    import re

    design = (SRC.parent / "docs" / "design.md").read_text()
    rows = set(re.findall(r"^\| `([\w/.]+)` \|", design, re.M))
    modules = {str(p.relative_to(SRC / "flextron")) for p in (SRC / "flextron").rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") and p.parent.name != "families"}
    assert modules | {"families/"} == rows


def test_test_modules_share_code_through_helpers_only():
    """Shared test code lives in tests/helpers.py (fixtures in conftest.py): no test module imports another."""
    tests = SRC.parent / "tests"
    offenders = [f"{path.name}: {node.module or node.names[0].name}" for path in sorted(tests.glob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 and any(name.startswith(("test_", "conftest")) for name in
                         ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]))]
    assert not offenders, offenders
