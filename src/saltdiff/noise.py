"""The maths of the two noise families, as small pure functions in sigma notation (k-diffusion style).

A denoiser family adds noise to a clean latent ``x0`` with unit Gaussian ``eps`` in one of two ways:

- **VP** (variance preserving; Stable Diffusion 1.x/2.x/XL, DDPM, Ho et al. 2020 eq. 4):
  ``z = sqrt(a) x0 + sqrt(1 - a) eps`` with ``a = alpha_bar_t``. In sigma notation
  (Karras et al. 2022, Table 1) ``sigma = sqrt((1 - a) / a)``, so ``a = 1 / (1 + sigma^2)`` and
  ``z = (x0 + sigma eps) / sqrt(1 + sigma^2)``: the k-diffusion sample ``x0 + sigma eps`` scaled to
  unit variance.
- **flow** (rectified flow / flow matching; SD3, FLUX, Lipman et al. 2023, Liu et al. 2023):
  ``x = (1 - sigma) x0 + sigma eps`` with ``sigma`` in ``[0, 1]`` (diffusers'
  ``FlowMatchEulerDiscreteScheduler.sigmas``); the network predicts the velocity
  ``u = dx/dsigma = eps - x0``.

Both are "a clean part plus a noise part": ``latent = c_data(sigma) x0 + c_noise(sigma) eps``
(:func:`coefficients`). Every function here takes the family's own sigma and is exact, so
the rest of the package (guidance, inversion, the family adapters) never spells out a formula
twice. Nothing here touches a model; a sampler only through :func:`vp_schedule`, the one reader of
its discrete VP schedule (``alphas_cumprod``: outside this module's ``vp_*`` functions and the family
adapters, no module names it; ``tests/test_architecture.py`` walks the source).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "NOISE_FAMILIES",
    "check_family",
    "coefficients",
    "flow_inversion_step",
    "flow_latent",
    "flow_x0_eps",
    "guided_step_scale",
    "latent_at",
    "model_input_scale",
    "vp_alpha",
    "vp_inversion_step",
    "vp_latent",
    "vp_noise_variance",
    "vp_schedule",
    "vp_sigma",
    "vp_timestep",
    "vp_x0_eps",
]

#: The noise families a denoiser can belong to.
NOISE_FAMILIES = ("vp", "flow")

Number = float | torch.Tensor


def check_family(family: str) -> str:
    """``family`` itself, or one ``ValueError`` line naming it: callers dispatch on it."""
    if family not in NOISE_FAMILIES:
        raise ValueError(f"noise family must be one of {NOISE_FAMILIES}, got {family!r}")
    return family


def _check_sigma(family: str, sigma: Number) -> None:
    """Refuse a sigma outside the family's range (negative, or above 1 for flow): a silent wrong latent."""
    value = torch.as_tensor(sigma, dtype=torch.float64)
    top = 1.0 if family == "flow" else math.inf
    if not bool(((value >= 0) & (value <= top)).all()):
        raise ValueError(f"{family} sigma must be in [0, {top}], got {sigma!r}")


def vp_alpha(sigma: Number) -> Number:
    """``alpha_bar = 1 / (1 + sigma^2)``: the VP signal level of a sigma (Karras et al. 2022, Table 1)."""
    return 1.0 / (1.0 + sigma**2)


def vp_sigma(alpha_bar: Number) -> Number:
    """``sigma = sqrt((1 - alpha_bar) / alpha_bar)``: the sigma of a VP timestep's ``alphas_cumprod``."""
    if isinstance(alpha_bar, torch.Tensor):
        return ((1.0 - alpha_bar) / alpha_bar).sqrt()
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def vp_schedule(scheduler) -> torch.Tensor | None:
    """A sampler's discrete VP schedule ``alpha_bar_t`` by training timestep (its ``alphas_cumprod``),
    or ``None`` for a sampler without one (flow matching)."""
    alphas_cumprod = getattr(scheduler, "alphas_cumprod", None)
    return alphas_cumprod if torch.is_tensor(alphas_cumprod) else None


def vp_noise_variance(alphas_cumprod: torch.Tensor, timestep: int | float | torch.Tensor) -> float:
    """``c_noise^2 = 1 - alpha_bar_t`` at a sampler's timestep, read off the discrete schedule (rounded:
    Euler-type samplers' timesteps are floats): :func:`guided_step_scale` ``("vp", sigma)`` at the
    timestep's own sigma, as the UNet sampling loop scales its guided step."""
    t = int(round(float(timestep)))
    return float(1.0 - alphas_cumprod[t])


