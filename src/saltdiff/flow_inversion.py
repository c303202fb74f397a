"""Flow inversion: a clean latent carried up the flow ODE to the sampler's first sigma (SALT's x_1*).

A flow-matching model (SD3, FLUX) predicts the velocity ``u(x, sigma) = dx/dsigma`` of the
probability-flow ODE along ``x = (1 - sigma) x0 + sigma eps`` (:mod:`saltdiff.noise`); sampling
integrates it downwards from ``sigma = 1`` (``FlowMatchEulerDiscreteScheduler`` is plain Euler).
There is no inverse scheduler for flow matching in diffusers: inversion is the same ODE integrated
upwards, from the clean latent (``sigma = 0``) to the sampler's first sigma, on the sampler's own
grid (:func:`inversion_sigmas`, including FLUX's resolution-dependent shift ``mu``), so that
sampling mirrors it step for step. Two integrators, both over a plain velocity callable:

- ``"euler"``: reverse Euler, ``x_{i+1} = x_i + (s_{i+1} - s_i) u(x_i, s_i)``; one call per step,
  first order (RF-inversion, Rout et al. 2024).
- ``"midpoint"``: the midpoint rule ``x_{i+1} = x_i + h u(x_i + h/2 u_i, s_i + h/2)``, where the
  start velocity ``u_i`` is the previous step's midpoint velocity instead of a fresh call
  (FireFlow, Deng et al. 2024, Alg. 1): one call per step plus one at the start, and second order
  in practice (``tests/test_flow_inversion.py`` measures both on the exact Gaussian field).

Nothing here knows a network: ``velocity(x, sigma)`` is the family adapter's denoise call with
its conditions bound (and classifier-free guidance already applied, if any).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = [
    "FLOW_INVERSION_METHODS",
    "Velocity",
    "dynamic_shift_mu",
    "flow_invert",
    "inversion_sigmas",
    "sampler_sigmas",
    "solve_flow_ode",
]

#: ``velocity(x, sigma) -> u``: the flow model's prediction of ``dx/dsigma`` at noise level ``sigma``.
Velocity = Callable[[torch.Tensor, float], torch.Tensor]

#: The integrators :func:`solve_flow_ode` knows, with their network calls for K steps.
FLOW_INVERSION_METHODS = {"euler": "K calls", "midpoint": "K + 1 calls (FireFlow velocity reuse)"}


def dynamic_shift_mu(scheduler_config, image_seq_len: int) -> float:
    """FLUX's (and SD3.5's) ``mu`` for an image of ``image_seq_len`` transformer tokens.

    Linear in the token count between ``(base_image_seq_len, base_shift)`` and
    ``(max_image_seq_len, max_shift)`` of the scheduler's config: diffusers' ``calculate_shift``,
    which ``FluxPipeline`` feeds to ``set_timesteps(mu=...)`` when ``use_dynamic_shifting`` is on.
    Inversion must use the same value or it inverts onto another grid than the sampler runs.
    """
    if isinstance(image_seq_len, bool) or not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive int, got {image_seq_len!r}")
    base_len = scheduler_config.get("base_image_seq_len", 256)
    max_len = scheduler_config.get("max_image_seq_len", 4096)
    base_shift = scheduler_config.get("base_shift", 0.5)
    max_shift = scheduler_config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len  # calculate_shift's order of operations, to the last bit
    return image_seq_len * slope + intercept


def sampler_sigmas(
    scheduler,
    num_inference_steps: int | None = None,
    *,
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The sigmas a flow sampler runs (descending, ending with 0), read from a copy of ``scheduler``.

    Pass what the pipeline passes to ``set_timesteps``: ``FluxPipeline`` gives custom ``sigmas``
    (``linspace(1, 1/N, N)``) and ``mu``; SD3 gives ``num_inference_steps`` (and ``mu`` only with
    dynamic shifting). The scheduler itself is left untouched.
    """
    if not hasattr(scheduler, "sigmas") or "shift" not in scheduler.config:
        raise ValueError(
            f"scheduler {type(scheduler).__name__} is not a flow-matching scheduler "
            "(FlowMatchEulerDiscreteScheduler or one with its config)"
        )
    if sigmas is None and (
        isinstance(num_inference_steps, bool)
        or not isinstance(num_inference_steps, int)
        or num_inference_steps < 1
    ):
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if scheduler.config.get("use_dynamic_shifting") and mu is None:
        raise ValueError(
            f"{type(scheduler).__name__} has use_dynamic_shifting=True: pass mu "
            "(dynamic_shift_mu(scheduler.config, image_seq_len))"
        )
    probe = type(scheduler).from_config(scheduler.config)
    kwargs = {} if mu is None else {"mu": mu}
    if sigmas is not None:
        probe.set_timesteps(sigmas=list(sigmas), **kwargs)
    else:
        probe.set_timesteps(num_inference_steps, **kwargs)
    return probe.sigmas.clone()


