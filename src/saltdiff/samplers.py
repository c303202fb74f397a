"""Samplers: build a registered scheduler, and put a latent into the noise space a sampler starts from.

SALT's z_T* is a *variance-preserving* latent: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, what DDIM
inversion produces and what every UNet takes as input. DDIM, PNDM, DPM-Solver++ and UniPC sample in
that space. The k-diffusion samplers (Euler, Euler a, Heun, LMS, KDPM2) sample ``x = x_0 + sigma eps``
instead, ``sqrt(1 + sigma^2)`` times larger, and divide by that factor in ``scale_model_input``
before each UNet call (``init_noise_sigma`` = 14.6 for SD's schedule). So a VP latent handed to Euler
unchanged is 14.6× too small: the sampler reads it as almost clean and the layout is lost.

Every sampler's ``scale_model_input(x, t)`` is linear in ``x``: it multiplies by a factor ``c_t``
(1 for VP samplers). :func:`model_input_scale` reads that factor from the scheduler itself, and
:func:`to_sampler_space` divides a VP latent by it at the sampler's first timestep, so the
conversion holds for any scheduler that follows diffusers' convention, registered or not. Guided
updates use the same factor to take their gradient steps in VP space (see ``SaltPipeline._denoise``),
so a step size means the same thing under every sampler.
"""

from __future__ import annotations

import inspect

import torch

from .registry import SCHEDULERS

__all__ = [
    "check_supported",
    "ddim_twin",
    "known_config",
    "make_scheduler",
    "model_input_scale",
    "sampler_start_timestep",
    "scheduler_name",
    "to_sampler_space",
]


def make_scheduler(name: str, config):
    """The registered sampler ``name`` built from ``config`` (a scheduler's config: same noise schedule)."""
    entry = SCHEDULERS.get(name)
    return entry.load().from_config(config, **entry.options)


def ddim_twin(scheduler):
    """A DDIM scheduler with ``scheduler``'s noise schedule (keys DDIM does not know are dropped).

    Reference objects are generated with it whatever the user's sampler: they are then the same
    (and cached once) under every sampler, and under the built-in model other samplers' objects came
    out worse (reference IoU 0.41-0.69 under PNDM, Euler, Heun, LMS against 0.95 under DDIM).
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(known_config(DDIMScheduler, scheduler.config))


def known_config(cls, config) -> dict:
    """The entries of a scheduler ``config`` that ``cls`` takes (diffusers warns about the others)."""
    known = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in known}


def scheduler_name(scheduler) -> str | None:
    """The registered name of ``scheduler`` (class and options match), or ``None`` for another one."""
    for entry in SCHEDULERS:
        cls = entry.target.partition(":")[2]
        if type(scheduler).__name__ != cls:
            continue
        if all(scheduler.config.get(k) == v for k, v in entry.options.items()):
            return entry.name
    return None


def check_supported(scheduler) -> None:
    """One ``ValueError`` line when ``scheduler`` has no discrete DDPM noise schedule to invert against."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if not torch.is_tensor(alphas) or not hasattr(scheduler, "scale_model_input"):
        raise ValueError(
            f"scheduler {type(scheduler).__name__} is not supported: saltdiff needs a discrete DDPM noise "
            f"schedule (alphas_cumprod), as Stable Diffusion 1.x/2.x/XL samplers have; choose one of "
            f"{list(SCHEDULERS.names())} (pipe.scheduler = ...from_config(pipe.scheduler.config))"
        )


def sampler_start_timestep(scheduler, num_inference_steps: int) -> int:
    """The sampler's first timestep, rounded (Euler's are floats), computed on a copy of ``scheduler``."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(num_inference_steps)
    return int(round(float(probe.timesteps[0])))


def model_input_scale(scheduler, timestep, like: torch.Tensor | None = None) -> torch.Tensor:
    """``c_t`` with ``scheduler.scale_model_input(x, timestep) == c_t * x`` (a 0-d tensor).

    Reads the live scheduler (Euler-type samplers look up ``sigma`` by their step index, which this
    sets the way the sampling loop's own call would).
    """
    ones = torch.ones((), device=None if like is None else like.device, dtype=torch.float32)
    return scheduler.scale_model_input(ones, timestep).reshape(())


def to_sampler_space(scheduler, latents: torch.Tensor, num_inference_steps: int) -> torch.Tensor:
    """A VP latent at the sampler's first timestep, expressed in that sampler's noise space.

    ``scheduler`` is left untouched (a copy is stepped to read the factor).
    """
    check_supported(scheduler)
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(num_inference_steps, device=latents.device)
    scale = model_input_scale(probe, probe.timesteps[0], latents)
    return (latents.float() / scale).to(latents.dtype)
