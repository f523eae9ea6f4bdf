"""kdlib's import graph, read from the source (ast): no cycle, and kdlib modules imported at the top
of a module, never inside a function; and the modules notebooks import for light work do not load
torch or scipy.stats (1.2 s and 0.6 s of a kernel's start)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kdlib"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    """kdlib/data/loader.py -> kdlib.data.loader; kdlib/__init__.py -> kdlib."""
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, ast.Module]:
    """Every module of the package, parsed."""
    return {module_name(p, package): ast.parse(p.read_text(), str(p))
            for p in sorted(package.rglob("*.py"))}


def _packages(mods: dict[str, ast.Module]) -> set[str]:
    """The modules that are packages (an __init__.py): those other modules' names extend."""
    return {m.rsplit(".", 1)[0] for m in mods if "." in m}


def imported(node: ast.Import | ast.ImportFrom, here: str, known: set[str],
             packages: set[str]) -> set[str]:
    """The package's modules an import statement in module `here` names (TYPE_CHECKING ones too)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names} & known
    base = node.module or ""
    if node.level:  # relative: `from . import x` in a/b.py is a.x; in a/__init__.py too
        anchor = here.split(".") if here in packages else here.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names} & known


def import_graph(mods: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its source, itself left out."""
    known, packages = set(mods), _packages(mods)
    return {name: {dep for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for dep in imported(node, name, known, packages)} - {name}
            for name, tree in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def function_level_imports(mods: dict[str, ast.Module]) -> list[str]:
    """`module:line imported` for every import of a package module inside a function body."""
    known, packages, found = set(mods), _packages(mods), []
    for name, tree in mods.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found += [f"{name}:{node.lineno} {dep}"
                              for dep in sorted(imported(node, name, known, packages))]
    return sorted(set(found))


def test_kdlib_has_no_import_cycle():
    graph = import_graph(modules())
    assert {"kdlib", "kdlib.train", "kdlib.runs", "kdlib.data.loader"} <= set(graph)
    assert "kdlib.identity" in graph["kdlib.train"]  # the graph sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_kdlib_modules_are_imported_at_the_top():
    assert function_level_imports(modules()) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


def test_a_type_only_cycle_and_a_hidden_import_are_found(tmp_path):
    pkg = _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import f\n",
        "pkg/b.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n"
                     "def f():\n    from pkg.sub import c\n    import json\n"),
        "pkg/sub/__init__.py": "", "pkg/sub/c.py": "from .. import a\nfrom . import d\n",
        "pkg/sub/d.py": "import numpy\n",
    })
    mods = modules(pkg)
    graph = import_graph(mods)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a", "pkg.sub.c"}
    assert graph["pkg.sub.c"] == {"pkg.a", "pkg.sub.d"} and graph["pkg.sub.d"] == set()
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert function_level_imports(mods) == ["pkg.b:5 pkg.sub.c"]  # json is not the package's
    assert find_cycle({"x": {"y"}, "y": set()}) is None


@pytest.mark.parametrize("src, want", [
    ("from pkg import sub\n", {"pkg.sub"}),  # a subpackage named in `from pkg import`
    ("from pkg.sub import d\n", {"pkg.sub.d"}),
    ("import pkg.sub.d\n", {"pkg.sub.d"}),
    ("from pkg.sub import NAME\n", {"pkg.sub"}),  # a name defined in the package's __init__
])
def test_import_forms(tmp_path, src, want):
    pkg = _write(tmp_path, {"pkg/__init__.py": "", "pkg/e.py": src, "pkg/sub/__init__.py": "",
                            "pkg/sub/d.py": ""})
    assert import_graph(modules(pkg))["pkg.e"] == want


@pytest.mark.parametrize("module, heavy", [
    ("kdlib.ratios", ("torch", "scipy.stats")),  # notebooks 02 and 03 select rows with it
    ("kdlib.workbook", ("torch",)),  # notebook 01: splits from the cache's slice table
    ("kdlib.data.splits", ("torch", "scipy.stats")),
])
def test_light_modules_load_no_heavy_library(module, heavy):
    code = f"import sys, {module}; print(sorted(set({list(heavy)!r}) & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.stdout.strip() == "[]", f"{module} loads {done.stdout.strip()}"
