"""The sampling loop shared by a layout call and by object generation: CFG, guidance, callbacks.

One function, :func:`denoise`, runs a scheduler over its timesteps with classifier-free guidance;
given a layout it also captures cross-attention, takes SALT's guided gradient steps on the first
steps and records the layout energy. It knows nothing about how the initial latent was made (plug-and-play).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .attention import AttentionStore, capture_cross_attention, select_layers
from .guidance import GuidanceConfig, GuidanceTargets, guided_update, layer_losses, step_scale
from .losses import layout_guidance_loss
from .noise import vp_noise_variance, vp_schedule
from .samplers import model_input_scale

__all__ = [
    "Denoised",
    "LoopState",
    "NoBar",
    "OutsidePrompt",
    "UNetExtras",
    "denoise",
    "no_grad_after",
    "step_callback",
]


class NoBar:
    """A progress bar that shows nothing (object generations, quiet runs)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


class _StopForward(Exception):
    """Raised by :func:`stop_after` once the last captured layer has run."""


@contextmanager
def stop_after(unet, layer: str) -> Iterator[None]:
    """End a UNet forward right after ``layer`` (a module name) has run, silently.

    A guided pass needs only the captured attention maps: the layers after the last captured one
    feed nothing the loss reads, so running them under autograd only stores activations (SDXL at
    1024², fp16: 6.8 GiB saved for the whole UNet, 3.8 GiB up to its default layers) and time. The
    gradient is the same either way: backward visits only what the loss depends on.
    """

    def hook(module, args, output):
        raise _StopForward

    handle = unet.get_submodule(layer).register_forward_hook(hook)
    try:
        yield
    except _StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def no_grad_after(model, layer: str) -> Iterator[None]:
    """Run the rest of a forward without autograd once ``layer`` (a module name) has run.

    A guided pass whose output is also used (``guided_prediction="guided-pass"``) runs the whole
    denoiser, but the loss reads nothing after the last captured layer: from there on no graph is
    built (no activations kept); the output comes back without gradient.
    """
    previous = torch.is_grad_enabled()

    def hook(module, args, output):
        torch.set_grad_enabled(False)

    handle = model.get_submodule(layer).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        torch.set_grad_enabled(previous)


@dataclass
class LoopState:
    """What a step callback may change between steps, as in diffusers' loops."""

    embeds: torch.Tensor
    guidance_scale: float


@dataclass
class UNetExtras:
    """UNet inputs besides latent, timestep and text: LoRA scale, LCM's ``timestep_cond``, IP-Adapter,
    SDXL's added conditioning.

    ``image_embeds`` are diffusers' IP-Adapter embeddings (``[negative; conditional]`` rows when
    ``image_embeds_cfg``); ``added_cond`` the UNet's other ``added_cond_kwargs`` (SDXL:
    ``{"text_embeds": pooled, "time_ids": add_time_ids}``, ``[negative; conditional]`` rows when
    ``added_cond_cfg``). :meth:`kwargs` gives the rows a CFG batch or a conditional-only pass needs.
    """

    cross_attention_kwargs: dict | None = None
    timestep_cond: torch.Tensor | None = None
    image_embeds: list[torch.Tensor] | None = None
    image_embeds_cfg: bool = False
    added_cond: dict[str, torch.Tensor] | None = None
    added_cond_cfg: bool = False

    def kwargs(self, cfg_batch: bool, outside: OutsidePrompt | None = None) -> dict[str, Any]:
        """For a batch ``[uncond;] cond [; outside]``: the outside rows (when ``outside`` is given)
        repeat the rows they replace (``outside.replaces``: the conditional or the negative ones),
        except the added conditions of the outside text itself (``outside.added_cond``: its pooled
        embeds)."""
        replaces_negative = outside is not None and outside.replaces == "negative"
        outside_added = (outside.added_cond or {}) if outside is not None else {}

        def rows(neg, cond, extra=None):
            outside_rows = (
                []
                if outside is None
                else [extra if extra is not None else neg if replaces_negative else cond]
            )
            return torch.cat([*([neg] if cfg_batch else []), cond, *outside_rows])

        out: dict[str, Any] = {}
        if self.cross_attention_kwargs:
            out["cross_attention_kwargs"] = self.cross_attention_kwargs
        if self.timestep_cond is not None:
            out["timestep_cond"] = rows(self.timestep_cond, self.timestep_cond)
        added: dict[str, Any] = {}
        for key, value in (self.added_cond or {}).items():
            neg, cond = value.chunk(2) if self.added_cond_cfg else (value, value)
            added[key] = rows(neg, cond, outside_added.get(key))
        if self.image_embeds is not None:
            pairs = [e.chunk(2) if self.image_embeds_cfg else (e, e) for e in self.image_embeds]
            added["image_embeds"] = [rows(neg, cond) for neg, cond in pairs]
        if added:
            out["added_cond_kwargs"] = added
        return out


