"""DDIM inversion: timestep grid, mirror of the sampler, round trip, noise, validation."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from saltdiff.inversion import ddim_invert, inversion_timesteps
from saltdiff.testing import GaussianDenoiser, tiny_sd_components


@pytest.fixture(scope="module")
def components():
    return tiny_sd_components()


def _inputs(batch=1, seed=0):
    torch.manual_seed(seed)
    return torch.randn(batch, 4, 16, 16), torch.randn(batch, 7, 32)


def _sampler(scheduler, steps, **overrides):
    sampler = DDIMScheduler.from_config(scheduler.config, **overrides)
    sampler.set_timesteps(steps)
    return sampler


def _sample(unet, sampler, latents, embeds):
    with torch.no_grad():
        for t in sampler.timesteps:
            latents = sampler.step(
                unet(latents, t, encoder_hidden_states=embeds).sample, t, latents
            ).prev_sample
    return latents


@pytest.mark.parametrize(
    ("spacing", "end_from_sampler"), [("leading", True), ("trailing", False), ("trailing", True)]
)
def test_grid_mirrors_the_sampler(components, spacing, end_from_sampler):
    sampler = _sampler(components["scheduler"], 50, timestep_spacing=spacing)
    end = sampler.timesteps[0] if end_from_sampler else None
    grid = inversion_timesteps(components["scheduler"], 50, end)
    torch.testing.assert_close(grid, sampler.timesteps.flip(0).long())


def test_grid_edge_cases(components):
    scheduler = components["scheduler"]
    for steps, end in [(s, e) for s in (1, 3, 7, 30, 50, 100) for e in (None, 981, 999)] + [(1000, None)]:
        grid = inversion_timesteps(scheduler, steps, end)
        ratio = 1000 // steps
        assert len(grid) == steps and grid[-1] == (999 if end is None else end)
        assert grid[0] >= 0 and grid[0] - ratio < 0  # the first step starts from the clean latent
        assert ((grid.diff() - ratio).abs() <= 1).all()  # DDIMInverseScheduler reads sources <= 1 off
    assert inversion_timesteps(scheduler, 2, 500).tolist() == [0, 500]


def test_each_step_is_undone_by_the_sampler(components):
    """Off-by-one check on the real tiny UNet: sampling step k, given the noise prediction the
    inversion used for it, returns exactly the inversion's previous latent (the clean one for k=1)."""
    unet, scheduler = components["unet"], components["scheduler"]
    latents, embeds = _inputs()
    sampler = _sampler(scheduler, 10)
    inverted, trajectory = ddim_invert(
        unet,
        scheduler,
        latents,
        embeds,
        num_inference_steps=10,
        end_timestep=sampler.timesteps[0],
        return_trajectory=True,
    )
    assert len(trajectory) == 11 and trajectory[0] is latents and trajectory[-1] is inverted
    for k, t in enumerate(sampler.timesteps.flip(0), start=1):
        with torch.no_grad():
            eps = unet(trajectory[k - 1], t, encoder_hidden_states=embeds).sample
        back = sampler.step(eps, t, trajectory[k]).prev_sample
        torch.testing.assert_close(back, trajectory[k - 1], rtol=1e-4, atol=1e-4)


def test_round_trip_with_exact_denoiser(components):
    scheduler = components["scheduler"]
    model = GaussianDenoiser(scheduler.alphas_cumprod, sigma=0.5)
    latents = 0.5 * _inputs()[0]
    embeds = torch.zeros(1, 7, 32)
    errors = {}
    for steps in (5, 50):
        sampler = _sampler(scheduler, steps)
        inverted = ddim_invert(
            model, scheduler, latents, embeds, num_inference_steps=steps, end_timestep=sampler.timesteps[0]
        )
        recon = _sample(model, sampler, inverted, embeds)
        errors[steps] = ((recon - latents).norm() / latents.norm()).item()
        if steps == 50:
            # the exact flow maps N(0, 0.25 I) data onto N(0, I) noise; measured std 1.03
            assert 0.9 < inverted.std().item() < 1.15
    # measured relative errors: 5 steps 0.38, 10 steps 0.20, 25 steps 0.076, 50 steps 0.037 (O(1/K),
    # DDIM's first-order discretization error); a grid shifted by one step would not converge
    assert errors[50] < 0.06
    assert errors[5] > 5 * errors[50]


