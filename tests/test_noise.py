"""noise.py: both noise families' formulas against values computed by hand, and their consistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from saltdiff import noise as N
from saltdiff.components import sd_ddim_scheduler
from saltdiff.guidance import step_scale

X0 = torch.tensor([2.0, -1.0])
EPS = torch.tensor([0.5, 3.0])


def test_vp_sigma_and_alpha_are_inverse_and_match_hand_values():
    # sigma = sqrt(3): a = 1 / (1 + 3) = 0.25; a = 0.2: sigma = sqrt(0.8 / 0.2) = 2
    assert N.vp_alpha(math.sqrt(3)) == pytest.approx(0.25)
    assert N.vp_sigma(0.2) == pytest.approx(2.0)
    assert float(N.vp_sigma(torch.tensor(0.2))) == pytest.approx(2.0)
    assert N.vp_alpha(N.vp_sigma(0.37)) == pytest.approx(0.37)


def test_latents_by_hand():
    # VP at sigma = sqrt(3): sqrt(a) = 0.5, sqrt(1 - a) = sqrt(3) / 2
    torch.testing.assert_close(N.vp_latent(X0, EPS, math.sqrt(3)), 0.5 * X0 + math.sqrt(3) / 2 * EPS)
    torch.testing.assert_close(
        N.vp_latent(X0, EPS, math.sqrt(3)), torch.tensor([1.0 + math.sqrt(3) / 4, -0.5 + 1.5 * math.sqrt(3)])
    )
    # flow at sigma = 0.25: 0.75 x0 + 0.25 eps
    torch.testing.assert_close(N.flow_latent(X0, EPS, 0.25), torch.tensor([1.625, 0.0]))
    torch.testing.assert_close(N.flow_latent(X0, EPS, 0.0), X0)
    torch.testing.assert_close(N.flow_latent(X0, EPS, 1.0), EPS)


def test_vp_latent_is_what_diffusers_add_noise_gives():
    """The same z as DDIMScheduler.add_noise at a real timestep of SD's schedule."""
    scheduler = sd_ddim_scheduler()
    t = 500
    a = scheduler.alphas_cumprod[t]
    expected = scheduler.add_noise(X0, EPS, torch.tensor([t]))
    torch.testing.assert_close(N.vp_latent(X0, EPS, N.vp_sigma(a)), expected)


def test_flow_latent_is_what_flow_match_scale_noise_gives():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    t = scheduler.timesteps[1]
    expected = scheduler.scale_noise(X0[None], t[None], EPS[None])[0]
    torch.testing.assert_close(N.flow_latent(X0, EPS, float(scheduler.sigmas[1])), expected)


