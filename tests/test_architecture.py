"""The package's shape: no import cycles, no oversized modules, a ``--help`` that imports no torch.

The import graph is read from the source with ``ast`` (function-level imports count, imports under
``if TYPE_CHECKING:`` do not), so a cycle hidden inside a function is caught without running it.
"""

from __future__ import annotations

import ast
import json
import os
import re
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


# -- the model-family seam ---------------------------------------------------------------------------
#: A name that says "UNet": an identifier whose snake_case words include ``unet`` (``unet``,
#: ``unet_kwargs``, ``SDXL_UNET_CONFIG``) or that spells ``UNet`` in CamelCase (``UNet2DConditionModel``,
#: ``UNetExtras``).
_UNET_WORD = re.compile(r"(?:^|_)unet(?:_|$)", re.IGNORECASE)
_UNET_CAMEL = re.compile(r"UNet(?:[A-Z0-9_]|$)")
#: The VP schedule of a diffusers sampler (``alphas_cumprod``, ``initial_alpha_cumprod``).
_ALPHAS = re.compile(r"alphas?_cumprod")
_ATTRIBUTE_CALLS = {"getattr", "hasattr", "setattr", "delattr"}


def _kind(name: str) -> str | None:
    if _UNET_WORD.search(name) or _UNET_CAMEL.search(name):
        return "unet"
    if _ALPHAS.search(name):
        return "alphas_cumprod"
    return None


def _identifiers(node: ast.AST):
    """The identifiers ``node`` itself spells (not its children's); a ``getattr(x, "name")`` string too."""
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Attribute):
        yield node.attr
    elif isinstance(node, ast.arg):
        yield node.arg
    elif isinstance(node, ast.keyword) and node.arg:
        yield node.arg
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield node.name
    elif isinstance(node, ast.alias):
        yield node.name.rsplit(".", 1)[-1]
        if node.asname:
            yield node.asname
    elif isinstance(node, ast.ImportFrom) and node.module:
        yield node.module.rsplit(".", 1)[-1]
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _ATTRIBUTE_CALLS
        and len(node.args) >= 2
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
    ):
        yield node.args[1].value


def family_names(
    source: str, *, vp_functions_may_name_the_schedule: bool = False
) -> list[tuple[int, str, str]]:
    """``(line, identifier, kind)`` for every identifier naming a UNet or the VP schedule. Strings are
    data (``"unet/config.json"``, a component's folder), except as the attribute of ``getattr`` & co.
    With ``vp_functions_may_name_the_schedule``, functions named ``vp_*`` may name ``alphas_cumprod``."""
    found = []

    def visit(node: ast.AST, in_vp: bool) -> None:
        is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        in_vp = in_vp or (vp_functions_may_name_the_schedule and is_function and node.name.startswith("vp_"))
        for name in _identifiers(node):
            kind = _kind(name)
            if kind and not (kind == "alphas_cumprod" and in_vp):
                found.append((node.lineno, name, kind))
        for child in ast.iter_child_nodes(node):
            visit(child, in_vp)

    visit(ast.parse(source), False)
    return found


#: Where a UNet and the VP schedule may be named: the family adapters (one seam per family), and the
#: VP functions of ``noise.py`` (``vp_*``: the one reader of ``alphas_cumprod``).
FAMILY_SEAM = ("saltdiff.families",)
VP_FUNCTIONS = "saltdiff.noise"

