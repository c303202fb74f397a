"""The catalogue of built-in models: one entry per shipped folder, offered once its folder ships, and
everything that lists or recognizes built-in models (``--model builtin:NAME``, the demo's list, the
bench's detector) reads it."""

from __future__ import annotations

import os

import pytest

import saltdiff.checkpoints as checkpoints
from saltdiff.checkpoints import (
    BUILTIN_CATALOGUE,
    BuiltinModel,
    ModelLoadError,
    builtin_entry,
    builtin_models,
)
from saltdiff.eval.detectors import resolve_detector_name


def test_every_shipped_folder_has_a_catalogue_entry():
    root = checkpoints.builtin_root()
    shipped = {n for n in os.listdir(root) if os.path.isfile(os.path.join(root, n, "model_index.json"))}
    assert "shapes" in shipped
    assert shipped <= {entry.name for entry in BUILTIN_CATALOGUE}
    assert set(builtin_models()) == shipped


@pytest.fixture
def models_root(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "builtin_root", lambda: str(tmp_path))

    def ship(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{}")

    return ship


def test_an_entry_is_offered_once_its_folder_ships(models_root, tmp_path):
    models_root("shapes")
    (tmp_path / "not-catalogued").mkdir()
    (tmp_path / "not-catalogued" / "model_index.json").write_text("{}")
    assert list(builtin_models()) == ["shapes"]
    with pytest.raises(
        ModelLoadError, match=r"'builtin:shapes-mmdit' is not shipped in this install"
    ) as info:
        checkpoints.resolve_model("builtin:shapes-mmdit")
    assert "available: ['builtin:shapes']" in str(info.value)
    with pytest.raises(ModelLoadError, match="unknown built-in model 'builtin:not-catalogued'"):
        checkpoints.resolve_model("builtin:not-catalogued")
    models_root("shapes-mmdit")
    assert list(builtin_models()) == ["shapes", "shapes-mmdit"]
    assert checkpoints.resolve_model("builtin:shapes-mmdit") == str(tmp_path / "shapes-mmdit")


def test_adding_a_built_in_model_is_one_catalogue_entry(models_root, monkeypatch):
    from saltdiff.demo import models as demo_models

    extra = BuiltinModel("shapes-tiny", "a third model of the shapes world")
    monkeypatch.setattr(checkpoints, "BUILTIN_CATALOGUE", (*BUILTIN_CATALOGUE, extra))
    for name in ("shapes", "shapes-tiny"):
        models_root(name)
    assert builtin_entry("builtin:shapes-tiny") is extra
    assert resolve_detector_name("auto", suite="my.jsonl", model="builtin:shapes-tiny") == "shapes"
    monkeypatch.setattr(
        demo_models,
        "load_pipeline",
        lambda name, **_: type("P", (), {"set_progress_bar_config": lambda self, **k: None})(),
    )
    pool = demo_models.ModelPool("/some/folder")
    assert pool.choices == ["/some/folder", "builtin:shapes", "builtin:shapes-tiny"]


def test_the_detector_follows_the_catalogues_world_not_the_name():
    assert resolve_detector_name("auto", suite="my.jsonl", model="builtin:shapes-mmdit") == "shapes"
    assert resolve_detector_name("auto", suite="my.jsonl", model=builtin_models()["shapes"]) == "shapes"
    assert resolve_detector_name("auto", suite="my.jsonl", model="builtin:shapes-other") == "owlv2"
    assert builtin_entry("org/shapes") is None and builtin_entry("builtin:nope") is None
