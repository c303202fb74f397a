"""The README runs as written: its Python API block, its first command, and every saltdiff command parses."""

import re
from pathlib import Path

import pytest


def python_api_block() -> str:
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    return re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)


# Four generations on the built-in model, 50 + 50 + 25 steps: about 11 s on 2 cores, so the slow tier;
# the fast tier checks the block compiles and imports only names that exist (the next test).
@pytest.mark.slow
def test_readme_python_api_block_runs_verbatim(tmp_path, monkeypatch):
    code = python_api_block()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SALTDIFF_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].images[0].size == (64, 64)
    assert scope["GenerationRequest"].from_png("result.png").seed == 1


def test_readme_python_api_block_compiles_and_imports_what_exists():
    import ast
    import importlib

    tree = ast.parse(python_api_block(), "README.md")
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported = [(node.module, alias.name) for node in imports for alias in node.names]
    imported = [(module, name) for module, name in imported if module.split(".")[0] == "saltdiff"]
    assert ("saltdiff", "SaltPipeline") in imported and len(imported) > 1, imported
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), f"from {module} import {name}"


# -- the shell blocks --------------------------------------------------------------------------------
README = Path(__file__).resolve().parents[1] / "README.md"


def shell_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def commands(block: str) -> list[list[str]]:
    """Each command of a block (continuation lines joined, ``&&`` chains split, comments dropped)."""
    import shlex

    text = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in text.splitlines():
        for part in line.split("&&"):
            words = shlex.split(part, comments=True)
            if words:
                out.append(words)
    return out


def saltdiff_commands() -> list[list[str]]:
    return [c[1:] for block in shell_blocks() for c in commands(block) if c[0] == "saltdiff"]


def test_every_saltdiff_command_of_the_readme_parses():
    from saltdiff.cli import build_parser

    found = saltdiff_commands()
    assert {c[0] for c in found} >= {"generate", "bench", "demo"}
    for argv in found:
        if "--help" in argv:
            continue
        build_parser().parse_args(argv)  # a flag the CLI lost exits here (SystemExit)


def test_each_block_installs_the_extra_its_command_needs():
    for block in shell_blocks():
        if re.search(r"^saltdiff (bench|study)\b", block, re.M):
            assert '".[eval]"' in block, block
        if re.search(r"^saltdiff demo\b", block, re.M):
            assert '".[demo]"' in block, block


def test_bench_defaults_are_the_readme_tables_settings():
    from saltdiff.cli import build_parser

    (argv,) = [c for c in saltdiff_commands() if c[0] == "bench"]
    readme = vars(build_parser().parse_args(argv))
    defaults = vars(build_parser().parse_args(["bench", "--out", readme["out"]]))
    from saltdiff.eval.suites import DEFAULT_N

    assert defaults["n"] is None and readme["n"] == DEFAULT_N  # None: the suite's 200 layouts
    # `saltdiff bench --methods M --out DIR` makes the README's table: the test split, its settings;
    # the table shows the three methods the targets are stated against
    assert readme["methods"] == "sd,random+salt-loss,salt" and readme["suite"] == "shapes"
    assert {**readme, "n": None, "methods": defaults["methods"]} == defaults


# About 11 s on 2 cores (a fresh interpreter, 50 steps): slow tier. The fast tier parses the command
# (test_every_saltdiff_command_of_the_readme_parses) and checks fresh CLI processes print nothing
# third-party (test_loading's offline and cached-hub-id runs).
@pytest.mark.slow
def test_the_first_command_runs_verbatim_and_prints_only_saltdiffs_lines(tmp_path):
    """The README's first block, after its install: the built-in model, offline, on the CPU, in a
    fresh process (so import-time notes of third-party libraries would show)."""
    import os
    import subprocess
    import sys

    (argv,) = [c for c in commands(shell_blocks()[0]) if c[0] == "saltdiff"]
    env = {**os.environ, "SALTDIFF_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "saltdiff", *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("example.png", "example-overlay.png", "example-reference.png"):
        assert (tmp_path / name).is_file(), name
    lines = [line for line in re.split(r"[\r\n]+", proc.stderr) if line.strip()]
    assert lines[-1].startswith("saltdiff: wrote example.png, example-overlay.png, example-reference.png")
    # saltdiff's result line and its own sampling progress bars, nothing else (no third-party notes)
    assert all(line.startswith("saltdiff: ") or re.search(r"\d+/\d+ \[", line) for line in lines), lines


def test_generate_help_runs():
    from saltdiff.cli import main

    assert [c for c in saltdiff_commands() if c[:2] == ["generate", "--help"]]
    assert main(["generate", "--help"]) == 0


# -- the docs stand on their own -------------------------------------------------------------------
ROOT = README.parent


def test_the_docs_link_only_to_files_inside_the_repository():
    docs = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").glob("*.md"))]
    for doc in docs:
        text = doc.read_text(encoding="utf-8")
        targets = re.findall(r"\]\(([^)#\s]+)", text)  # markdown links and images
        targets += re.findall(r"`((?:\.\./|/)[\w./-]+\.md)`", text)  # a path to another document
        for target in targets:
            if re.match(r"[a-z]+://", target):
                continue
            path = (doc.parent / target).resolve()
            assert path.is_relative_to(ROOT), (doc.name, target)  # nothing outside the repository
            assert path.exists(), (doc.name, target)


def test_code_comments_cite_no_tracker_issue_numbers():
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "scripts").glob("*.py")):
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"\bissue #?\d+", text, re.I), (
            path
        )  # the reader has no tracker: say what it found


def test_the_code_references_in_docstrings_resolve():
    import importlib

    found = 0
    for path in sorted((ROOT / "src").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for name in re.findall(r":(?:func|class|meth|data|mod|attr):`~?(saltdiff\.[\w.]+)`", text):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                try:
                    obj, rest = importlib.import_module(".".join(parts[:i])), parts[i:]
                    break
                except ImportError:
                    continue
            for attr in rest:
                assert hasattr(obj, attr), (path.name, name)
                obj = getattr(obj, attr)
            found += 1
    assert found > 20


def test_the_architecture_flow_has_the_calls_stages_in_the_codes_order():
    flow = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    flow = flow[flow.index("SaltPipeline.__call__\n") :]  # the numbered stages of the flow
    code = (ROOT / "src" / "saltdiff" / "salt_mixin.py").read_text(encoding="utf-8")
    code = code[code.index("def __call__") :]
    stages = [("scheduler.set_timesteps", "self.scheduler.set_timesteps(")]
    stages += [("initial latents: init(", "self._init_latents("), ("denoising.denoise", "self._denoise(")]
    stages += [("decode (", "self._decode(")]
    in_docs = [flow.index(doc) for doc, _ in stages]
    in_code = [code.index(call) for _, call in stages]
    assert in_docs == sorted(in_docs) and in_code == sorted(in_code)