def test_model_input_scale_by_hand_and_against_euler():
    assert N.model_input_scale("vp", math.sqrt(3)) == pytest.approx(0.5)
    assert N.model_input_scale("flow", 0.7) == 1.0
    euler = EulerDiscreteScheduler.from_config(sd_ddim_scheduler().config)
    euler.set_timesteps(10)
    t, sigma = euler.timesteps[3], float(euler.sigmas[3])
    got = euler.scale_model_input(torch.ones(()), t)
    assert float(got) == pytest.approx(N.model_input_scale("vp", sigma), rel=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_x0_eps_recovers_both_from_each_prediction(prediction_type):
    sigma = math.sqrt(3)  # sqrt(a) = 1/2, sqrt(1-a) = sqrt(3)/2
    z = N.vp_latent(X0, EPS, sigma)
    v = 0.5 * EPS - math.sqrt(3) / 2 * X0  # Salimans & Ho's v, by hand
    prediction = {"epsilon": EPS, "v_prediction": v, "sample": X0}[prediction_type]
    x0, eps = N.vp_x0_eps(prediction, z, sigma, prediction_type)
    torch.testing.assert_close(x0, X0)
    torch.testing.assert_close(eps, EPS)


def test_vp_x0_eps_refuses_an_unknown_prediction():
    with pytest.raises(ValueError, match="'flow'"):
        N.vp_x0_eps(EPS, X0, 1.0, "flow")


def test_flow_x0_eps_recovers_both_from_the_velocity():
    sigma = 0.25
    x = N.flow_latent(X0, EPS, sigma)  # [1.625, 0.0]
    u = EPS - X0  # [-1.5, 4.0]
    x0, eps = N.flow_x0_eps(u, x, sigma)
    # by hand: x0 = x - 0.25 u = [1.625 + 0.375, 0 - 1] ; eps = x + 0.75 u = [1.625 - 1.125, 3]
    torch.testing.assert_close(x0, torch.tensor([2.0, -1.0]))
    torch.testing.assert_close(eps, torch.tensor([0.5, 3.0]))


def test_guided_step_scale_by_hand():
    # VP: 1 - a; sigma = sqrt(3) -> a = 0.25 -> 0.75.  flow: sigma^2; 0.5 -> 0.25, 0.9 -> 0.81
    assert N.guided_step_scale("vp", math.sqrt(3)) == pytest.approx(0.75)
    assert N.guided_step_scale("flow", 0.5) == pytest.approx(0.25)
    assert N.guided_step_scale("flow", 0.9) == pytest.approx(0.81)
    assert N.guided_step_scale("flow", 0.0) == 0.0


def test_vp_guided_step_scale_is_the_unet_loops_step_scale():
    """The VP formula in sigma notation is the 1 - alpha_bar the UNet loop reads off the schedule."""
    alphas = N.vp_schedule(sd_ddim_scheduler())
    for t in (1, 250, 981):
        sigma = float(N.vp_sigma(alphas[t].double()))
        expected = step_scale(N.vp_noise_variance(alphas, t), "sigma")
        assert N.guided_step_scale("vp", sigma) == pytest.approx(expected, rel=1e-5)
    assert N.vp_schedule(object()) is None  # a flow sampler has no VP schedule


def test_flow_guided_step_scale_is_the_sigma_space_step_carried_to_the_flow_latent():
    """Derivation check with autograd: a step -eta sigma_y^2 grad_y L in k-diffusion space
    (y = x / (1 - sigma)) moves the flow latent x by exactly -eta s(sigma) grad_x L."""
    sigma, eta = 0.6, 0.1
    x = torch.tensor([0.3, -1.2], requires_grad=True)

    def loss(v):
        return (v**3).sum()

    (grad_x,) = torch.autograd.grad(loss(x), x)
    y = (x / (1 - sigma)).detach().requires_grad_(True)
    (grad_y,) = torch.autograd.grad(loss(y * (1 - sigma)), y)
    sigma_y = sigma / (1 - sigma)
    moved = (y - eta * sigma_y**2 * grad_y) * (1 - sigma)
    torch.testing.assert_close(moved, x - eta * N.guided_step_scale("flow", sigma) * grad_x)


def test_vp_inversion_step_matches_ddim_and_the_sampler_undoes_it():
    scheduler = DDIMScheduler.from_config(sd_ddim_scheduler().config, set_alpha_to_one=False)
    alphas = scheduler.alphas_cumprod.double()
    s, t = N.vp_sigma(alphas[200]), N.vp_sigma(alphas[400])
    z_s = N.vp_latent(X0.double(), EPS.double(), s)
    z_t = N.vp_inversion_step(z_s, EPS.double(), s, t)
    torch.testing.assert_close(z_t, N.vp_latent(X0.double(), EPS.double(), t))  # exact eps: exact level
    back = N.vp_inversion_step(z_t, EPS.double(), t, s)
    torch.testing.assert_close(back, z_s)


def test_flow_inversion_step_by_hand_and_is_flow_match_euler_downwards():
    x = torch.tensor([1.0, 2.0])
    u = torch.tensor([4.0, -2.0])
    torch.testing.assert_close(N.flow_inversion_step(x, u, 0.25, 0.75), torch.tensor([3.0, 1.0]))
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(4)
    s, s_next = float(scheduler.sigmas[0]), float(scheduler.sigmas[1])
    expected = scheduler.step(u, scheduler.timesteps[0], x).prev_sample
    torch.testing.assert_close(N.flow_inversion_step(x, u, s, s_next), expected)


def test_flow_step_with_the_exact_velocity_of_one_pair_lands_on_its_path():
    """For a single (x0, eps) pair the path is straight, so one Euler step is exact at any size."""
    x = N.flow_latent(X0, EPS, 0.1)
    torch.testing.assert_close(N.flow_inversion_step(x, EPS - X0, 0.1, 0.8), N.flow_latent(X0, EPS, 0.8))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: N.coefficients("ve", 1.0), "'ve'"),
        (lambda: N.flow_latent(X0, EPS, 1.5), "1.5"),
        (lambda: N.vp_latent(X0, EPS, -0.1), "-0.1"),
        (lambda: N.guided_step_scale("flow", -0.2), "-0.2"),
        (lambda: N.flow_inversion_step(X0, EPS, 0.2, 1.2), "1.2"),
    ],
)
def test_bad_family_or_sigma_is_one_line_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_vp_timestep_is_exact_at_training_timesteps_and_eulers_between():
    scheduler = EulerDiscreteScheduler.from_config(sd_ddim_scheduler().config)
    alphas = scheduler.alphas_cumprod
    for t in (0, 1, 500, 999):
        assert float(N.vp_timestep(N.vp_sigma(alphas[t].double()), alphas)) == pytest.approx(t, abs=1e-4)
    log_sigmas = torch.log(N.vp_sigma(alphas.double())).numpy()
    for sigma in (0.05, 1.0, 3.7, 14.0):
        assert float(N.vp_timestep(sigma, alphas)) == pytest.approx(
            float(scheduler._sigma_to_t(np.array(sigma), log_sigmas)), abs=1e-3
        )
    both = N.vp_timestep(torch.tensor([1.0, 3.7]), alphas)
    assert both.shape == (2,)
    with pytest.raises(ValueError, match="100"):
        N.vp_timestep(100.0, alphas)
