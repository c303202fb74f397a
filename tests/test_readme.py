"""The README runs as written: its Python API block, its first command, and every saltdiff command parses."""

import re
from pathlib import Path


def test_readme_python_api_block_runs_verbatim(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SALTDIFF_CACHE", str(tmp_path / "cache"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].images[0].size == (64, 64)
    assert scope["GenerationRequest"].from_png("result.png").seed == 1


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
    assert {**readme, "n": None} == defaults  # `saltdiff bench --out DIR` makes the README's table


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
