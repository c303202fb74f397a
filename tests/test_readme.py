"""The README's Python API block runs verbatim on the built-in model (a user's first copy-paste)."""

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