@dataclass
class OutsidePrompt:
    """A second text condition for the area outside every box, on the first ``steps`` steps.

    ``mask(h, w)`` is 1 inside the boxes, and ``replaces`` says which row of the CFG pair the
    outside condition (``embeds``, ``[n, T, D]``) takes over there:

    * ``"negative"``: ``embeds`` encode the boxed phrases; outside the boxes the unconditional
      prediction becomes ``eps(boxed phrases)``, so CFG pushes away from the boxed objects there
      while the whole prompt (background, unboxed objects) stays the positive condition;
    * ``"conditional"``: ``embeds`` encode the prompt without its boxed phrases, and the
      conditional prediction becomes ``m * eps(prompt) + (1 - m) * eps(outside)``.

    Either way the fresh noise outside the boxes grows fewer copies of the boxed objects.
    ``added_cond``: the outside text's own added conditioning (SDXL's pooled embeddings), ``None``
    when there is none.
    """

    embeds: torch.Tensor
    mask: Callable[[int, int], torch.Tensor]
    steps: int
    added_cond: dict[str, torch.Tensor] | None = None
    replaces: str = "conditional"


@dataclass
class Denoised:
    latents: torch.Tensor
    layout_losses: list[float]
    guidance_losses: list[list[float]]
    mean_maps: torch.Tensor | None  # [B, K, h, w] phrase maps averaged over steps


