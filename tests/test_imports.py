"""promptlab's modules import one another without cycles, and each one imports on its own.

The first test reads every module under promptlab/ with `ast` (no import runs): each ``import`` and
``from ... import`` anywhere in the file, inside functions too, relative ones resolved, becomes an edge to
the promptlab module it names. A cycle between promptlab modules fails the test, with every cycle
written as ``a -> b -> a`` and the file and line of each import. An import inside a function only hides a
cycle until someone moves it: the fix is to move the shared piece down to a module both can import.

The second test imports each module as the first promptlab module of a fresh interpreter, so no import
order that happens to work elsewhere (the package ``__init__``, another test) can hide a module that
fails when imported alone.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "promptlab"
PACKAGE = "promptlab"


def module_name(path: Path) -> str:
    """``promptlab/data/features.py`` -> ``promptlab.data.features``; a package's ``__init__.py`` -> its name."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """True for an import under ``if TYPE_CHECKING:`` (never run, so never part of a cycle)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(promptlab module imported, line) for every import in the file, relative imports resolved.

    ``from X import Y`` names module ``X.Y`` when that is a module, else module ``X`` (Y is a name in it).
    Parent packages that Python imports on the way are not edges: every module has them.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
        for target in targets:
            while target and target not in modules and target.startswith(PACKAGE + "."):
                target = target.rpartition(".")[0]  # ``import promptlab.data.features.x`` -> the module
            if target in modules and target != name:
                found.append((target, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported promptlab module: line of its first import}."""
    modules = all_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The shortest cycle through each module that is on one, as closed paths ``[a, b, a]``: the strongly
    connected groups of modules (Tarjan), then a breadth-first way back to each member."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found, seen_cycles = [], set()
    for group in groups:  # the shortest way back through each module of the group (breadth first)
        members = set(group)
        for start in group:
            paths, reached = [[start]], {start}
            while paths:
                path = paths.pop(0)
                if start in graph[path[-1]] and len(path) > 1:
                    key = frozenset(zip(path, path[1:] + [start]))  # the same cycle from another start
                    if key not in seen_cycles:
                        seen_cycles.add(key)
                        found.append(path + [start])
                    break
                for w in sorted(graph[path[-1]]):
                    if w in members and w not in reached:
                        reached.add(w)
                        paths.append(path + [w])
    return found


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    steps = [f"{a} -> {b} ({all_modules()[a].relative_to(PACKAGE_DIR.parent)}:{graph[a][b]})"
             for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n    " + "\n    ".join(steps)


def test_the_graph_sees_every_kind_of_import():
    """The walker itself: absolute, relative, function-level and package imports all become edges."""
    graph = import_graph()
    assert "promptlab.errors" in graph["promptlab.pipeline"]  # from .errors import ConfigError
    assert "promptlab.cli" in graph["promptlab.__main__"]  # from .cli import main
    assert "promptlab.pipeline" in graph["promptlab.cli"]  # inside a function: from .pipeline import ...
    assert "promptlab.data.download" in graph["promptlab.data"]  # a package __init__: from .download import ...
    assert "promptlab.errors" in graph["promptlab.data.download"]  # two dots: from ..errors import ...
    assert cycles({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": 1}, "b": {"a": 2, "c": 3}, "c": {"b": 4}}) == [["a", "b", "a"], ["c", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles_between_promptlab_modules():
    graph = import_graph()
    found = cycles(graph)
    assert not found, ("import cycles between promptlab modules (move the shared piece down into a module "
                       "both can import):\n" + "\n".join(describe(c, graph) for c in found))


# The modules are imported in forked children of one fresh interpreter that has loaded the heavy
# third-party packages but no promptlab module: each child starts as a fresh interpreter would, as far
# as promptlab is concerned, without paying for torch's import 30 times. Without fork: one process each.
IMPORT_EACH = r"""
import importlib, json, os, subprocess, sys, traceback
import numpy, torch, yaml, safetensors  # third-party only: no promptlab module is loaded here
assert not any(m == "promptlab" or m.startswith("promptlab.") for m in sys.modules)
failures = {}
for name in json.loads(sys.argv[1]):
    if not hasattr(os, "fork"):
        run = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True)
        if run.returncode:
            failures[name] = run.stderr[-3000:]
        continue
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        code = 0
        try:
            importlib.import_module(name)
        except BaseException:
            os.write(write_fd, traceback.format_exc()[-3000:].encode())
            code = 1
        os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if status:
        failures[name] = message or f"exit status {status}"
print(json.dumps(failures))
"""


def test_each_module_imports_alone_in_a_fresh_interpreter():
    names = [n for n in all_modules() if n != "promptlab.__main__"]  # __main__ runs the command line
    proc = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(names)], capture_output=True, text=True, timeout=600, cwd=PACKAGE_DIR.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not failures, "modules that fail when imported first:\n" + "\n".join(
        f"--- {name}\n{message}" for name, message in failures.items())


if __name__ == "__main__":  # python tests/test_imports.py: print the graph and any cycles
    g = import_graph()
    for m, targets in g.items():
        print(m, "->", ", ".join(sorted(targets)) or "-")
    for c in cycles(g):
        print("CYCLE", describe(c, g))
