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
from dataclasses import dataclass

import torch

from .denoising import Denoised, NoBar, no_grad_after, stop_after
from .families import Conditions
from .guidance import GuidanceConfig, GuidanceTargets, guided_update, layer_losses
from .joint_attention import JointAttentionStore
from .losses import layout_guidance_loss
from .noise import guided_step_scale

__all__ = ["FlowOutsidePrompt", "flow_denoise"]


@dataclass
class FlowOutsidePrompt:
    """A second text condition for the area outside every box, on the first ``steps`` steps (the flow
    loop's :class:`saltdiff.denoising.OutsidePrompt`).

    ``mask(h, w)`` is 1 inside the boxes; outside them ``conditions`` (one row per latent) give the
    prediction of the branch ``replaces`` names:

    * ``"negative"``: ``conditions`` encode the boxed phrases, and the negative branch of CFG becomes
      their prediction there, so CFG pushes away from the boxed objects outside their boxes (needs a
      negative branch: SD3's CFG, FLUX's true CFG);
    * ``"conditional"``: ``conditions`` encode the prompt without its boxed phrases, and the
      conditional branch becomes ``m u(prompt) + (1 - m) u(outside)`` (no negative branch needed).
    """

    conditions: Conditions
    mask: Callable[[int, int], torch.Tensor]
    steps: int
    replaces: str = "conditional"


