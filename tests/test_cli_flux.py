"""``saltdiff generate`` on a tiny random FLUX folder saved with ``save_pretrained``: the issue's acceptance."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from saltdiff.cli import main
from saltdiff.request import GenerationRequest, read_recipe

BASE = [
    "generate",
    "--prompt",
    "a cat and a dog on the grass",
    "--box",
    "a cat=0.05,0.3,0.45,0.7",
    "--box",
    "a dog=0.55,0.3,0.95,0.7",
    "--steps",
    "4",
    "--height",
    "128",
    "--width",
    "128",
    "-q",
]
SALT = ["--init", "salt", "--guidance", "salt", "--inversion-steps", "2", "--object-steps", "2"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """FLUX.1-dev-structured: a guidance-distilled (guidance_embeds) transformer, CLIP BPE + T5 SentencePiece."""
    from saltdiff.testing_flow import tiny_flux_pipeline

    path = tmp_path_factory.mktemp("tiny-flux")
    tiny_flux_pipeline(guidance_embeds=True).save_pretrained(path)
    return str(path)


def test_load_pipeline_reads_flux_from_model_index(flux_dir):
    from saltdiff.loading import load_pipeline
    from saltdiff.pipeline_flux import SaltFluxPipeline

    pipe = load_pipeline(flux_dir, device="cpu")
    assert type(pipe) is SaltFluxPipeline and pipe.model_name == flux_dir
    assert pipe.transformer.config.guidance_embeds and type(pipe.tokenizer_2).__name__.startswith("T5")
    assert pipe.default_size() == 256  # 128 latents x the tiny VAE's factor 2: no sample_size on FLUX


def test_generate_salt_on_flux_writes_image_and_recipe_and_follows_the_seed(flux_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SALTDIFF_CACHE", str(tmp_path / "cache"))
    paths = [tmp_path / "s1.png", tmp_path / "s2.png"]
    for seed, path in zip((1, 2), paths):
        assert main([*BASE, *SALT, "--model", flux_dir, "--seed", str(seed), "--out", str(path)]) == 0
    images = [np.asarray(Image.open(p), dtype=np.float32) for p in paths]
    assert images[0].shape == (128, 128, 3)
    assert np.abs(images[0] - images[1]).max() > 10  # seeds 1 and 2 differ
    recipe = read_recipe(str(paths[0]))
    assert recipe["scheduler"] == "flow-euler"  # the model's own sampler, not the UNet default ddim
    assert recipe["init"] == "salt" and recipe["init_params"]["inversion_steps"] == 2
    assert recipe["guidance"]["outside_prompt_steps"] == 0  # nothing replaces the outside prompt on FLUX
    request = GenerationRequest.from_recipe(recipe)
    assert request.scheduler == "flow-euler" and request.guidance.outside_prompt_steps == 0


def test_the_default_sampler_is_read_from_model_index(flux_dir):
    from saltdiff.cli import default_sampler_of

    assert default_sampler_of(flux_dir) == "flow-euler"


def test_a_vp_sampler_on_flux_is_one_line(flux_dir, tmp_path, capsys):
    args = [
        *BASE,
        "--init",
        "random",
        "--model",
        flux_dir,
        "--scheduler",
        "ddim",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "scheduler 'ddim' is a VP" in err and "choose one of ['flow-euler']" in err
