"""Scripts and tools that take ``--model`` on a tiny SD3 folder as on the UNet: the seed grid, the quality bar."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from PIL import Image

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["sd3", "sd"])
def test_seed_grid_draws_sd_and_salt_rows_for_either_family(
    family, tiny_sd3_dir, tiny_pipe_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("SALTDIFF_CACHE", str(tmp_path / "cache"))
    model, side = (tiny_sd3_dir, 64) if family == "sd3" else (tiny_pipe_dir, 32)
    out = tmp_path / "seeds.png"
    seed_grid = load_script("seed_grid")
    args = ["--model", model, "--out", str(out), "--layouts", "1", "--seeds", "2", "--steps", "2"]
    seed_grid.main([*args, "--object-steps", "1"])
    grid = Image.open(out)
    scaled = side * seed_grid.SCALE
    assert grid.size == (60 + 2 * scaled, 2 * scaled + 18)  # a prompt line, (sd, salt) rows, 2 seeds


@pytest.mark.parametrize("folder", ["tiny_sd3_dir", "mmdit_like_dir"])
def test_builtin_quality_measures_an_sd3_folder_with_diffusers_own_pipeline(
    folder, request, tmp_path, monkeypatch
):
    """The quality bar's CLI on an SD3 folder: VAE PSNR, caption accuracy with ``StableDiffusion3Pipeline``
    and the joint attention's argmax per phrase (a stub detector that finds every phrase everywhere:
    random weights draw no shapes, and every argmax cell then lies on its object); with T5 and without
    (the built-in MMDiT's structure)."""
    import json

    import saltdiff.worlds.detector as detector
    from saltdiff.eval.builtin_quality import heldout_prompts, main

    def everywhere(image, **_):
        return [detector.Detection(p, *p.split(), (0.0, 0.0, 1.0, 1.0), 1.0) for p in phrases]

    model = request.getfixturevalue(folder)
    phrases = sorted({p for _, mentioned in heldout_prompts(2) for p in mentioned})
    monkeypatch.setattr(detector, "detect", everywhere)
    out = tmp_path / "quality.json"
    argv = ["--model", model, "--n", "2", "--steps", "2", "--vae-n", "4", "--attention-n", "2"]
    results = main([*argv, "--output", str(out)])
    assert results["caption_accuracy"]["all_found"] == 1.0 and results["caption_accuracy"]["n"] == 2
    mentioned = sum(len(m) for _, m in heldout_prompts(2))
    attention = results["attention_localization"]
    assert attention["detected_objects"] == attention["argmax_on_object"] == mentioned
    assert results["vae"]["n"] == 4 and json.loads(out.read_text())["model"] == model


def test_sampler_parity_on_sd3_compares_with_stable_diffusion3_pipeline(tiny_sd3_dir, capsys):
    """Only the model's own noise family's samplers, and saltdiff's image is diffusers' own bit for bit."""
    load_script("sampler_parity").main(["--model", tiny_sd3_dir, "--n", "1", "--steps", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flow-euler")
    assert lines[0].count("= 0.00e+00") == 2
