"""Flow inversion on the exact Gaussian velocity field: grids, convergence order, round trips, calls.

Measured here (relative L2 error of the inverted latent against the exact flow map at sigma = 1,
SD3-style grid, shift 3; data N(0.5, 0.5^2)):

    steps            5        10       20       40
    euler            0.56     0.28     0.14     0.071     (first order)
    midpoint (reuse) 0.034    0.017    0.0030   0.00036

and the round trip invert -> FlowMatchEulerDiscreteScheduler back to sigma 0: 0.57 / 0.34 / 0.19 /
0.097 from Euler inversion, 0.41 / 0.21 / 0.10 / 0.050 from midpoint inversion (the Euler
sampler's own error dominates).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from saltdiff.flow_inversion import (
    dynamic_shift_mu,
    flow_invert,
    inversion_sigmas,
    sampler_sigmas,
    solve_flow_ode,
)
from saltdiff.testing_flow import GaussianVelocity


def _data(seed=0):
    torch.manual_seed(seed)
    return (0.5 + 0.5 * torch.randn(2, 4, 8, 8)).double()


def _relative(a, b):
    return float((a - b).norm() / b.norm())


def _sd3_scheduler():
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _flux_scheduler():
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def _inversion_error(method, steps):
    field, x0 = GaussianVelocity(0.5, 0.5), _data()
    grid = inversion_sigmas(_sd3_scheduler(), steps)
    inverted = flow_invert(field, x0, grid, method=method)
    return _relative(inverted, field.flow_map(x0, 0.0, float(grid[-1])))


def test_dynamic_shift_mu_by_hand():
    config = _flux_scheduler().config
    assert dynamic_shift_mu(config, 256) == pytest.approx(0.5)
    assert dynamic_shift_mu(config, 4096) == pytest.approx(1.15)
    assert dynamic_shift_mu(config, 1024) == pytest.approx(0.5 + 768 * 0.65 / 3840)  # 0.63


def test_inversion_grid_is_the_samplers_grid_reversed_with_fluxs_shift():
    scheduler = _flux_scheduler()
    mu = dynamic_shift_mu(scheduler.config, 1024)
    sigmas = np.linspace(1.0, 1 / 8, 8)  # what FluxPipeline passes
    live = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    live.set_timesteps(sigmas=sigmas, mu=mu)
    grid = inversion_sigmas(scheduler, sigmas=sigmas, mu=mu)
    torch.testing.assert_close(grid, live.sigmas.flip(0))
    assert grid[0] == 0 and grid[-1] == live.sigmas[0] and len(grid) == 9
    other = inversion_sigmas(scheduler, sigmas=sigmas, mu=dynamic_shift_mu(scheduler.config, 4096))
    assert (other[1:-1] - grid[1:-1]).abs().max() > 1e-2, "mu must change the grid"
    assert len(scheduler.sigmas) == 1000  # the caller's scheduler was never set


def test_sampler_sigmas_refuses_what_it_cannot_grid():
    with pytest.raises(ValueError, match="mu"):
        sampler_sigmas(_flux_scheduler(), 4)
    with pytest.raises(ValueError, match="0"):
        sampler_sigmas(_sd3_scheduler(), 0)
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="DDIMScheduler"):
        sampler_sigmas(DDIMScheduler(), 4)


def test_euler_inversion_is_first_order():
    e10, e20, e40 = (_inversion_error("euler", k) for k in (10, 20, 40))
    assert 1.8 < e10 / e20 < 2.2 and 1.8 < e20 / e40 < 2.2, (e10, e20, e40)


def test_midpoint_inversion_beats_euler_and_converges_faster():
    e10, e20, e40 = (_inversion_error("midpoint", k) for k in (10, 20, 40))
    euler20 = _inversion_error("euler", 20)
    assert e20 < euler20 / 20, (e20, euler20)
    assert e10 / e20 > 4 and e20 / e40 > 4, (e10, e20, e40)


def test_round_trip_with_the_exact_field_returns_to_the_clean_latent():
    """Invert, then integrate back down the same grid: exact in the limit (here 1e-5 at 200 steps)."""
    field, x0 = GaussianVelocity(0.5, 0.5), _data()
    grid = inversion_sigmas(_sd3_scheduler(), 200)
    inverted = flow_invert(field, x0, grid, method="midpoint")
    assert _relative(inverted, field.flow_map(x0, 0.0, 1.0)) < 1e-5
    back = solve_flow_ode(field, inverted, grid.flip(0), method="midpoint")
    assert _relative(back, x0) < 1e-5


def test_the_real_sampler_started_from_the_inversion_comes_back():
    """The inverted latent is where FlowMatchEulerDiscreteScheduler starts: stepping it down its own
    timesteps returns near x0, closer with more steps (an inversion one step off would not)."""
    errors = []
    for steps in (10, 40):
        field, x0 = GaussianVelocity(0.5, 0.5), _data()
        sampler = _sd3_scheduler()
        sampler.set_timesteps(steps)
        x = flow_invert(field, x0, inversion_sigmas(sampler, steps), method="midpoint").float()
        for t, sigma in zip(sampler.timesteps, sampler.sigmas):
            x = sampler.step(field(x, float(sigma)), t, x).prev_sample
        errors.append(_relative(x.double(), x0))
    assert errors[1] < 0.06 and errors[1] < errors[0] / 3, errors


def test_each_method_calls_the_velocity_where_it_should():
    grid = [0.0, 0.2, 0.6, 1.0]
    x0 = _data()
    euler = GaussianVelocity()
    flow_invert(euler, x0, grid, method="euler")
    assert euler.calls == pytest.approx([0.0, 0.2, 0.6])  # K calls, at each step's start
    midpoint = GaussianVelocity()
    flow_invert(midpoint, x0, grid, method="midpoint")
    assert midpoint.calls == pytest.approx([0.0, 0.1, 0.4, 0.8])  # one start call + K midpoints


def test_trajectory_has_every_grid_point_and_keeps_the_dtype():
    field, x0 = GaussianVelocity(), _data().to(torch.bfloat16)
    out, trajectory = flow_invert(field, x0, [0.0, 0.5, 1.0], return_trajectory=True)
    assert len(trajectory) == 3 and trajectory[0] is x0 and trajectory[-1] is out
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("grid", "method", "match"),
    [
        ([0.0, 0.5, 1.0], "heun", "'heun'"),
        ([0.1, 0.5, 1.0], "euler", "start at 0"),
        ([0.0, 0.5, 0.5, 1.0], "euler", "monotone"),
        ([0.0, 0.5, 1.5], "euler", r"\[0, 1\]"),
        ([0.0], "euler", "two"),
    ],
)
def test_bad_grid_or_method_is_one_line_naming_it(grid, method, match):
    with pytest.raises(ValueError, match=match):
        flow_invert(GaussianVelocity(), _data(), grid, method=method)
