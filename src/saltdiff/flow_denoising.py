"""The sampling loop of flow-matching models (SD3, FLUX), on the family seam.

:func:`flow_denoise` is :func:`saltdiff.denoising.denoise`'s counterpart for a
:class:`~saltdiff.families.FamilyAdapter` of the ``"flow"`` noise family: classifier-free guidance
over ``[negative; conditional]`` rows, joint attention captured on the conditional rows into a
:class:`~saltdiff.joint_attention.JointAttentionStore` (restored on exit by the adapter's
``capture``), :func:`saltdiff.guidance.guided_update` on the first ``guidance_steps`` steps, the
layout energy of every step, and one step of the (flow Euler) scheduler. It knows nothing about
how the initial latent was made (plug-and-play).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from .denoising import Denoised, NoBar, stop_after
from .families import Conditions
from .guidance import GuidanceConfig, GuidanceTargets, guided_update, layer_losses
from .joint_attention import JointAttentionStore
from .losses import layout_guidance_loss
from .noise import guided_step_scale

__all__ = ["flow_denoise"]


def flow_denoise(
    adapter,
    scheduler,
    latents: torch.Tensor,
    conditions: Conditions,
    *,
    guidance_scale: float,
    token_indices: list[list[int]] | None = None,
    layout_masks: Callable[[int, int], torch.Tensor] | None = None,
    guidance: GuidanceConfig | None = None,
    layers: Sequence[str] | None = None,
    unboxed_indices: Sequence[int] = (),
    collect_maps: bool = False,
    on_step: Callable | None = None,
    interrupted: Callable[[], bool] = lambda: False,
    progress_bar=None,
    cfg_batch: bool = True,
) -> Denoised:
    """Flow-matching sampling over ``scheduler.timesteps`` (set by the caller), as diffusers' SD3 loop.

    Every network call is ``adapter.denoise`` at the scheduler's own sigma of the step (SD3's adapter
    turns it into exactly the pipeline's timestep ``t``), so without guidance this is the diffusers
    loop step for step.
    ``conditions`` holds the CFG rows ``[negative; conditional]`` when ``guidance_scale > 1``.
    With ``token_indices`` the joint attention of ``layers`` is captured on the conditional rows
    (layout energy, step-averaged maps); with ``guidance`` the first ``guidance_steps`` steps take
    guided updates, their gradient step scaled by ``noise.guided_step_scale("flow", sigma)``
    (``sigma^2``; ``step_size_schedule="constant"``: 1). ``on_step(i, t, latents, conditions)``
    returns ``(latents, conditions)`` (a step callback).

    ``cfg_batch``: the CFG rows in one network call (``StableDiffusion3Pipeline``), or one call per
    branch (``FluxPipeline``'s true CFG; the negative one first here, so that the store keeps the
    conditional maps): each family keeps its diffusers pipeline's arithmetic, bit for bit. A guided pass stops after its last captured layer
    (:func:`saltdiff.denoising.stop_after`): the later blocks feed nothing the loss reads, so they
    would only hold activations for autograd; the gradient is the same.
    """
    n = latents.shape[0]
    do_cfg = conditions.batch == 2 * n
    cond = conditions.rows(slice(n, 2 * n)) if do_cfg else conditions
    track = token_indices is not None and len(token_indices) > 0
    guide = track and guidance is not None and guidance.enabled and layout_masks is not None
    targets = tracking = None
    if track and layout_masks is not None:
        tracking = GuidanceTargets(token_indices, layout_masks)
        targets = GuidanceTargets(token_indices, layout_masks, list(unboxed_indices))
    layout_losses: list[float] = []
    guidance_losses: list[list[float]] = []
    maps_sum = None
    steps_run = 0
    timesteps = scheduler.timesteps
    store = JointAttentionStore()
    capture = adapter.capture(layers, store) if track else contextlib.nullcontext(store)
    last_layer = None
    if guide:
        last_layer = list(layers or adapter.attention_layers(tuple(latents.shape[-2:])))[-1]
    bar = NoBar() if progress_bar is None else progress_bar
    with capture, bar as progress_bar:
        for i, t in enumerate(timesteps):
            if interrupted():
                continue
            steps_run += 1
            # the scheduler's own sigma of this step: adapter.timestep(sigma) is exactly t
            sigma = scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else i]
            if guide and i < guidance.guidance_steps:
                store.batch_rows = None

                def conditional(z, sigma=sigma, cond=cond):
                    with stop_after(adapter.transformer, last_layer):
                        adapter.denoise(z, sigma, cond)

                scale = 1.0
                if guidance.step_size_schedule == "sigma":
                    scale = float(guided_step_scale("flow", float(sigma)))
                result = guided_update(conditional, latents, store, targets, guidance, scale)
                guidance_losses.append(result.losses)
                latents = result.latents
            if do_cfg and not cfg_batch:  # the negative call first: the store keeps the conditional maps
                negative_pred = adapter.denoise(latents, sigma, conditions.rows(slice(0, n)))
            store.batch_rows = slice(n, 2 * n) if do_cfg and cfg_batch else None
            store.reset()
            if do_cfg and cfg_batch:
                noise_pred = adapter.denoise(torch.cat([latents] * 2), sigma, conditions)
            else:
                noise_pred = adapter.denoise(latents, sigma, cond)
            if track:
                if tracking is not None:
                    layout_losses.append(float(layer_losses(store, tracking, layout_guidance_loss)))
                if collect_maps:
                    per_layer = store.phrase_maps_per_layer(token_indices)
                    size = tuple(latents.shape[-2:])
                    maps = torch.stack(
                        [
                            torch.nn.functional.interpolate(m.float(), size=size, mode="bilinear")
                            for m in per_layer
                        ]
                    ).mean(0)
                    maps_sum = maps if maps_sum is None else maps_sum + maps
                store.reset()
            if do_cfg:
                uncond, text = noise_pred.chunk(2) if cfg_batch else (negative_pred, noise_pred)
                noise_pred = uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                latents, conditions = on_step(i, t, latents, conditions)
                cond = conditions.rows(slice(n, 2 * n)) if do_cfg else conditions
            progress_bar.update()
    mean_maps = None if maps_sum is None else maps_sum / max(steps_run, 1)
    return Denoised(latents, layout_losses, guidance_losses, mean_maps)