def _gaussian_inversion_factor(alphas_cumprod, clean_alpha, steps, end, sigma):
    """DDIM inversion by hand for :class:`GaussianDenoiser`: the factor ``c`` with ``x_end = c * x_0``.

    The grid ``end - r (K - k)``, ``r = 1000 // K``, starts from the clean latent at noise level
    ``clean_alpha``; step k evaluates the model at its *target* timestep ``tau_k`` on the latent at
    ``tau_{k-1}`` (eps = e * x with e = sqrt(1 - a) / (a sigma^2 + 1 - a)) and applies DDIM's
    ``x_t = sqrt(a_t) (x_s - sqrt(1 - a_s) eps) / sqrt(a_s) + sqrt(1 - a_t) eps``.
    """
    alphas = alphas_cumprod.double()
    ratio = 1000 // steps
    factor, a_prev = 1.0, torch.tensor(clean_alpha, dtype=torch.float64)
    for k in range(1, steps + 1):
        a = alphas[end - ratio * (steps - k)]
        e = (1 - a).sqrt() / (a * sigma**2 + 1 - a)
        factor = factor * (a.sqrt() * (1 - (1 - a_prev).sqrt() * e) / a_prev.sqrt() + (1 - a).sqrt() * e)
        a_prev = a
    return float(factor)


@pytest.mark.parametrize(
    ("steps", "end", "alpha_to_one"),
    [
        (1, 37, False),
        (1, 500, False),
        (2, 777, False),
        (4, 901, False),
        (4, 901, True),
        (10, None, False),
        (50, 981, False),
    ],
)
def test_inversion_ends_exactly_at_end_timestep(components, steps, end, alpha_to_one):
    """With the exact Gaussian denoiser every DDIM step is a scalar multiplication, so the whole
    inversion is ``x_end = c * x_0`` with ``c`` computed by hand from ``alphas_cumprod``. The latent
    must carry the noise level of ``end_timestep`` (default 999) itself, and start from the sampler's
    clean level (``alphas_cumprod[0]``, or 1 with ``set_alpha_to_one``): ending or starting one
    timestep off changes ``c`` by 1e-4 to 2e-3, 20 to 400 times the tolerance."""
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, set_alpha_to_one=alpha_to_one)
    alphas = scheduler.alphas_cumprod
    model = GaussianDenoiser(alphas, sigma=0.5)
    latents = 0.5 * _inputs()[0]
    inverted = ddim_invert(
        model, scheduler, latents, torch.zeros(1, 7, 32), num_inference_steps=steps, end_timestep=end
    )
    end = 999 if end is None else end
    clean = 1.0 if alpha_to_one else float(alphas[0])
    factor = _gaussian_inversion_factor(alphas, clean, steps, end, 0.5)
    torch.testing.assert_close(inverted, factor * latents, rtol=5e-6, atol=1e-7)
    # the tolerance tells neighbouring end points and clean levels apart
    ratio = 1000 // steps
    neighbours = [e for e in (end - 1, end + 1) if ratio * (steps - 1) <= e < min(1000, ratio * steps)]
    assert neighbours
    for other in neighbours:
        assert abs(_gaussian_inversion_factor(alphas, clean, steps, other, 0.5) / factor - 1) > 5e-5
    other_clean = float(alphas[0]) if alpha_to_one else 1.0
    assert abs(_gaussian_inversion_factor(alphas, other_clean, steps, end, 0.5) / factor - 1) > 5e-5


def test_batch_shares_one_prompt_embedding(components):
    """The random tiny UNet is no denoiser (its round trip is off by 0.3-0.97 relative, not improving
    with steps), so only the loop's mechanics are checked here: a ``[1, T, D]`` embedding serves
    every row of the batch, and each row is inverted as if alone."""
    unet, scheduler = components["unet"], components["scheduler"]
    latents, embeds = _inputs(batch=2)
    inverted = ddim_invert(unet, scheduler, latents, embeds[:1], num_inference_steps=3)
    assert inverted.shape == latents.shape and inverted.dtype == latents.dtype
    alone = ddim_invert(unet, scheduler, latents[1:], embeds[:1], num_inference_steps=3)
    torch.testing.assert_close(inverted[1:], alone, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(inverted).all() and not torch.allclose(inverted, latents)


def test_end_timestep_sets_the_unet_timesteps(components):
    unet, scheduler = components["unet"], components["scheduler"]
    latents, embeds = _inputs()
    seen = []
    hook = unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(int(args[1])), with_kwargs=True)
    try:
        ddim_invert(unet, scheduler, latents, embeds, num_inference_steps=4, end_timestep=901)
        assert seen == inversion_timesteps(scheduler, 4, 901).tolist() == [151, 401, 651, 901]
        seen.clear()
        ddim_invert(unet, scheduler, latents, embeds, num_inference_steps=4)
        assert seen[-1] == 999
    finally:
        hook.remove()


