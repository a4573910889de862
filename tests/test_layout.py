"""The package's shape, as docs/ARCHITECTURE.md describes it: every module imports, no import cycles,
a small top level, a docstring on every package, and dependencies that point down (nothing but the
benchmark imports sft.bench; the trainer imports none of the tools).

The import graph is read from the source (AST), so an import inside a function counts as much as one at
the top of the file; `from sft.pkg import name` counts as an import of `sft.pkg.name` when that is a module.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "sft"
TOOLS = ("sft.demo", "sft.merge", "sft.plot", "sft.inspect_data", "sft.convert_checkpoint")
MAX_TOP_LEVEL_FILES = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The sft modules that `path` imports anywhere in its body, resolved to modules (not packages' names)."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sft")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_pkg else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            if base.split(".")[0] != "sft":
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found.update(subs if len(subs) == len(node.names) else [base, *subs])
    # `import sft.a.b` names a module; a name that is not one (an attribute path) counts as its nearest module.
    resolved = set()
    for target in found:
        while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
        if target in modules and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


IMPORT_ALL = """
import importlib, json, sys, traceback
failed = {}
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except BaseException as exc:
        failed[name] = "".join(traceback.format_exception_only(type(exc), exc)).strip()[-500:]
print(json.dumps(failed))
"""


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in all_modules() if n.rsplit(".", 1)[-1] != "__main__"]
    r = subprocess.run(
        [sys.executable, "-c", IMPORT_ALL, json.dumps(names)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    failed = json.loads(r.stdout.strip().splitlines()[-1])
    assert not failed, "modules that do not import: " + "; ".join(f"{k}: {v}" for k, v in failed.items())


def test_no_import_cycles():
    graph = import_graph()
    assert "sft.trainer" in graph and "sft.config.schema" in graph["sft.trainer"]  # the graph is not empty
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_small_top_level_and_packages_with_docstrings_and_no_imports():
    top = sorted(p.name for p in PKG.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_FILES, f"sft/ holds {len(top)} .py files (at most {MAX_TOP_LEVEL_FILES}): {top}"
    for init in sorted(PKG.rglob("__init__.py")):
        tree = ast.parse(init.read_text())
        doc = ast.get_docstring(tree)
        where = init.relative_to(ROOT)
        assert doc and doc.strip() != "TODO.", f"{where}: give the package a docstring saying its role"
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        assert not imports, f"{where}: a package __init__ imports nothing (imports there caused cycles)"
    for folder in sorted(p for p in PKG.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        if any(folder.glob("*.py")):
            assert (folder / "__init__.py").is_file(), f"{folder.relative_to(ROOT)}: a package needs __init__.py"


def test_dependencies_point_down():
    graph = import_graph()
    bench_users = sorted(
        m
        for m, deps in graph.items()
        if not m.startswith("sft.bench") and any(d == "sft.bench" or d.startswith("sft.bench.") for d in deps)
    )
    assert not bench_users, f"only sft/bench may import sft.bench; imported by {bench_users}"
    tools = sorted(d for d in graph["sft.trainer"] if any(d == t or d.startswith(t + ".") for t in TOOLS))
    assert not tools, f"sft/trainer.py imports the tools {tools}; tools use the trainer, never the reverse"
