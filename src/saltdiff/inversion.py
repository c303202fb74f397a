"""DDIM inversion of a clean latent up to the noise level a sampler starts at (SALT's z_T*).

DDIM sampling (Song et al. 2021, eq. 12 with sigma=0) maps x_t to x_s (s < t) with
``x_s = sqrt(a_s) x0_pred(x_t, eps_t) + sqrt(1 - a_s) eps_t``, ``eps_t = eps_theta(x_t, t)``. Inversion runs the
same map upwards, from the clean latent to the sampler's first timestep, approximating
``eps_theta(x_t, t)`` by ``eps_theta(x_s, t)`` (the model is evaluated at the *target* timestep, as
``DDIMInverseScheduler.step`` expects). Sampling the result with the same DDIM grid mirrors each
inversion step, so it lands back near the input; the fewer the steps, the rougher the mirror.

Timestep semantics: :func:`inversion_timesteps` gives the K target timesteps
``tau_1 < ... < tau_K = end_timestep``. Step k moves the latent from ``tau_{k-1}`` (``tau_0`` = the
clean latent, whose noise level is the scheduler's "final"/"initial" alpha product: 1 with
``set_alpha_to_one=True``, ``alphas_cumprod[0]`` otherwise) to ``tau_k``. The returned latent is
x at ``end_timestep``: the latent to start a sampler whose first timestep is ``end_timestep``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from diffusers import DDIMInverseScheduler
from diffusers.utils.torch_utils import randn_tensor

from .samplers import known_config

__all__ = ["ddim_invert", "inverse_scheduler", "inversion_timesteps", "predicted_epsilon"]


def inverse_scheduler(scheduler) -> DDIMInverseScheduler:
    """A ``DDIMInverseScheduler`` with the noise schedule of the sampling ``scheduler`` (left untouched).

    Clipping is off (latents are not images in [-1, 1]). ``DDIMInverseScheduler`` accepts only
    "leading" and "trailing" spacing; the spacing is irrelevant here because
    :func:`inversion_timesteps` sets the grid itself, so "trailing" is passed for every sampler.
    ``set_alpha_to_one`` and ``steps_offset`` come from the sampler's config, so the inversion starts
    from the same clean noise level the sampler ends at. Only the keys it knows are passed (a
    DPM-Solver or Euler config carries others, which diffusers would warn about on every call), and
    it always takes an epsilon: :func:`ddim_invert` converts other predictions itself.
    """
    config = known_config(DDIMInverseScheduler, scheduler.config)
    config.update(clip_sample=False, timestep_spacing="trailing", prediction_type="epsilon")
    return DDIMInverseScheduler.from_config(config)


def predicted_epsilon(model_output, sample, alpha_prod_t, prediction_type: str) -> torch.Tensor:
    """The model's noise prediction as epsilon, converted at the noise level the model was told.

    Inversion evaluates the model at the *target* timestep on a latent at the source one;
    ``DDIMInverseScheduler`` converts ``v`` to epsilon with the source timestep's alpha, which is
    not the level the model's ``v`` refers to (0.26 against 0.07 error of z_T* at 5 steps, measured
    with the exact Gaussian v-denoiser). Here ``alpha_prod_t`` is the model's own timestep's.
    """
    if prediction_type == "epsilon":
        return model_output
    a = alpha_prod_t
    if prediction_type == "v_prediction":
        return a.sqrt() * model_output + (1 - a).sqrt() * sample
    if prediction_type == "sample":
        return (sample - a.sqrt() * model_output) / (1 - a).sqrt()
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def inversion_timesteps(scheduler, num_inference_steps: int, end_timestep: int | None = None) -> torch.Tensor:
    """The K target timesteps ``tau_1 < ... < tau_K = end_timestep`` of a K-step inversion.

    ``DDIMInverseScheduler.step(eps, tau_k, x)`` takes the latent to be at ``tau_k - r`` with
    ``r = num_train_timesteps // K`` (the clean latent when that is negative), so the grid has
    spacing ``r`` ending at ``end_timestep``: for ``end_timestep = 981`` and K = 50 it is
    ``1, 21, ..., 981``, the mirror of SD's "leading" 50-step sampler; for 999 it is
    ``19, 39, ..., 999``, the mirror of the "trailing" one. Where that grid does not fit (it would
    not start from the clean latent, e.g. 999 with K = 30, or would start below 0, e.g. 981 with
    K = 100), the grid is ``floor(k (end + 1) / K) - 1`` (diffusers' "trailing" spacing, ending at
    ``end_timestep``) provided its steps are within one timestep of ``r``: the scheduler then reads
    each step's source noise level at most one timestep off, as diffusers' own trailing DDIM does.
    Otherwise (an ``end_timestep`` far below the last one, e.g. 500 with K = 50) ``ValueError``:
    ``DDIMInverseScheduler`` cannot step that grid.

    ``end_timestep`` defaults to the last training timestep (``num_train_timesteps - 1``).
    """
    num_train = int(scheduler.config.num_train_timesteps)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train:
        raise ValueError(f"num_inference_steps must be in [1, {num_train}], got {num_inference_steps}")
    end = num_train - 1 if end_timestep is None else end_timestep
    if isinstance(end, torch.Tensor):
        if end.numel() != 1:
            raise ValueError(
                f"end_timestep must be a single timestep, got a tensor of shape {tuple(end.shape)}"
            )
        end = end.item()
    if isinstance(end, float) and end.is_integer():
        end = int(end)
    if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end < num_train:
        raise ValueError(
            f"end_timestep must be an integer timestep in [0, {num_train - 1}], got {end_timestep!r}"
        )

    grid = _grid(num_train, num_inference_steps, end)
    if grid is None:
        lowest = next(e for e in range(num_train) if _grid(num_train, num_inference_steps, e) is not None)
        raise ValueError(
            f"end_timestep={end} is too low for num_inference_steps={num_inference_steps}: "
            f"DDIMInverseScheduler steps by num_train_timesteps // num_inference_steps = "
            f"{num_train // num_inference_steps} timesteps, so {num_inference_steps} steps must end at "
            f"{lowest} or later; change num_inference_steps"
        )
    return grid


def _grid(num_train: int, k: int, end: int) -> torch.Tensor | None:
    """The grid of :func:`inversion_timesteps`, or ``None`` when the scheduler cannot step it."""
    ratio = num_train // k
    if ratio * (k - 1) <= end < ratio * k:  # exact: every step starts where the previous one ended
        return torch.arange(end - ratio * (k - 1), end + 1, ratio, dtype=torch.long)
    if end + 1 >= k and (end + 1) / k > ratio - 1:  # steps ratio +- 1 apart: source read at most 1 off
        return torch.div(torch.arange(1, k + 1) * (end + 1), k, rounding_mode="floor").long() - 1
    return None


@torch.no_grad()
def ddim_invert(
    unet,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    num_inference_steps: int,
    end_timestep: int | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    noise_scale: float = 0.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    progress_bar: Callable[[Iterable], Iterable] | None = None,
    return_trajectory: bool = False,
    model_kwargs: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """Invert the clean latent ``latents`` with ``num_inference_steps`` DDIM steps up to ``end_timestep``.

    Args:
        unet: the denoiser (``unet(x, t, encoder_hidden_states=...).sample``).
        scheduler: the pipeline's sampling scheduler; only its config is read.
        latents: ``[B, C, h, w]`` clean latents, already multiplied by the VAE scaling factor.
        prompt_embeds: ``[B or 1, T, D]`` text embeddings of the conditional branch.
        num_inference_steps: K, the number of inversion steps (UNet evaluations per branch).
        end_timestep: the timestep of the returned latent; pass the sampler's first timestep
            (``scheduler.timesteps[0]`` after ``set_timesteps``). Default: the last training
            timestep. See :func:`inversion_timesteps` for the grid.
        negative_prompt_embeds: ``[B or 1, T, D]``, required when ``guidance_scale > 1``.
        guidance_scale: 1 uses the conditional branch only (one UNet call per step); above 1,
            classifier-free guidance ``eps_u + g (eps_c - eps_u)``.
        noise_scale: 0 for deterministic DDIM inversion. Above 0, "SDE-style" stochastic
            inversion: after each step from noise level ``a_s`` to ``a_t``, add
            ``noise_scale * sqrt(1 - a_t / a_s) * z``, z ~ N(0, I): the standard deviation of the
            forward process' noise increment q(x_t | x_s), scaled.
        generator: for the noise of ``noise_scale > 0``.
        progress_bar: wraps the iteration over timesteps (e.g. a pipeline's ``progress_bar``).
        return_trajectory: also return ``[latents, x_tau_1, ..., x_tau_K]`` (K + 1 tensors).
        model_kwargs: further keyword arguments of every UNet call, for the whole batch (SDXL's
            ``added_cond_kwargs``: pooled text embeddings and ``time_ids``, with the rows of the
            batch, ``[negative; conditional]`` when ``guidance_scale > 1``).

    Returns:
        The latent at ``end_timestep`` (dtype and device of ``latents``), and the trajectory when
        ``return_trajectory``.
    """
    _check_inputs(latents, prompt_embeds, negative_prompt_embeds, guidance_scale, noise_scale)
    timesteps = inversion_timesteps(scheduler, num_inference_steps, end_timestep)
    inverse = inverse_scheduler(scheduler)
    # sets num_inference_steps, which step() uses to find each step's source timestep
    inverse.set_timesteps(num_inference_steps, device=latents.device)
    inverse.timesteps = timesteps.to(latents.device)

    batch = latents.shape[0]
    do_cfg = guidance_scale > 1.0
    cond = _expand(prompt_embeds, batch).to(device=latents.device, dtype=latents.dtype)
    if do_cfg:
        uncond = _expand(negative_prompt_embeds, batch).to(device=latents.device, dtype=latents.dtype)
        embeds = torch.cat([uncond, cond])
    else:
        embeds = cond

    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    sample = latents
    trajectory = [latents]
    ratio = int(scheduler.config.num_train_timesteps) // num_inference_steps
    iterator = progress_bar(inverse.timesteps) if progress_bar is not None else inverse.timesteps
    for t in iterator:
        model_in = torch.cat([sample] * 2) if do_cfg else sample
        model_in = inverse.scale_model_input(model_in, t)
        noise_pred = unet(model_in, t, encoder_hidden_states=embeds, **(model_kwargs or {})).sample
        if do_cfg:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        alpha_t = inverse.alphas_cumprod[int(t)].to(device=sample.device, dtype=torch.float32)
        noise_pred = predicted_epsilon(noise_pred.float(), sample.float(), alpha_t, prediction_type)
        sample = inverse.step(noise_pred.to(sample.dtype), t, sample).prev_sample
        if noise_scale > 0:
            source = int(t) - ratio
            alpha_s = inverse.alphas_cumprod[source] if source >= 0 else inverse.initial_alpha_cumprod
            alpha_t = inverse.alphas_cumprod[int(t)]
            increment = (1.0 - alpha_t / alpha_s).clamp(min=0.0).sqrt().item()
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            sample = sample + noise_scale * increment * noise
        sample = sample.to(latents.dtype)
        if return_trajectory:
            trajectory.append(sample)
    if return_trajectory:
        return sample, trajectory
    return sample


def _expand(embeds: torch.Tensor, batch: int) -> torch.Tensor:
    return embeds.expand(batch, *embeds.shape[1:]) if embeds.shape[0] == 1 and batch > 1 else embeds


def _check_inputs(latents, prompt_embeds, negative_prompt_embeds, guidance_scale, noise_scale) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 4:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a [B, C, h, w] tensor, got {shape}")
    batch = latents.shape[0]
    if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3:
        shape = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else prompt_embeds
        raise ValueError(f"prompt_embeds must be a [B, T, D] tensor, got {shape}")
    if prompt_embeds.shape[0] not in (1, batch):
        raise ValueError(
            f"prompt_embeds batch {prompt_embeds.shape[0]} does not match the latents batch {batch} (or 1)"
        )
    if not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale must be a number >= 1 (1 = no guidance), got {guidance_scale!r}")
    if guidance_scale > 1.0:
        if negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative_prompt_embeds")
        if negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:] or negative_prompt_embeds.shape[
            0
        ] not in (
            1,
            batch,
        ):
            raise ValueError(
                f"negative_prompt_embeds shape {tuple(negative_prompt_embeds.shape)} does not match "
                f"prompt_embeds {tuple(prompt_embeds.shape)} for a latents batch of {batch}"
            )
    if not isinstance(noise_scale, (int, float)) or not noise_scale >= 0.0:
        raise ValueError(f"noise_scale must be a number >= 0, got {noise_scale!r}")