def test_classifier_free_guidance(components):
    unet, scheduler = components["unet"], components["scheduler"]
    latents, embeds = _inputs()
    batches = []
    hook = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        plain = ddim_invert(unet, scheduler, latents, embeds, num_inference_steps=2)
        assert batches == [1, 1]
        batches.clear()
        same = ddim_invert(
            unet,
            scheduler,
            latents,
            embeds,
            num_inference_steps=2,
            negative_prompt_embeds=embeds,
            guidance_scale=5.0,
        )
        assert batches == [2, 2]
    finally:
        hook.remove()
    torch.testing.assert_close(same, plain, rtol=1e-4, atol=1e-5)  # eps_u == eps_c: CFG is a no-op
    guided = ddim_invert(
        unet,
        scheduler,
        latents,
        embeds,
        num_inference_steps=2,
        negative_prompt_embeds=torch.zeros_like(embeds),
        guidance_scale=5.0,
    )
    assert not torch.allclose(guided, plain)


def test_noise_scale_is_stochastic_and_seeded(components):
    unet, scheduler = components["unet"], components["scheduler"]
    latents, embeds = _inputs()

    def run(seed, noise_scale=0.5):
        generator = torch.Generator().manual_seed(seed)
        return ddim_invert(
            unet,
            scheduler,
            latents,
            embeds,
            num_inference_steps=2,
            noise_scale=noise_scale,
            generator=generator,
        )

    deterministic = ddim_invert(unet, scheduler, latents, embeds, num_inference_steps=2)
    torch.testing.assert_close(run(0, noise_scale=0.0), deterministic)
    first = run(0)
    assert not torch.allclose(first, deterministic)
    torch.testing.assert_close(run(0), first)
    assert not torch.allclose(run(1), first)


def test_scheduler_is_not_mutated(components):
    unet = components["unet"]
    scheduler = DDIMScheduler.from_config(components["scheduler"].config)
    scheduler.set_timesteps(7)
    timesteps = scheduler.timesteps.clone()
    config = dict(scheduler.config)
    latents, embeds = _inputs()
    ddim_invert(unet, scheduler, latents, embeds, num_inference_steps=3, end_timestep=scheduler.timesteps[0])
    assert scheduler.num_inference_steps == 7
    torch.testing.assert_close(scheduler.timesteps, timesteps)
    assert dict(scheduler.config) == config
    assert type(scheduler) is DDIMScheduler


def test_linspace_sampler_and_progress_bar(components):
    unet = components["unet"]
    scheduler = DDIMScheduler.from_config(components["scheduler"].config, timestep_spacing="linspace")
    latents, embeds = _inputs()
    wrapped = []

    def bar(iterable):
        wrapped.append(list(iterable))
        return wrapped[-1]

    ddim_invert(unet, scheduler, latents, embeds, num_inference_steps=2, progress_bar=bar)
    assert [int(t) for t in wrapped[0]] == [499, 999]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=2.0), "num_inference_steps"),
        (dict(num_inference_steps=2, end_timestep=1000), "end_timestep"),
        (dict(num_inference_steps=2, end_timestep=-1), "end_timestep"),
        (dict(num_inference_steps=50, end_timestep=500), "too low"),
        (dict(num_inference_steps=2, guidance_scale=3.0), "negative_prompt_embeds"),
        (dict(num_inference_steps=2, guidance_scale=0.5), "guidance_scale"),
        (dict(num_inference_steps=2, noise_scale=-0.1), "noise_scale"),
        (dict(num_inference_steps=2, prompt_embeds=torch.zeros(3, 7, 32)), "batch"),
        (dict(num_inference_steps=2, prompt_embeds=torch.zeros(7, 32)), "prompt_embeds"),
        (dict(num_inference_steps=2, latents=torch.zeros(4, 16, 16)), "latents"),
        (
            dict(num_inference_steps=2, guidance_scale=3.0, negative_prompt_embeds=torch.zeros(2, 5, 32)),
            "negative_prompt_embeds",
        ),
    ],
)
def test_bad_arguments(components, kwargs, match):
    latents, embeds = _inputs(batch=2)
    kwargs = {"latents": latents, "prompt_embeds": embeds, **kwargs}
    with pytest.raises(ValueError, match=match):
        ddim_invert(components["unet"], components["scheduler"], **kwargs)
