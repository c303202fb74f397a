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
updates use the same factor to take their gradient steps in VP space (see
:func:`saltdiff.denoising.denoise`), so a step size means the same thing under every sampler.

Ancestral samplers (Euler a) add fresh noise at every step: from ``sigma`` to ``sigma'`` the noise
``x`` carries is ``sigma'^2 / sigma`` of the old one plus fresh noise, so of the start's own noise --
where DDIM inversion puts the reference's layout -- only ``sigma / sigma_start`` is left at level
``sigma``, however many steps are taken (a deterministic sampler keeps all of it). Starting such a
sampler lower keeps more: :func:`ancestral_start_skip` is how many of the noisiest steps of a
``steps + k`` schedule SALT's start skips, :func:`set_sampler_timesteps` sets that schedule the way
diffusers' img2img does (``set_begin_index``) and returns the timesteps to run, and
``sampler_start_timestep`` / ``to_sampler_space`` take the same ``skip``. The measurements behind
the default (``ancestral_skip`` 0.14) are in ``benchmarks/RESULTS.md`` ("``salt`` under each
sampler"); ``scripts/sampler_variants.py`` reruns the probes.
"""

from __future__ import annotations

import inspect
import math

import torch

from .noise import vp_schedule
from .registry import SCHEDULERS

__all__ = [
    "ANCESTRAL_CLASSES",
    "ancestral_start_skip",
    "check_supported",
    "config_family",
    "ddim_twin",
    "default_sampler",
    "family_samplers",
    "known_config",
    "make_scheduler",
    "is_ancestral",
    "model_input_scale",
    "sampler_family",
    "sampler_start_timestep",
    "scheduler_name",
    "set_sampler_timesteps",
    "to_sampler_space",
]

#: diffusers samplers that draw fresh noise at every step whatever their options.
ANCESTRAL_CLASSES = frozenset(
    {
        "EulerAncestralDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "DDPMScheduler",
        "DPMSolverSDEScheduler",
    }
)


#: What users call the two noise families (:data:`saltdiff.noise.NOISE_FAMILIES`) in messages.
_FAMILY_TEXT = {"vp": "VP (DDPM-noise: SD 1.x/2.x/XL)", "flow": "flow-matching (SD3, FLUX)"}


def sampler_family(name: str) -> str:
    """``"flow"`` for a registered flow-matching sampler (``FlowMatch*`` classes), else ``"vp"``."""
    cls = str(SCHEDULERS.get(name).target).partition(":")[2]
    return "flow" if cls.startswith("FlowMatch") else "vp"


def config_family(config) -> str | None:
    """The noise family a scheduler ``config`` belongs to: ``"vp"`` (a beta schedule), ``"flow"``
    (a flow ``shift`` and no betas), ``None`` when it says neither."""
    if "beta_start" in config or "trained_betas" in config or "beta_schedule" in config:
        return "vp"
    if "shift" in config:
        return "flow"
    return None


def family_samplers(family: str) -> list[str]:
    """The registered samplers of one noise family, in registration order."""
    return [n for n in SCHEDULERS.names() if sampler_family(n) == family]


def default_sampler(scheduler) -> str:
    """The sampler a run uses unless told: ``"flow-euler"`` for a flow model's scheduler, else ``"ddim"``."""
    return "flow-euler" if config_family(scheduler.config) == "flow" else "ddim"


def make_scheduler(name: str, config):
    """The registered sampler ``name`` built from ``config`` (a scheduler's config: same noise schedule).

    A sampler of the other noise family than the model's (a VP sampler on a flow model's config, or
    the flow sampler on a VP one) is one ``ValueError`` line: ``from_config`` would drop the schedule
    silently and sample a different model."""
    entry = SCHEDULERS.get(name)
    model, sampler = config_family(config), sampler_family(name)
    if model is not None and model != sampler:
        raise ValueError(
            f"scheduler {name!r} is a {_FAMILY_TEXT[sampler]} sampler, but this model's noise schedule is "
            f"{_FAMILY_TEXT[model]}: choose one of {family_samplers(model)}"
        )
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
    if vp_schedule(scheduler) is None or not hasattr(scheduler, "scale_model_input"):
        raise ValueError(
            f"scheduler {type(scheduler).__name__} is not supported: saltdiff needs a discrete DDPM noise "
            f"schedule (alphas_cumprod), as Stable Diffusion 1.x/2.x/XL samplers have; choose one of "
            f"{family_samplers('vp')} (pipe.scheduler = ...from_config(pipe.scheduler.config)); flow-matching "
            "models (SD3) run with SaltSD3Pipeline"
        )


def is_ancestral(scheduler) -> bool:
    """Whether ``scheduler`` adds fresh noise at every step (Euler a, DDPM, the SDE DPM-Solvers)."""
    if type(scheduler).__name__ in ANCESTRAL_CLASSES:
        return True
    return str(getattr(scheduler.config, "algorithm_type", "")).startswith("sde-")


def ancestral_start_skip(scheduler, num_inference_steps: int, fraction: float) -> int:
    """How many noisiest steps SALT's start skips under ``scheduler``: 0 for a deterministic sampler,
    else ``k`` with ``k / (steps + k)`` closest to ``fraction`` (25 steps, 0.14: 4; 50 steps: 8)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction!r}")
    if fraction == 0 or not is_ancestral(scheduler):
        return 0
    return int(math.floor(num_inference_steps * fraction / (1 - fraction) + 0.5))


def set_sampler_timesteps(scheduler, num_inference_steps: int, *, skip: int = 0, device=None) -> torch.Tensor:
    """``scheduler.set_timesteps(num_inference_steps)`` and the timesteps to run, all of them; with
    ``skip``: the schedule of ``num_inference_steps + skip`` steps and all but its ``skip`` noisiest
    steps (times the sampler's ``order``), still ``num_inference_steps`` UNet steps.

    As diffusers' img2img pipelines do it: ``scheduler.timesteps`` stays whole (multistep samplers
    read its length to find their last step) and ``set_begin_index`` tells index-keeping samplers
    (Euler, LMS, DPM-Solver) where they start; DDIM-type samplers read the step from the timestep.
    The loop must run the returned timesteps, not ``scheduler.timesteps``.
    """
    if skip < 0:
        raise ValueError(f"skip must be >= 0, got {skip!r}")
    scheduler.set_timesteps(num_inference_steps + skip, device=device)
    cut = skip * int(getattr(scheduler, "order", 1))
    if cut and hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(cut)
    return scheduler.timesteps[cut:]


def sampler_start_timestep(scheduler, num_inference_steps: int, skip: int = 0) -> int:
    """The sampler's first timestep, rounded (Euler's are floats), computed on a copy of ``scheduler``
    (``skip``: as :func:`set_sampler_timesteps`)."""
    probe = type(scheduler).from_config(scheduler.config)
    return int(round(float(set_sampler_timesteps(probe, num_inference_steps, skip=skip)[0])))


def model_input_scale(scheduler, timestep, like: torch.Tensor | None = None) -> torch.Tensor:
    """``c_t`` with ``scheduler.scale_model_input(x, timestep) == c_t * x`` (a 0-d tensor).

    Reads the live scheduler (Euler-type samplers look up ``sigma`` by their step index, which this
    sets the way the sampling loop's own call would).
    """
    ones = torch.ones((), device=None if like is None else like.device, dtype=torch.float32)
    return scheduler.scale_model_input(ones, timestep).reshape(())


def to_sampler_space(
    scheduler, latents: torch.Tensor, num_inference_steps: int, skip: int = 0
) -> torch.Tensor:
    """A VP latent at the sampler's first timestep, expressed in that sampler's noise space.

    ``scheduler`` is left untouched (a copy is stepped to read the factor); ``skip``: as
    :func:`set_sampler_timesteps`.
    """
    check_supported(scheduler)
    probe = type(scheduler).from_config(scheduler.config)
    first = set_sampler_timesteps(probe, num_inference_steps, skip=skip, device=latents.device)[0]
    scale = model_input_scale(probe, first, latents)
    return (latents.float() / scale).to(latents.dtype)