def vp_timestep(sigma: Number, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The (fractional) discrete timestep of a VP ``sigma``: linear interpolation in ``log sigma``.

    k-diffusion's ``DiscreteSchedule.sigma_to_t`` (diffusers' ``EulerDiscreteScheduler._sigma_to_t``):
    a VP UNet is trained on integer timesteps, and between two of them the noise level is read
    log-linearly. Exact at each training timestep's own sigma. A sigma outside the schedule's range
    (beyond float rounding) is a ``ValueError``, not a clamp.
    """
    log_sigmas = torch.log(vp_sigma(alphas_cumprod.double()))  # increasing with t
    value = torch.as_tensor(sigma, dtype=torch.float64, device=log_sigmas.device)
    if bool((value <= 0).any()):
        raise ValueError(f"VP sigma must be > 0 to have a timestep, got {sigma!r}")
    log_sigma = torch.log(value)
    low, high = log_sigmas[0], log_sigmas[-1]
    tol = 1e-6
    if bool(((log_sigma < low - tol) | (log_sigma > high + tol)).any()):
        raise ValueError(
            f"VP sigma {sigma!r} is outside the schedule's [{float(low.exp()):.4g}, {float(high.exp()):.4g}]"
        )
    log_sigma = log_sigma.clamp(low, high)  # float rounding only
    hi = torch.searchsorted(log_sigmas, log_sigma.reshape(-1)).clamp(1, len(log_sigmas) - 1)
    lo = hi - 1
    w = (log_sigma.reshape(-1) - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])
    return (lo + w).reshape(log_sigma.shape).float()


def coefficients(family: str, sigma: Number) -> tuple[Number, Number]:
    """``(c_data, c_noise)`` with ``latent = c_data x0 + c_noise eps`` at ``sigma`` in ``family``.

    VP: ``(1, sigma) / sqrt(1 + sigma^2)`` = ``(sqrt(a), sqrt(1 - a))``; flow: ``(1 - sigma, sigma)``.
    """
    check_family(family)
    _check_sigma(family, sigma)
    if family == "flow":
        return 1.0 - sigma, sigma
    norm = (1.0 + sigma**2) ** 0.5
    return 1.0 / norm, sigma / norm


def latent_at(family: str, x0: torch.Tensor, eps: torch.Tensor, sigma: Number) -> torch.Tensor:
    """The latent at ``sigma``: ``c_data x0 + c_noise eps`` (VP: Ho et al. eq. 4; flow: the straight path)."""
    c_data, c_noise = coefficients(family, sigma)
    return c_data * x0 + c_noise * eps


def vp_latent(x0: torch.Tensor, eps: torch.Tensor, sigma: Number) -> torch.Tensor:
    """``z = sqrt(a) x0 + sqrt(1 - a) eps``, ``a = 1 / (1 + sigma^2)`` (what a VP UNet takes)."""
    return latent_at("vp", x0, eps, sigma)


def flow_latent(x0: torch.Tensor, eps: torch.Tensor, sigma: Number) -> torch.Tensor:
    """``x = (1 - sigma) x0 + sigma eps`` (rectified flow's straight path, Liu et al. 2023 eq. 1)."""
    return latent_at("flow", x0, eps, sigma)


def model_input_scale(family: str, sigma: Number) -> Number:
    """``c_in``: what multiplies the *sampler's* latent before the network sees it.

    VP samplers of the Euler family keep ``x0 + sigma eps`` and divide by ``sqrt(1 + sigma^2)`` to
    give the UNet its VP input (Karras et al. 2022, Table 1, ``c_in``; diffusers'
    ``EulerDiscreteScheduler.scale_model_input``). Flow samplers keep the network's own latent:
    ``c_in = 1`` (``FlowMatchEulerDiscreteScheduler`` has no ``scale_model_input``).
    """
    check_family(family)
    _check_sigma(family, sigma)
    if family == "flow":
        return 1.0
    return 1.0 / (1.0 + sigma**2) ** 0.5


def vp_x0_eps(
    prediction: torch.Tensor, z: torch.Tensor, sigma: Number, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` from a VP network's output on ``z`` at ``sigma`` (``z = sqrt(a) x0 + sqrt(1-a) eps``).

    ``epsilon``: ``x0 = (z - sqrt(1-a) eps) / sqrt(a)``; ``v_prediction`` (Salimans & Ho 2022, eq. 9,
    ``v = sqrt(a) eps - sqrt(1-a) x0``): ``x0 = sqrt(a) z - sqrt(1-a) v``,
    ``eps = sqrt(a) v + sqrt(1-a) z``; ``sample``: ``eps = (z - sqrt(a) x0) / sqrt(1-a)``.
    """
    root_a, root_1ma = coefficients("vp", sigma)
    if prediction_type == "epsilon":
        return (z - root_1ma * prediction) / root_a, prediction
    if prediction_type == "v_prediction":
        return root_a * z - root_1ma * prediction, root_a * prediction + root_1ma * z
    if prediction_type == "sample":
        return prediction, (z - root_a * prediction) / root_1ma
    raise ValueError(f"VP prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def flow_x0_eps(velocity: torch.Tensor, x: torch.Tensor, sigma: Number) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` from a flow velocity ``u = eps - x0`` on ``x = (1-sigma) x0 + sigma eps``.

    Solving the two linear equations: ``x0 = x - sigma u``, ``eps = x + (1 - sigma) u``.
    """
    _check_sigma("flow", sigma)
    return x - sigma * velocity, x + (1.0 - sigma) * velocity


def guided_step_scale(family: str, sigma: Number) -> Number:
    """``s(sigma) = c_noise(sigma)^2``: how much a gradient step on the *network's* latent is scaled.

    Layout guidance (Chen et al. 2023) steps in k-diffusion's sigma space, where the sample is
    ``y = x0 + sigma_y eps``: ``y <- y - eta sigma_y^2 grad_y L`` (a step the size of the noise
    variance, so it vanishes as the image settles). For a latent ``x = c y`` (``c`` constant at this
    level), ``grad_y L = c grad_x L`` and ``Delta x = c Delta y``, so the same step reads
    ``x <- x - eta (c sigma_y)^2 grad_x L`` and ``c sigma_y`` is the latent's own noise coefficient:

    - VP: ``c = sqrt(a)``, ``sigma_y = sigma``: ``s = a sigma^2 = 1 - alpha_bar`` -- exactly what
      the UNet loop reads off the discrete schedule (:func:`vp_noise_variance`).
    - flow: ``x = (1 - sigma) x0 + sigma eps = (1 - sigma) (x0 + sigma / (1 - sigma) eps)``, so
      ``c = 1 - sigma``, ``sigma_y = sigma / (1 - sigma)``: ``s = sigma^2``.

    Hence one ``step_size`` means the same move in both families at the same noise-to-signal ratio.
    """
    _, c_noise = coefficients(family, sigma)
    return c_noise**2


def vp_inversion_step(z: torch.Tensor, eps: torch.Tensor, sigma: Number, sigma_next: Number) -> torch.Tensor:
    """One deterministic DDIM step from ``sigma`` to ``sigma_next`` (Song et al. 2021, eq. 12, sigma=0).

    ``x0`` is read from ``z`` and the noise estimate ``eps``; the result is
    ``sqrt(a') x0 + sqrt(1 - a') eps``. With ``sigma_next > sigma`` this is one DDIM inversion step
    (``eps`` taken from the network evaluated near ``sigma_next``, as ``DDIMInverseScheduler`` does).
    """
    root_a, root_1ma = coefficients("vp", sigma)
    x0 = (z - root_1ma * eps) / root_a
    return latent_at("vp", x0, eps, sigma_next)


def flow_inversion_step(
    x: torch.Tensor, velocity: torch.Tensor, sigma: Number, sigma_next: Number
) -> torch.Tensor:
    """One Euler step of the flow ODE ``dx/dsigma = u``: ``x + (sigma_next - sigma) u``.

    Upwards (``sigma_next > sigma``) it inverts; downwards it is ``FlowMatchEulerDiscreteScheduler.step``.
    It is also the flow DDIM step: ``(1 - sigma') x0 + sigma' eps`` with ``(x0, eps)`` from
    :func:`flow_x0_eps` expands to the same expression.
    """
    _check_sigma("flow", sigma)
    _check_sigma("flow", sigma_next)
    return x + (sigma_next - sigma) * velocity
