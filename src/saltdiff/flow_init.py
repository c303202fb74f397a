"""SALT's initial latent on a flow-matching model (SD3, FLUX): reference → VAE → flow inversion.

The flow counterpart of :meth:`saltdiff.init.SpatialAwareInit.__call__`, reading the same
``SpatialAwareInit`` fields (reference builder, ``inversion_steps``, ``inversion_prompt``, fresh-noise
blend), so ``init="salt"``, the registry's params and the recipe mean one thing on every family.
It gets the :class:`~saltdiff.init_context.InitContext` the flow pipeline builds from its family
adapter (:meth:`saltdiff.flow_pipeline.FlowSaltMixin.init_context`), never the pipeline.
What differs: the latent is the family adapter's (``encode``: SD3's scaling and shift), the
inversion is :func:`saltdiff.flow_inversion.flow_invert` on the sampler's own sigma grid (no
``DDIMInverseScheduler`` exists for flow matching), and the result is already in the sampler's
space (a flow sampler's ``c_in`` is 1: :func:`saltdiff.noise.model_input_scale`).
"""

from __future__ import annotations

import hashlib
import json

import torch
from diffusers.utils.torch_utils import randn_tensor

from .flow_inversion import flow_invert, inversion_sigmas, sampler_sigmas
from .init import FLOW_INVERSION_STEPS, InitResult, SpatialAwareInit
from .init_context import InitContext
from .layout import Layout

__all__ = ["FLOW_INVERSION_METHOD", "FLOW_INVERSION_STEPS", "flow_memo_key", "flow_salt_start"]

#: The default flow integrator of SALT's inversion (``SpatialAwareInit.inversion_method``, one of
#: :data:`saltdiff.flow_inversion.FLOW_INVERSION_METHODS`): reverse Euler, one transformer call per
#: inversion step, like DDIM inversion on the UNet models.
FLOW_INVERSION_METHOD = "euler"


def flow_salt_start(
    init: SpatialAwareInit,
    ctx: InitContext,
    prompt: str,
    layout: Layout,
    generator,
    *,
    height: int,
    width: int,
    num_inference_steps: int,
    num_images: int,
) -> InitResult:
    """SALT's initial latent on a flow model: reference → VAE → flow inversion → fresh noise outside.

    Unset fields of ``init`` take the flow values (:meth:`~saltdiff.init.SpatialAwareInit.resolved`:
    feather, object steps, depth). ``ctx`` gives the reference builder its object generator
    (``ctx.objects``), the scheduler, the
    reference's VAE latent (``ctx.encode_reference``: the image processor and the adapter's
    ``encode``), the velocity of a text (``ctx.velocity``) and the family's sigma grid
    (``ctx.schedule_kwargs``).

    The inversion runs ``init.inversion_steps`` (unset: :data:`FLOW_INVERSION_STEPS`) steps of
    ``init.inversion_method`` (reverse Euler or midpoint) on the sampler's own sigma grid
    for that many steps (:func:`~saltdiff.flow_inversion.inversion_sigmas`, with the sampler's
    ``mu``), ending at the first sigma of the ``num_inference_steps`` the call samples, with the
    velocity of the empty prompt (or the prompt, ``inversion_prompt="prompt"``) at guidance scale 1.
    Fresh noise is blended in as :class:`~saltdiff.init.SpatialAwareInit` does (variance preserving,
    ``noise_outside`` outside the kept region, ``noise_inside`` inside).

    The inversion is deterministic: the pipeline keeps the last few z_T* (``ctx.memo``, by
    :func:`flow_memo_key`), so the same layout with another seed inverts once.
    """
    if init.inversion_noise_scale > 0:
        raise ValueError(
            f"inversion_noise_scale={init.inversion_noise_scale} is not supported on flow models yet (flow inversion is deterministic)"
        )
    init = init.resolved(ctx.scheduler, num_inference_steps)  # the flow values of unset fields
    reference = init.reference.build(
        ctx.objects, prompt, layout, height=height, width=width, generator=generator
    )
    if reference.image.size != (width, height):
        raise ValueError(
            f"reference builder returned a {reference.image.size} image, expected {(width, height)}"
        )
    latent_hw = (height // ctx.vae_scale_factor, width // ctx.vae_scale_factor)
    start = float(sampler_sigmas(ctx.scheduler, **ctx.schedule_kwargs(num_inference_steps, latent_hw))[0])
    depth = init.inversion_steps
    # the family's own grid for `depth` steps (FLUX: custom sigmas for that count, shifted by mu)
    grid = inversion_sigmas(ctx.scheduler, **ctx.schedule_kwargs(depth, latent_hw))
    if abs(float(grid[-1]) - start) > 1e-6:  # a schedule whose top depends on the step count
        grid = grid[grid < start]
        grid = torch.cat([grid, grid.new_tensor([start])])
    text = prompt if init.inversion_prompt == "prompt" else ""

    def invert() -> torch.Tensor:
        x0 = ctx.encode_reference(reference.image)
        return flow_invert(ctx.velocity(text), x0.to(ctx.dtype), grid, method=init.inversion_method)

    latents = ctx.memo.get_or_compute(flow_memo_key(init, ctx, reference.image, text, grid), invert)
    latents = latents.expand(num_images, -1, -1, -1).clone()
    if init.noise_outside > 0 or init.noise_inside > 0:
        keep = init.kept_region(layout, reference, latent_hw).to(latents)
        weight = init.noise_inside * keep + init.noise_outside * (1 - keep)
        noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        latents = torch.sqrt(1 - weight) * latents + torch.sqrt(weight) * noise
    info = {
        "init": "salt",
        "inversion_steps": depth,
        "inversion_prompt": init.inversion_prompt,
        "inversion_method": init.inversion_method,
        "inversion_sigmas": [round(float(s), 6) for s in grid],
    }
    if reference.free_boxes:  # where the unboxed objects were placed (saltdiff.placement.free_boxes)
        info["placed_unboxed"] = [b.to_dict() for b in reference.free_boxes]
    return InitResult(latents, reference, info)


def flow_memo_key(
    init: SpatialAwareInit, ctx: InitContext, image, text: str, grid: torch.Tensor
) -> str | None:
    """Everything a flow z_T* depends on, hashed: the model (``None``, nothing kept, for an in-memory
    model or with the reference builder's cache off, as :func:`saltdiff.init.inversion_memo_key`),
    the device, the reference's pixels, the inversion text and grid, the integrator and the
    adapter's conditioning (``ctx.conditioning_key``: the family, T5 length, FLUX's embedded
    guidance, ``joint_attention_kwargs``)."""
    identity = ctx.objects.identity
    if not identity or not getattr(init.reference, "cache", True):
        return None
    parts = [
        identity,
        str(ctx.device),
        image.size,
        hashlib.sha256(image.convert("RGB").tobytes()).hexdigest(),
        text,
        [float(s) for s in grid],
        init.inversion_method,
        *ctx.conditioning_key,
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()
