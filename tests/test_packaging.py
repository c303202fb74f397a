"""Packaging: adding an extra must not downgrade what the base install chose."""

from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def _base() -> dict[str, Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    return {Requirement(r).name.lower(): Requirement(r) for r in project["dependencies"]}


def _upper(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator in ("<", "<=")]
    return min(bounds) if bounds else None


@pytest.mark.parametrize("package", ["gradio", "gradio-image-annotation", "pycocotools", "matplotlib"])
def test_an_extras_upper_bounds_are_already_in_the_base_pins(package):
    """pip would otherwise install the newest version for the base, then downgrade it for the extra
    (pillow 13 -> 12.3 when gradio 6 came in with ``.[demo]``)."""
    try:
        requires = metadata.requires(package) or []
    except metadata.PackageNotFoundError:
        pytest.skip(f"{package} is not installed")
    base = _base()
    for text in requires:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        ceiling = _upper(req)
        if req.name.lower() not in base or ceiling is None:
            continue
        ours = _upper(base[req.name.lower()])
        assert ours is not None and ours <= ceiling, (
            f"{package} requires {req}; pin the base dependency {base[req.name.lower()]} below it"
        )