#: diffusers' SDXL callback tensor names → keys of ``UNetExtras.added_cond``.
ADDED_COND_INPUTS = {"add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}


def step_callback(pipe, callback, names, negative_embeds, extras: UNetExtras):
    """diffusers' ``callback_on_step_end`` as the loop's ``on_step``.

    The callback sees (and may replace) the latents, the CFG text batch and SDXL's added conditions
    (``add_text_embeds``, ``add_time_ids``) under diffusers' names; ``pipe._guidance_scale`` is read
    back after it, so ``SDCFGCutoffCallback``/``SDXLCFGCutoffCallback`` can end CFG mid-loop.
    """

    def on_step(i, t, latents, state: LoopState):
        local = {"latents": latents, "prompt_embeds": state.embeds, "negative_prompt_embeds": negative_embeds}
        for name, key in ADDED_COND_INPUTS.items():
            if extras.added_cond and key in extras.added_cond:
                local[name] = extras.added_cond[key]
        outputs = callback(pipe, i, t, {k: local[k] for k in names}) or {}
        state.embeds = outputs.pop("prompt_embeds", state.embeds)
        for name, key in ADDED_COND_INPUTS.items():
            if name in outputs:
                extras.added_cond[key] = outputs.pop(name)
                extras.added_cond_cfg = extras.added_cond[key].shape[0] == 2 * latents.shape[0]
        state.guidance_scale = pipe._guidance_scale
        return outputs.pop("latents", latents)

    return on_step


def denoise(
    unet,
    latents: torch.Tensor,
    *,
    scheduler,
    embeds: torch.Tensor,
    guidance_scale: float,
    extra_step_kwargs: dict,
    extras: UNetExtras | None = None,
    token_indices: list[list[int]] | None = None,
    layout_masks: Callable[[int, int], torch.Tensor] | None = None,
    guidance: GuidanceConfig | None = None,
    unboxed_indices: Sequence[int] = (),
    collect_maps: bool = False,
    on_step: Callable[[int, Any, torch.Tensor, LoopState], torch.Tensor] | None = None,
    interrupted: Callable[[], bool] = lambda: False,
    outside: OutsidePrompt | None = None,
    progress_bar=None,
    timesteps: Sequence | None = None,
) -> Denoised:
    """The sampling loop: guided updates on the first steps, then one CFG step of ``scheduler``.

    ``embeds`` is diffusers' text batch: ``[negative; conditional]`` rows under classifier-free
    guidance, the conditional rows alone otherwise. A step callback (``on_step``) may replace the
    embeddings and the guidance scale as diffusers' callbacks do (``SDCFGCutoffCallback``).
    Attention is captured only when ``token_indices`` is given (the capture processor computes
    attention explicitly, the default one does not); ``layout_masks`` turns on the per-step layout
    energy, ``guidance`` the guided updates, ``collect_maps`` the step-averaged phrase maps.
    """
    n = latents.shape[0]
    extras = extras or UNetExtras()
    state = LoopState(embeds, guidance_scale)
    timesteps = scheduler.timesteps if timesteps is None else timesteps
    track = token_indices is not None
    guide = track and guidance is not None and guidance.enabled and layout_masks is not None
    if guide and None in (guidance.guidance_steps, guidance.guidance_iters, guidance.loss_threshold):
        raise ValueError("the guidance budget is unset: pass guidance.for_start(from_reference) to the loop")
    targets = tracking = None
    if layout_masks is not None:
        tracking = GuidanceTargets(token_indices=token_indices, layout_masks=layout_masks)
        targets = GuidanceTargets(token_indices, layout_masks, list(unboxed_indices))
    layout_losses: list[float] = []
    guidance_losses: list[list[float]] = []
    maps_sum: torch.Tensor | None = None
    layers = guidance.layers if guidance is not None else "default"
    capture = capture_cross_attention(unet, layers) if track else nullcontext(AttentionStore())
    check_loss = guidance.loss_fn() if guide else None
    last_layer = select_layers(unet, layers)[-1] if guide else None
    bar = progress_bar if progress_bar is not None else NoBar()
    steps_run = 0
    with capture as store, bar as progress_bar:
        store.latent_hw = tuple(latents.shape[-2:])
        for i, t in enumerate(timesteps):
            if interrupted():
                continue
            steps_run += 1
            do_cfg = state.guidance_scale > 1.0 and state.embeds.shape[0] == 2 * n
            cond_embeds = state.embeds[-n:]
            # a negative outside prompt needs the CFG pair it edits
            regional = (
                outside is not None and i < outside.steps and (do_cfg or outside.replaces != "negative")
            )

            def denoise_pass(z, t=t, do_cfg=do_cfg, cond_embeds=cond_embeds, regional=regional):
                store.batch_rows = slice(n, 2 * n) if do_cfg else slice(0, n)
                store.reset()
                rows = int(do_cfg) + 1 + int(regional)
                z_in = scheduler.scale_model_input(torch.cat([z] * rows) if rows > 1 else z, t)
                embeds_in = state.embeds if do_cfg else cond_embeds
                if regional:
                    embeds_in = torch.cat([embeds_in, outside.embeds])
                kwargs = extras.kwargs(do_cfg, outside if regional else None)
                pred = unet(z_in, t, encoder_hidden_states=embeds_in, **kwargs).sample
                if not regional:
                    return pred
                pred, pred_outside = pred[:-n], pred[-n:]
                inside = outside.mask(*z.shape[-2:]).to(pred)
                if outside.replaces == "negative":
                    negative = pred[:n] * inside + pred_outside * (1 - inside)
                    return torch.cat([negative, pred[n:]])
                text = pred[-n:] * inside + pred_outside * (1 - inside)
                return torch.cat([pred[:-n], text]) if do_cfg else text

            guided = guide and i < guidance.guidance_steps
            # With threshold 0 a guided step always takes its gradient: the pass on the latent
            # before the update would only be thrown away.
            always = guided and guidance.loss_threshold <= 0
            noise_pred = None if always else denoise_pass(latents)
            if guided:
                # The pass above already holds this step's conditional attention: when its loss is
                # under the threshold no gradient is needed, else the latent gets its gradient
                # steps and the pass is redone on the updated latent.
                loss_now = float("nan") if always else float(layer_losses(store, targets, check_loss, []))
                if always or not loss_now < guidance.loss_threshold:
                    store.batch_rows = None

                    def unet_cond(z, t=t, cond_embeds=cond_embeds):
                        kwargs = extras.kwargs(False)
                        # a LoRA scale is applied and undone around the whole forward: run it whole
                        whole = "cross_attention_kwargs" in kwargs
                        with nullcontext() if whole else stop_after(unet, last_layer):
                            unet(z, t, encoder_hidden_states=cond_embeds, **kwargs)

                    # gradient steps in the UNet's (VP) input space, whatever the sampler's own space
                    to_vp = model_input_scale(scheduler, t, latents)
                    variance = vp_noise_variance(vp_schedule(scheduler), t)
                    scale = step_scale(variance, guidance.step_size_schedule)
                    result = guided_update(unet_cond, latents * to_vp, store, targets, guidance, scale)
                    guidance_losses.append(result.losses)
                    latents = (result.latents / to_vp).to(latents.dtype)
                    noise_pred = denoise_pass(latents)
                else:
                    guidance_losses.append([loss_now])
            if track:
                if tracking is not None:
                    layout_losses.append(float(layer_losses(store, tracking, layout_guidance_loss)))
                if collect_maps:
                    maps = store.phrase_maps(token_indices, size=tuple(latents.shape[-2:])).float()
                    maps_sum = maps if maps_sum is None else maps_sum + maps
                store.reset()
            if do_cfg:
                noise_uncond, noise_text = noise_pred.chunk(2)
                noise_pred = noise_uncond + state.guidance_scale * (noise_text - noise_uncond)
            latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
            if on_step is not None:
                latents = on_step(i, t, latents, state)
            progress_bar.update()
    mean_maps = None if maps_sum is None else maps_sum / max(steps_run, 1)
    return Denoised(latents, layout_losses, guidance_losses, mean_maps)
