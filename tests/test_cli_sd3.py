"""``saltdiff generate`` on a tiny random SD3 folder saved with ``save_pretrained``: load, sample, recipe."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from saltdiff.cli import main
from saltdiff.guidance import OUTSIDE_PROMPT_STEPS
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
    "64",
    "--width",
    "64",
    "-q",
]
SALT = ["--init", "salt", "--guidance", "salt", "--inversion-steps", "2", "--object-steps", "2"]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    from saltdiff.testing_flow import tiny_sd3_pipeline

    path = tmp_path_factory.mktemp("tiny-sd3")
    tiny_sd3_pipeline().save_pretrained(path)
    return str(path)


def test_load_pipeline_reads_sd3_from_model_index(sd3_dir):
    from saltdiff.loading import load_pipeline
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline

    pipe = load_pipeline(sd3_dir, device="cpu")
    assert type(pipe) is SaltSD3Pipeline and pipe.model_name == sd3_dir
    assert pipe.transformer.dtype.is_floating_point and pipe.text_encoder_3 is not None


def test_generate_salt_on_sd3_writes_image_and_recipe_and_follows_the_seed(sd3_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SALTDIFF_CACHE", str(tmp_path / "cache"))
    paths = [tmp_path / "s1.png", tmp_path / "s2.png"]
    for seed, path in zip((1, 2), paths):
        assert main([*BASE, *SALT, "--model", sd3_dir, "--seed", str(seed), "--out", str(path)]) == 0
    images = [np.asarray(Image.open(p), dtype=np.float32) for p in paths]
    assert images[0].shape == (64, 64, 3)
    assert np.abs(images[0] - images[1]).max() > 10  # seeds 1 and 2 differ
    recipe = read_recipe(str(paths[0]))
    assert recipe["scheduler"] == "flow-euler"  # the model's own sampler, not the UNet default ddim
    assert recipe["init"] == "salt" and recipe["init_params"]["inversion_steps"] == 2
    assert recipe["guidance"]["outside_prompt_steps"] == OUTSIDE_PROMPT_STEPS  # SD3 with CFG: the UNet's
    request = GenerationRequest.from_recipe(recipe)
    assert request.scheduler == "flow-euler" and request.guidance.outside_prompt_steps == OUTSIDE_PROMPT_STEPS


def test_the_default_sampler_is_read_from_model_index_before_loading(sd3_dir, tiny_pipe_dir, tmp_path):
    from saltdiff.checkpoints import DEFAULT_SAMPLERS
    from saltdiff.cli import default_sampler_of
    from saltdiff.registry import SCHEDULERS

    assert default_sampler_of(sd3_dir) == "flow-euler" and default_sampler_of(tiny_pipe_dir) == "ddim"
    assert default_sampler_of(str(tmp_path / "missing")) == "ddim"  # load_pipeline reports it
    assert set(DEFAULT_SAMPLERS.values()) <= set(SCHEDULERS.names())


def test_generate_random_init_is_deterministic_per_seed(sd3_dir, tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        args = [*BASE, "--init", "random", "--guidance", "none", "--model", sd3_dir, "--seed", "3"]
        assert main([*args, "--out", str(path)]) == 0
    assert Image.open(paths[0]).tobytes() == Image.open(paths[1]).tobytes()


def test_a_vp_sampler_on_sd3_is_one_line(sd3_dir, tmp_path, capsys):
    args = [
        *BASE,
        "--init",
        "random",
        "--model",
        sd3_dir,
        "--scheduler",
        "ddim",
        "--out",
        str(tmp_path / "x.png"),
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "scheduler 'ddim' is a VP" in err and "choose one of ['flow-euler']" in err
