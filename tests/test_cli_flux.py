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


def test_the_same_layout_with_another_seed_reuses_its_flow_inversion(flux_dir, tmp_path):
    """z_T* is kept on the pipeline (a folder-loaded model has an identity): seed 2 after seed 1
    runs only the sampling steps, and the kept z_T* is the one a fresh inversion gives."""
    import dataclasses

    import torch

    from saltdiff import GeneratedObjects, SpatialAwareInit
    from saltdiff.loading import load_pipeline

    pipe = load_pipeline(flux_dir, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    fast = dict(num_inference_steps=3, height=32, width=32, output_type="latent", guidance="none")
    reference = GeneratedObjects(num_inference_steps=2, cache_dir=str(tmp_path))
    init = SpatialAwareInit(reference=reference, inversion_steps=2)

    def run(init, seed):
        calls.clear()
        out = pipe("a cat on the grass", [("a cat", (0.0, 0.25, 0.5, 0.75))], init=init, seed=seed, **fast)
        return out, len(calls)

    try:
        first, n_first = run(init, 1)  # objects, inversion (2), sampling (3)
        second, n_second = run(init, 2)  # objects from the cache, z_T* from the memo
        pipe.inversion_memo.clear()
        fresh, _ = run(init, 2)
        other_depth = run(dataclasses.replace(init, inversion_steps=1), 2)[1]
    finally:
        hook.remove()
    assert n_second == 3 and n_first > n_second + 2 and other_depth == 3 + 1
    assert torch.equal(second.images, fresh.images)


def test_preflight_reads_fluxs_phrases_in_t5_not_clip(flux_dir, tmp_path):
    """A phrase past CLIP's 77 tokens is fine on FLUX (its text is T5's, 512 tokens): the check before
    loading reads the T5 tokenizer; a phrase the prompt lacks is still one line."""
    from saltdiff.layout import Layout, LayoutError
    from saltdiff.preflight import check_before_loading
    from saltdiff.request import GenerationRequest

    prompt = "a red cat " * 30 + "and a dog"
    request = GenerationRequest(
        prompt=prompt, layout=Layout.from_pairs([("dog", (0, 0, 1, 1))]), init="random"
    )
    assert check_before_loading(flux_dir, request) is True
    missing = GenerationRequest(
        prompt="a cat", layout=Layout.from_pairs([("dog", (0, 0, 1, 1))]), init="random"
    )
    with pytest.raises(LayoutError, match="dog"):
        check_before_loading(flux_dir, missing)


def test_true_cfg_on_flux_from_the_command_line_and_refused_elsewhere(
    flux_dir, tiny_pipe_dir, tmp_path, capsys
):
    out = tmp_path / "true-cfg.png"
    args = [*BASE, "--model", flux_dir, "--init", "random", "--guidance", "none", "--out", str(out)]
    assert main([*args, "--negative-prompt", "a blurry picture", "--true-cfg-scale", "3"]) == 0
    recipe = read_recipe(str(out))
    assert recipe["true_cfg_scale"] == 3.0 and recipe["negative_prompt"] == "a blurry picture"
    assert GenerationRequest.from_recipe(recipe).true_cfg_scale == 3.0
    plain = tmp_path / "plain.png"
    assert main([*args[:-1], str(plain)]) == 0
    assert read_recipe(str(plain))["true_cfg_scale"] == 1.0
    assert (
        np.abs(
            np.asarray(Image.open(out), dtype=np.float32) - np.asarray(Image.open(plain), dtype=np.float32)
        ).max()
        > 1
    )  # the negative branch changes the image
    capsys.readouterr()
    sd = [
        *BASE,
        "--model",
        tiny_pipe_dir,
        "--init",
        "random",
        "--guidance",
        "none",
        "--out",
        str(tmp_path / "sd.png"),
    ]
    assert main([*sd, "--true-cfg-scale", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "true_cfg_scale=2.0 is FLUX's true CFG" in err[0]
    with pytest.raises(ValueError, match="true_cfg_scale must be a finite number >= 1"):
        GenerationRequest(prompt="a cat", true_cfg_scale=0.5)