def inversion_sigmas(
    scheduler,
    num_inference_steps: int | None = None,
    *,
    sigmas: Sequence[float] | None = None,
    mu: float | None = None,
) -> torch.Tensor:
    """The inversion grid ``0 = s_0 < ... < s_K``: the sampler's sigmas (:func:`sampler_sigmas`) reversed.

    ``s_K`` is the sampler's first sigma, so the inverted latent is where sampling starts, and each
    inversion step spans exactly one sampling step.
    """
    return sampler_sigmas(scheduler, num_inference_steps, sigmas=sigmas, mu=mu).flip(0)


def solve_flow_ode(
    velocity: Velocity,
    latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    method: str = "euler",
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Integrate ``dx/dsigma = velocity(x, sigma)`` from ``sigmas[0]`` to ``sigmas[-1]`` along the grid.

    The grid may run either way (upwards: inversion; downwards: sampling) but must be strictly
    monotone and inside ``[0, 1]``. Arithmetic is in float32 whatever the latents' dtype (a bf16
    inversion would otherwise round every step); the result has the latents' dtype. With
    ``return_trajectory`` the latent at every grid point is returned too (``len(sigmas)`` tensors).
    """
    grid = _check_grid(sigmas, method)
    x = latents.float()
    trajectory = [latents]
    u = None
    for s, s_next in zip(grid[:-1], grid[1:]):
        h = s_next - s
        if method == "euler":
            x = x + h * velocity(x.to(latents.dtype), s).float()
        else:
            if u is None:  # the only extra call: later steps start from the last midpoint velocity
                u = velocity(x.to(latents.dtype), s).float()
            x_mid = x + (h / 2) * u
            u = velocity(x_mid.to(latents.dtype), s + h / 2).float()
            x = x + h * u
        if return_trajectory:
            trajectory.append(x.to(latents.dtype))
    out = x.to(latents.dtype)
    if return_trajectory:
        trajectory[-1] = out
        return out, trajectory
    return out


@torch.no_grad()
def flow_invert(
    velocity: Velocity,
    latents: torch.Tensor,
    sigmas: Sequence[float] | torch.Tensor,
    *,
    method: str = "euler",
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Invert the clean latent ``latents`` up the flow ODE along ``sigmas`` (:func:`inversion_sigmas`).

    ``sigmas`` must start at 0 (the clean latent) and increase; the result is the latent at
    ``sigmas[-1]``, the sampler's first sigma. ``method``: ``"euler"`` or ``"midpoint"`` (see the
    module docstring).
    """
    grid = _check_grid(sigmas, method)
    if grid[0] != 0.0 or grid[-1] <= grid[0]:
        raise ValueError(f"inversion sigmas must start at 0 and increase, got {grid}")
    return solve_flow_ode(velocity, latents, grid, method=method, return_trajectory=return_trajectory)


def _check_grid(sigmas, method: str) -> list[float]:
    """The grid as floats, or one ``ValueError`` naming what is wrong with it or with ``method``."""
    if method not in FLOW_INVERSION_METHODS:
        raise ValueError(f"method must be one of {sorted(FLOW_INVERSION_METHODS)}, got {method!r}")
    grid = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(grid) < 2:
        raise ValueError(f"sigmas must hold at least two levels, got {grid}")
    steps = [b - a for a, b in zip(grid[:-1], grid[1:])]
    if not (all(h > 0 for h in steps) or all(h < 0 for h in steps)):
        raise ValueError(f"sigmas must be strictly monotone, got {grid}")
    if min(grid) < 0.0 or max(grid) > 1.0:
        raise ValueError(f"flow sigmas must lie in [0, 1], got {grid}")
    return grid