def _branches(
    adapter, latents, sigma, conditions: Conditions, n: int, store, cfg_batch: bool, outside, conditional=None
):
    """``(negative or None, conditional, outside or None)`` predictions of one step.

    Batched (SD3): one call on ``[negative;] conditional [; outside]`` rows. Separate (FLUX): one
    call per branch, the conditional one last so that ``store`` holds its maps. Either way the
    store keeps the conditional rows only. ``conditional`` given (the guided pass's prediction at
    ``latents``): only the other branches run, uncaptured.
    """
    do_cfg = conditions.batch == 2 * n
    rows: dict[str, Conditions] = {}
    if do_cfg:
        rows["negative"] = conditions.rows(slice(0, n))
    if conditional is None:
        rows["conditional"] = conditions.rows(slice(n, 2 * n)) if do_cfg else conditions
    if outside is not None:
        rows["outside"] = outside.conditions
    preds: dict[str, torch.Tensor] = {} if conditional is None else {"conditional": conditional}
    if rows:
        captured = list(rows).index("conditional") if "conditional" in rows else None
        store.enabled = False
        try:
            if cfg_batch:
                if captured is not None:
                    store.enabled = True
                    store.batch_rows = slice(captured * n, (captured + 1) * n) if len(rows) > 1 else None
                    store.reset()
                batch = Conditions.cat(*rows.values()) if len(rows) > 1 else next(iter(rows.values()))
                inputs = torch.cat([latents] * len(rows)) if len(rows) > 1 else latents
                preds.update(zip(rows, adapter.denoise(inputs, sigma, batch).split(n)))
            else:
                for name in sorted(rows, key=lambda name: name == "conditional"):  # the conditional one last
                    if name == "conditional":
                        store.enabled = True
                        store.batch_rows = None
                        store.reset()
                    preds[name] = adapter.denoise(latents, sigma, rows[name])
        finally:
            store.enabled = True
    return preds.get("negative"), preds["conditional"], preds.get("outside")


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
    outside: FlowOutsidePrompt | None = None,
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
    would only hold activations for autograd; the gradient is the same. ``outside``: on its first
    ``steps`` steps, outside the boxes its prediction replaces one branch (:class:`FlowOutsidePrompt`).
    """
    n = latents.shape[0]
    do_cfg = conditions.batch == 2 * n
    if outside is not None and outside.replaces == "negative" and not do_cfg:
        raise ValueError(
            "an outside prompt that replaces the negative branch needs CFG rows [negative; conditional]"
        )
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
    if guidance is not None:
        store.mixing_gradient = guidance.guided_gradient == "full"
    capture = adapter.capture(layers, store) if track else contextlib.nullcontext(store)
    last_layer = None
    if guide:
        last_layer = list(layers or adapter.attention_layers(tuple(latents.shape[-2:])))[-1]
    reuse = guide and guidance.prediction_kind == "guided-pass"

    def step_diagnostics(size) -> tuple[float | None, torch.Tensor | None]:
        """The layout energy and (with ``collect_maps``) the phrase maps of what ``store`` holds."""
        with torch.no_grad():
            energy = None
            if tracking is not None:
                energy = float(layer_losses(store, tracking, layout_guidance_loss))
            maps = None
            if collect_maps:
                per_layer = store.phrase_maps_per_layer(token_indices)
                maps = torch.stack(
                    [
                        torch.nn.functional.interpolate(m.float(), size=tuple(size), mode="bilinear")
                        for m in per_layer
                    ]
                ).mean(0)
        return energy, maps

    bar = NoBar() if progress_bar is None else progress_bar
    with capture, bar as progress_bar:
        for i, t in enumerate(timesteps):
            if interrupted():
                continue
            steps_run += 1
            # the scheduler's own sigma of this step: adapter.timestep(sigma) is exactly t
            sigma = scheduler.sigmas[scheduler.step_index if scheduler.step_index is not None else i]
            regional = outside is not None and i < outside.steps
            guided = None  # the guided pass's (prediction, latent it ran on, diagnostics), when reused
            if guide and i < guidance.guidance_steps:
                store.batch_rows = None
                diagnostics: list = []

                def conditional(z, sigma=sigma, cond=cond, diagnostics=diagnostics, size=latents.shape[-2:]):
                    if not reuse:
                        with stop_after(adapter.transformer, last_layer):
                            adapter.denoise(z, sigma, cond)
                        return None
                    with no_grad_after(adapter.transformer, last_layer):
                        prediction = adapter.denoise(z, sigma, cond)
                    diagnostics[:] = [step_diagnostics(size)]
                    return prediction

                scale = 1.0
                if guidance.step_size_schedule == "sigma":
                    scale = float(guided_step_scale("flow", float(sigma)))
                result = guided_update(conditional, latents, store, targets, guidance, scale)
                guidance_losses.append(result.losses)
                latents = result.latents
                if result.prediction is not None:
                    guided = (result.prediction, result.predicted_at, diagnostics[0])
            if guided is None:
                uncond, text, outside_pred = _branches(
                    adapter, latents, sigma, conditions, n, store, cfg_batch, outside if regional else None
                )
                energy, maps = step_diagnostics(latents.shape[-2:]) if track else (None, None)
            else:
                # the update goes into the step: every branch at the latent the guided pass ran on
                prediction, at, (energy, maps) = guided
                uncond, text, outside_pred = _branches(
                    adapter,
                    at,
                    sigma,
                    conditions,
                    n,
                    store,
                    cfg_batch,
                    outside if regional else None,
                    prediction,
                )
            if track:
                if energy is not None:
                    layout_losses.append(energy)
                if maps is not None:
                    maps_sum = maps if maps_sum is None else maps_sum + maps
                store.reset()
            if outside_pred is not None:  # outside the boxes the outside prompt takes over its branch
                inside = outside.mask(*latents.shape[-2:]).to(text)
                if outside.replaces == "negative":
                    uncond = uncond * inside + outside_pred * (1 - inside)
                else:
                    text = text * inside + outside_pred * (1 - inside)
            noise_pred = text if uncond is None else uncond + guidance_scale * (text - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if on_step is not None:
                latents, conditions = on_step(i, t, latents, conditions)
                cond = conditions.rows(slice(n, 2 * n)) if do_cfg else conditions
            progress_bar.update()
    mean_maps = None if maps_sum is None else maps_sum / max(steps_run, 1)
    return Denoised(latents, layout_losses, guidance_losses, mean_maps)