#: Modules that are UNet-specific by nature, what they may name and why. A module (or package) is
#: listed only when naming the UNet is its job; everything else goes through the family adapter,
#: ``pipe.denoiser`` or a ``noise`` function. Keep it short: a new module that names a UNet fails.
UNET_MODULES: dict[str, tuple[frozenset[str], str]] = {
    "saltdiff.salt_mixin": (
        frozenset({"unet"}),
        "the UNet pipelines' mixin (SaltPipeline, SaltXLPipeline): its stages call and configure the UNet",
    ),
    "saltdiff.denoising": (
        frozenset({"unet"}),
        "the UNet sampling loop: UNetExtras (SDXL's added conditions, IP-Adapter, timestep_cond), stop_after",
    ),
    "saltdiff.inversion": (
        frozenset({"unet", "alphas_cumprod"}),
        "DDIM inversion of a VP UNet, on DDIMInverseScheduler's own alphas_cumprod",
    ),
    "saltdiff.attention": (
        frozenset({"unet"}),
        "UNet cross-attention capture: layers named by down/mid/up block (families/unet.py wraps it)",
    ),
    "saltdiff.preflight": (
        frozenset({"unet"}),
        "reads a UNet folder's unet/config.json for the image-size check before any weight loads",
    ),
    "saltdiff.testing": (
        frozenset({"unet", "alphas_cumprod"}),
        "tiny and full-size UNet components for tests; GaussianDenoiser, the exact VP denoiser",
    ),
    "saltdiff.training": (
        frozenset({"unet", "alphas_cumprod"}),
        "the trainer of the built-in model, a VP UNet: its config, noised batches, export",
    ),
}


def _listed(module: str, keys) -> str | None:
    return next((k for k in keys if module == k or module.startswith(k + ".")), None)


def family_naming_by_module() -> dict[str, list[tuple[int, str, str]]]:
    """Every package module outside the family adapters -> what in it names a UNet or the VP schedule."""
    found = {}
    for name, path in package_modules().items():
        if _listed(name, FAMILY_SEAM):
            continue
        source = path.read_text(encoding="utf-8")
        hits = family_names(source, vp_functions_may_name_the_schedule=name == VP_FUNCTIONS)
        if hits:
            found[name] = hits
    return found


def test_the_naming_rule_sees_identifiers_and_attribute_strings_not_data():
    source = (
        "from diffusers import UNet2DConditionModel\n"
        "def run(pipe, unet_kwargs=None):\n"
        "    pipe.unet(x, **unet_kwargs)\n"
        "    getattr(pipe, 'unet', None)\n"
        "    return scheduler.alphas_cumprod[t], inverse.initial_alpha_cumprod\n"
        "def vp_sigma(alphas_cumprod):\n"
        "    return alphas_cumprod\n"
        "FOLDER = 'unet/config.json'\n"
        "unetwork = tune = transformer = 1\n"
        "call(unet=1)\n"
    )
    hits = family_names(source)
    assert [(line, name) for line, name, _ in hits] == [
        (1, "UNet2DConditionModel"),
        (2, "unet_kwargs"),
        (3, "unet"),
        (3, "unet_kwargs"),
        (4, "unet"),
        (5, "alphas_cumprod"),
        (5, "initial_alpha_cumprod"),
        (6, "alphas_cumprod"),
        (7, "alphas_cumprod"),
        (10, "unet"),
    ]
    vp_allowed = family_names(source, vp_functions_may_name_the_schedule=True)
    assert [line for line, _, kind in vp_allowed if kind == "alphas_cumprod"] == [5, 5]


def test_only_the_family_adapters_and_the_vp_functions_name_a_unet_or_alphas_cumprod():
    """Outside ``families/`` and ``noise.py``'s ``vp_*`` functions, a module names a UNet or
    ``alphas_cumprod`` only when it is listed in :data:`UNET_MODULES` for that name, with its reason."""
    unlisted = {}
    for module, hits in family_naming_by_module().items():
        key = _listed(module, UNET_MODULES)
        allowed = UNET_MODULES[key][0] if key else frozenset()
        bad = [f"{line}: {name}" for line, name, kind in hits if kind not in allowed]
        if bad:
            unlisted[module] = bad
    assert unlisted == {}, (
        "go through the family adapter (saltdiff.families), pipe.denoiser or a noise.vp_* function "
        f"instead: {unlisted}"
    )


def test_every_allow_list_entry_is_still_needed():
    """An entry whose module no longer names what it is allowed to goes: the list stays short."""
    naming = family_naming_by_module()
    modules = package_modules()
    for key, (kinds, reason) in UNET_MODULES.items():
        assert reason and kinds <= {"unet", "alphas_cumprod"}, key
        covered = [m for m in modules if _listed(m, [key])]
        assert covered, f"{key} is not a module of the package"
        used = {kind for m in covered for _, _, kind in naming.get(m, [])}
        assert kinds <= used, f"{key} no longer names {sorted(kinds - used)}: narrow or drop its entry"
