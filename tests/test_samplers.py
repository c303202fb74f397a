"""Samplers: SALT's VP latent put into each sampler's noise space; v-prediction inversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler

from saltdiff.components import sd_ddim_scheduler
from saltdiff.inversion import ddim_invert, inversion_timesteps
from saltdiff.registry import SCHEDULERS
from saltdiff.samplers import (
    check_supported,
    make_scheduler,
    sampler_start_timestep,
    scheduler_name,
    to_sampler_space,
)
from saltdiff.testing import GaussianDenoiser

EMBEDS = torch.zeros(1, 7, 32)


def _data(seed=0):
    torch.manual_seed(seed)
    return 0.5 * torch.randn(1, 4, 16, 16)


def _sample(model, sampler, x, steps, generator=None, **step_kwargs):
    sampler.set_timesteps(steps)
    for t in sampler.timesteps:
        eps = model(sampler.scale_model_input(x, t), t).sample
        kwargs = dict(step_kwargs)
        if generator is not None:
            kwargs["generator"] = generator
        x = sampler.step(eps, t, x, **kwargs).prev_sample
    return x


def _round_trip(name, steps, *, convert=True, prediction_type="epsilon", **step_kwargs):
    """Relative error of x0 -> DDIM inversion (``steps`` steps, to the sampler's first timestep) ->
    the sampler's space -> ``steps`` sampler steps, with the exact Gaussian denoiser."""
    base = DDIMScheduler.from_config(sd_ddim_scheduler().config, prediction_type=prediction_type)
    sampler = make_scheduler(name, base.config)
    model = GaussianDenoiser(base.alphas_cumprod, 0.5, prediction_type)
    x0 = _data()
    end = sampler_start_timestep(sampler, steps)
    z = ddim_invert(model, sampler, x0, EMBEDS, num_inference_steps=steps, end_timestep=end)
    x = to_sampler_space(sampler, z, steps) if convert else z
    generator = torch.Generator().manual_seed(0) if name in ("euler-a",) or step_kwargs else None
    out = _sample(model, sampler, x, steps, generator, **step_kwargs)
    return ((out - x0).norm() / x0.norm()).item()


@pytest.mark.parametrize("steps", [25, 50])
@pytest.mark.parametrize("name", [n for n in SCHEDULERS.names() if n not in ("ddim", "euler-a")])
def test_every_sampler_round_trips_salt_latents_like_ddim(name, steps):
    """Measured at 25 / 50 steps: DDIM 0.076 / 0.037, Euler 0.084 / 0.042, DPM++ 2M 0.053 / 0.022,
    Heun 0.020 / 0.011, LMS 0.016 / 0.011, PNDM 0.002 / 0.007, UniPC 0.053 / 0.023."""
    ddim = _round_trip("ddim", steps)
    assert _round_trip(name, steps) <= 1.5 * ddim


@pytest.mark.parametrize("name", ["euler", "heun", "lms"])
def test_k_diffusion_samplers_need_the_conversion(name):
    """Without it the VP latent is 14.6x too small for Euler-type samplers (measured error 0.93)."""
    assert _round_trip(name, 25, convert=False) > 10 * _round_trip(name, 25)


def test_ancestral_sampler_matches_ddim_with_eta_one():
    """Euler a adds fresh noise every step, so no round trip returns x0; it must do as well as the
    ancestral DDIM (eta = 1) from the same start (both measured 1.26 relative error)."""
    ancestral_ddim = _round_trip("ddim", 25, eta=1.0)
    assert _round_trip("euler-a", 25) <= 1.5 * ancestral_ddim


def test_v_prediction_inversion_is_as_accurate_as_epsilon():
    """The v-model and the eps-model are the same exact denoiser, so their round trips must agree;
    ``DDIMInverseScheduler``'s own v -> eps conversion (at the source timestep) gave 0.51 against 0.38
    at 5 steps."""
    for steps in (5, 25):
        eps = _round_trip("ddim", steps)
        v = _round_trip("ddim", steps, prediction_type="v_prediction")
        assert v == pytest.approx(eps, rel=1e-3)
    base = DDIMScheduler.from_config(sd_ddim_scheduler().config, prediction_type="v_prediction")
    model = GaussianDenoiser(base.alphas_cumprod, 0.5, "v_prediction")
    base.set_timesteps(5)
    shipped = DDIMInverseScheduler.from_config(base.config, clip_sample=False, timestep_spacing="trailing")
    shipped.set_timesteps(5)
    shipped.timesteps = inversion_timesteps(base, 5, int(base.timesteps[0]))
    x0 = z = _data()
    for t in shipped.timesteps:
        z = shipped.step(model(z, t).sample, t, z).prev_sample
    out = _sample(model, base, z, 5)
    assert ((out - x0).norm() / x0.norm()).item() > 1.2 * _round_trip("ddim", 5)


def test_registry_names_round_trip_and_pipeline_schedulers():
    config = sd_ddim_scheduler().config
    for name in SCHEDULERS.names():
        assert scheduler_name(make_scheduler(name, config)) == name
    assert make_scheduler("dpm++2m-karras", config).config.use_karras_sigmas
    with pytest.raises(ValueError, match="unknown scheduler 'dpm3'"):
        make_scheduler("dpm3", config)


def test_unsupported_scheduler_is_one_clear_line():
    with pytest.raises(ValueError, match=r"FlowMatchEulerDiscreteScheduler is not supported.*choose one of"):
        check_supported(FlowMatchEulerDiscreteScheduler())


@pytest.fixture
def euler_pipe(tiny_pipe):
    """The tiny pipeline with Euler (a shallow copy: the shared fixture keeps its DDIM)."""
    from saltdiff.pipeline import SaltPipeline

    pipe = SaltPipeline.from_pipe(tiny_pipe)
    pipe.scheduler = make_scheduler("euler", tiny_pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPT = "a red circle and a blue square"
LAYOUT = [("red circle", (0.0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1.0, 0.75))]


def test_pipeline_starts_euler_from_z_t_star_in_its_noise_space(tiny_pipe, euler_pipe):
    """The same SALT start under DDIM and under Euler, the latter times sqrt(1 + sigma_max^2)."""
    from saltdiff import SpatialAwareInit
    from saltdiff.reference import GeneratedObjects

    init = SpatialAwareInit(
        reference=GeneratedObjects(background="gray", num_inference_steps=2, cache=False),
        inversion_steps=3,
        noise_outside=0.0,
    )
    kwargs = dict(init=init, guidance="none", num_inference_steps=4, height=32, width=32, seed=0)
    euler = euler_pipe(PROMPT, LAYOUT, **kwargs)
    # the same inversion end: Euler's first timestep (999), under DDIM's own sampler
    z_star = init.invert(euler_pipe, euler.reference_image, PROMPT, None, num_inference_steps=4)
    sigma = euler_pipe.scheduler.sigmas.max().item()
    torch.testing.assert_close(euler.init_latent, z_star * (1 + sigma**2) ** 0.5, rtol=1e-4, atol=1e-4)
    ddim = tiny_pipe(PROMPT, LAYOUT, **kwargs)  # DDIM samples in VP space: z_T* unchanged
    z_ddim = init.invert(tiny_pipe, ddim.reference_image, PROMPT, None, num_inference_steps=4)
    torch.testing.assert_close(ddim.init_latent, z_ddim)


def test_tensor_init_and_random_init_follow_init_noise_sigma(euler_pipe):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = euler_pipe(PROMPT, LAYOUT, init=z, guidance="none", num_inference_steps=4, height=32, width=32)
    sigma = euler_pipe.scheduler.init_noise_sigma
    torch.testing.assert_close(out.init_latent, z * sigma)


def test_guidance_runs_under_every_sampler(tiny_pipe):
    from saltdiff import GuidanceConfig
    from saltdiff.pipeline import SaltPipeline

    cfg = GuidanceConfig(loss="layout-guidance", guidance_steps=2, guidance_iters=2, loss_threshold=0.0)
    for name in SCHEDULERS.names():
        pipe = SaltPipeline.from_pipe(tiny_pipe)
        pipe.scheduler = make_scheduler(name, tiny_pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(
            PROMPT, LAYOUT, init="random", guidance=cfg, seed=0, num_inference_steps=3, height=32, width=32
        )
        assert len(out.guidance_losses) == 2, name
        assert np.isfinite(np.asarray(out.images[0], dtype=float)).all()


def test_cli_scheduler_flag_is_used_and_recorded(tiny_pipe_dir, tmp_path):
    from saltdiff.cli import main
    from saltdiff.request import GenerationRequest, read_recipe

    out = tmp_path / "euler.png"
    base = [
        "generate", "--prompt", PROMPT, "--box", "red circle=0,0.25,0.5,0.75", "--steps", "3",
        "--height", "32", "--width", "32", "--quiet", "--object-steps", "2", "--inversion-steps", "2",
        "--background", "gray", "--object-cache", "false", "--model", tiny_pipe_dir,
    ]  # fmt: skip
    assert main([*base, "--scheduler", "euler-a", "--out", str(out)]) == 0
    recipe = read_recipe(str(out))
    assert recipe["scheduler"] == "euler-a"
    assert GenerationRequest.from_recipe(recipe).scheduler == "euler-a"
    del recipe["scheduler"]  # a recipe written before samplers were recorded
    assert GenerationRequest.from_recipe(recipe).scheduler == "ddim"
    assert main([*base, "--scheduler", "dpm3", "--out", str(out)]) == 2


def test_request_runs_with_its_sampler_and_restores_the_pipes(tiny_pipe):
    from saltdiff.request import GenerationRequest

    original = tiny_pipe.scheduler
    request = GenerationRequest(
        PROMPT, init="random", scheduler="dpm++2m-karras", num_inference_steps=2, height=32, width=32
    )
    with request.using_scheduler(tiny_pipe) as pipe:
        assert scheduler_name(pipe.scheduler) == "dpm++2m-karras"
        assert pipe.scheduler.config.beta_schedule == original.config.beta_schedule
    assert tiny_pipe.scheduler is original
    seen = []
    request.run(tiny_pipe, output_type="np",
                callback_on_step_end=lambda p, i, t, kw: seen.append(scheduler_name(p.scheduler)) or kw)  # fmt: skip
    assert seen == ["dpm++2m-karras"] * 2 and tiny_pipe.scheduler is original
    with pytest.raises(ValueError, match="unknown scheduler 'dpm3'"):
        GenerationRequest(PROMPT, scheduler="dpm3")
