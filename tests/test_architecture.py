"""The package's shape: no import cycles, no oversized modules, a ``--help`` that imports no torch.

The import graph is read from the source with ``ast`` (function-level imports count, imports under
``if TYPE_CHECKING:`` do not), so a cycle hidden inside a function is caught without running it.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "saltdiff"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every import node, skipping the bodies of ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                stack.extend(child.orelse)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> {package modules it imports}``, resolving relative imports."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        edges: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    anchor = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from .pkg import sub` imports the submodule when there is one, else the package.
                targets = [
                    f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                    for alias in node.names
                ]
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .hidden import X\n"
        "def f():\n    from .inner import Y\n"
    )
    found = {n.module for n in _imports(tree) if isinstance(n, ast.ImportFrom)}
    assert found == {"typing", "inner"}


def test_no_import_cycles():
    cycles = find_cycles(import_graph(package_modules()))
    assert cycles == [], f"import cycles among package modules: {cycles}"


def test_no_module_is_over_600_lines():
    long = {
        name: n
        for name, path in package_modules().items()
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_nothing_imports_the_cli():
    graph = import_graph(package_modules())
    importers = sorted(
        m for m, edges in graph.items() if "saltdiff.cli" in edges and m != "saltdiff.__main__"
    )
    assert importers == []


def test_math_modules_import_neither_pipeline_nor_cli():
    graph = import_graph(package_modules())
    for name in ("saltdiff.layout", "saltdiff.losses", "saltdiff.inversion"):
        assert not graph[name] & {"saltdiff.pipeline", "saltdiff.cli"}, name


_HELP_PROBE = """
import json, sys
from saltdiff.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "gradio") if m in sys.modules)
sys.stderr.write("MODULES=" + json.dumps(heavy) + "\\n")
"""


@pytest.mark.parametrize(
    "argv", [["--help"], ["generate", "--help"], ["bench", "--help"], ["study", "--help"], ["demo", "--help"]]
)
def test_help_imports_neither_torch_nor_diffusers(argv):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_PROBE.format(argv=argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "usage: saltdiff" in proc.stdout, proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES=")][-1]
    assert json.loads(line[len("MODULES=") :]) == []
