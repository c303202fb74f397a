"""What every SALT pipeline shares, whatever the model family: ``SaltMixin`` (the call, object
generation, loading checks) and ``SaltOutput``.

What differs per family is asked of hooks that ``SaltPipeline`` (SD 1.x/2.x, :mod:`saltdiff.pipeline`)
and ``SaltXLPipeline`` (SDXL, :mod:`saltdiff.pipeline_xl`) implement: ``_family`` (the
:func:`saltdiff.checkpoints.model_family` they load), ``_fit_tokenizers()``, ``_encode_text(...) ->
(prompt_embeds, negative_embeds, added_cond)`` (SDXL's pooled embeddings and ``time_ids``, rows
``[negative; conditional]`` under CFG; ``None`` for SD), ``_resolve_tokens(layout, prompt)``,
``encode_reference(image)`` and ``inversion_conditioning(text, height, width)`` (the VAE encode and UNet
inputs of :class:`saltdiff.init.SpatialAwareInit`, handed to it in the :meth:`SaltMixin.init_context`),
``_decode(latents, output_type, safety_dtype=)``.

The call's argument checks that need no pipeline are :mod:`saltdiff.call_inputs`; its output,
:mod:`saltdiff.pipeline_output`; the view of the pipeline that reference builders get,
:mod:`saltdiff.object_generator`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from .call_inputs import (
    CALLBACK_TENSOR_INPUTS,
    OUTPUT_TYPES,
    as_guidance,
    as_layout,
    check_embeds,
    resolve_init,
    seeded_generator,
    text_for_tokens,
)
from .components import check_component_dtypes
from .denoising import Denoised, OutsidePrompt, UNetExtras, denoise, step_callback
from .families.unet import ip_adapter_off
from .guidance import GuidanceConfig
from .init import InitResult
from .init_context import InitContext
from .layout import Layout
from .object_generator import PipelineObjectGenerator
from .phrases import boxed_phrases_prompt, other_tokens, strip_phrases
from .pipeline_output import SaltOutput
from .placement import guided_layout
from .preflight import check_image_sides, check_steps_and_scale, size_multiple
from .pretrained import PretrainedMixin
from .reference import GeneratedObject
from .samplers import check_supported, ddim_twin, set_sampler_timesteps
from .vocabulary import warn_pipeline_prompt, with_unboxed_objects

logger = logging.getLogger(__name__)


class SaltMixin(PretrainedMixin):
    """The SALT call on top of a diffusers text-to-image pipeline; the family hooks are its subclasses'.

    Loads like the parent pipeline (``from_pretrained(id_or_folder)``, ``from_pipe(pipe)``, plus
    ``"builtin:shapes"``) and adds a ``layout``, an initializer (``init``) and a guidance method
    (``guidance``) to ``__call__``.
    """

    _family: str  # the checkpoints.model_family name the subclass runs
    _salt_callback_inputs: tuple[str, ...] = CALLBACK_TENSOR_INPUTS  # what a step callback may ask for

    @property
    def denoiser(self):
        """The denoising network: the UNet (what family-agnostic code reads for its dtype and config)."""
        return self.unet

    def _after_loading(self) -> None:
        """Tokenizers capped at their text encoders' length (:class:`~saltdiff.pretrained.PretrainedMixin`)."""
        self._fit_tokenizers()

    def warn_unknown_words(self, prompt: str, init=None) -> str | None:
        """One warning line for prompt words (and a reference background colour) that this model
        cannot draw (:func:`saltdiff.vocabulary.warn_pipeline_prompt`); returns it."""
        return warn_pipeline_prompt(self, prompt, init)

    # -- inputs --------------------------------------------------------------------------------------
    def check_salt_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        output_type="pil",
        callback_on_step_end_tensor_inputs=("latents",),
    ):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string (one prompt per call), got {type(prompt).__name__}")
        check_component_dtypes(self)
        self._fit_tokenizers()  # pipelines built by hand or from_pipe
        multiple = size_multiple(self.vae_scale_factor, len(self.unet.config.down_block_types))
        check_image_sides(height, width, multiple)
        check_steps_and_scale(num_inference_steps, guidance_scale)
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._salt_callback_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; "
                f"choose from {list(self._salt_callback_inputs)}"
            )

    def _default_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        default = self.unet.config.sample_size * self.vae_scale_factor
        return (default if height is None else height), (default if width is None else width)

    def _init_latents(self, init, prompt, layout, generator, height, width, steps, n) -> InitResult:
        if torch.is_tensor(init):
            expected = (
                n,
                self.unet.config.in_channels,
                height // self.vae_scale_factor,
                width // self.vae_scale_factor,
            )
            if init.ndim == 3:
                init = init[None]
            if init.shape[1:] != expected[1:] or init.shape[0] not in (1, n):
                raise ValueError(f"init latent has shape {tuple(init.shape)}, expected {expected}")
            latents = init.to(device=self._execution_device, dtype=self.unet.dtype).expand(n, -1, -1, -1)
            # unit-variance noise, scaled into the sampler's noise space as diffusers does with `latents`
            return InitResult(latents * self.scheduler.init_noise_sigma, None, {"init": "tensor"})
        ctx = self.init_context()
        with ip_adapter_off(self.unet):  # an IP-Adapter conditions sampling, not the reference
            result = init(
                ctx,
                prompt,
                layout,
                generator,
                height=height,
                width=width,
                num_inference_steps=steps,
                num_images=n,
            )
        result.latents = result.latents.to(device=self._execution_device, dtype=self.unet.dtype)
        return result

    def _unboxed_indices(self, prompt: str, token_indices: list[list[int]]) -> list[int]:
        """The prompt's other CLIP tokens (between BOS and EOS): what an ``unboxed_tokens`` loss protects."""
        return other_tokens(self.tokenizer, prompt, token_indices)

    def _uses_cfg(self, guidance_scale: float) -> bool:
        """Classifier-free guidance, as diffusers decides it (an LCM-distilled UNet takes w instead)."""
        return guidance_scale > 1.0 and self.unet.config.time_cond_proj_dim is None

    def _unet_extras(self, n: int, guidance_scale: float, **kwargs) -> UNetExtras:
        """The UNet inputs of a batch of ``n``; an LCM UNet's ``timestep_cond`` embeds ``w = scale - 1``."""
        extras = UNetExtras(**kwargs)
        dim = self.unet.config.time_cond_proj_dim
        if dim is not None:
            w = torch.full((n,), float(guidance_scale) - 1.0)
            extras.timestep_cond = self.get_guidance_scale_embedding(w, embedding_dim=dim).to(
                device=self._execution_device, dtype=self.unet.dtype
            )
        return extras

    def object_generator(self) -> PipelineObjectGenerator:
        """What a reference builder may use of this pipeline: :meth:`generate_objects` and an identity."""
        return PipelineObjectGenerator(self)

    def init_context(self) -> InitContext:
        """What an initializer may use of this pipeline (:class:`~saltdiff.init_context.InitContext`),
        never the pipeline itself: built once per call, where the call runs its initializer."""
        return InitContext(
            denoiser=self.denoiser,
            scheduler=self.scheduler,
            device=self._execution_device,
            dtype=self.denoiser.dtype,
            latent_channels=self.denoiser.config.in_channels,
            vae_scale_factor=self.vae_scale_factor,
            objects=self.object_generator(),
            memo=self.inversion_memo,
            encode_reference=self.encode_reference,
            inversion_conditioning=self.inversion_conditioning,
        )

    # -- the denoising loop --------------------------------------------------------------------------
    def _denoise(self, latents: torch.Tensor, *, progress: bool = True, **kwargs) -> Denoised:
        """:func:`saltdiff.denoising.denoise` on this pipeline's UNet, with its progress bar."""
        timesteps = kwargs.get("timesteps")
        total = len(kwargs["scheduler"].timesteps if timesteps is None else timesteps)
        bar = self.progress_bar(total=total) if progress else None
        return denoise(self.unet, latents, progress_bar=bar, **kwargs)

    @torch.no_grad()
    def generate_objects(
        self,
        prompts: Sequence[str],
        *,
        phrases: Sequence[str] | None = None,
        height: int,
        width: int,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
    ) -> list[GeneratedObject]:
        """Plain text-to-image of ``prompts`` in one batch, each from the same noise (``seed``).

        What a reference builder needs and no more: random init, classifier-free guidance; no
        layout, guidance or IP-Adapter; DDIM on the pipeline's noise schedule (whatever the call's
        sampler). With ``phrases`` (one per prompt) each image also gets its phrase's cross-attention
        map, averaged over steps, for attention cut-outs.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        if phrases is not None and len(phrases) != len(prompts):
            raise ValueError(f"got {len(phrases)} phrases for {len(prompts)} prompts")
        self.check_salt_inputs(prompts[0], height, width, num_inference_steps, guidance_scale, 1)
        device = self._execution_device
        n = len(prompts)
        do_cfg = self._uses_cfg(guidance_scale)
        prompt_embeds, negative_embeds, added = self._encode_text(
            prompts, device, 1, do_cfg, None, height=height, width=width
        )
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in prompts]
        scheduler = ddim_twin(self.scheduler)  # the same objects under every sampler
        shape = (
            n,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        latents = randn_tensor(shape, generator=generators, device=device, dtype=self.unet.dtype)
        latents = latents * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=device)
        token_indices = None
        if phrases is not None:
            token_indices = [
                self._resolve_tokens(Layout.from_pairs([(phrase, (0.0, 0.0, 1.0, 1.0))]), prompt)[0]
                for prompt, phrase in zip(prompts, phrases)
            ]
        with ip_adapter_off(self.unet):  # text alone, also with an IP-Adapter loaded
            denoised = self._denoise(
                latents,
                scheduler=scheduler,
                embeds=torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds,
                guidance_scale=guidance_scale,
                extra_step_kwargs=self.prepare_extra_step_kwargs(generators, 0.0),
                extras=self._unet_extras(n, guidance_scale, added_cond=added, added_cond_cfg=do_cfg),
                token_indices=token_indices,
                collect_maps=phrases is not None,
                progress=False,
            )
        images, _ = self._decode(denoised.latents, "np")
        maps = None if denoised.mean_maps is None else denoised.mean_maps.cpu().numpy()
        return [
            GeneratedObject(np.asarray(images[b], dtype=np.float32), None if maps is None else maps[b, b])
            for b in range(n)
        ]

    # -- the call ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | None = None,
        layout: Layout | Mapping | Sequence | None = None,
        *,
        init: str | Callable | torch.Tensor | None = None,
        guidance: str | GuidanceConfig = "salt",
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        reference_image: PIL.Image.Image | str | None = None,
        inversion_steps: int | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        return_attention_maps: bool = False,
        callback_on_step_end: Callable[[Any, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        progress: bool = True,
    ) -> SaltOutput | tuple:
        """Generate an image whose boxed phrases land in their boxes.

        Args:
            prompt: the text prompt (one per call; use ``num_images_per_prompt`` for several images).
                With ``prompt_embeds`` it is still needed when the layout has boxes or the
                initializer builds a reference: the boxed phrases' tokens are found in it.
            layout: boxed phrases of the prompt (``Layout``, its dict form, or ``[(phrase, box), ...]``
                with normalized ``x0, y0, x1, y1``); phrases are found with the pipeline's tokenizer.
            init: ``"salt"`` (spatial-aware init, the default), ``"random"``, any initializer
                (``SpatialAwareInit(...)``, ``RandomInit()``, your own callable), or a latent tensor.
                Registered names: :data:`saltdiff.registry.INITIALIZERS`.
            guidance: a registered loss name (``"salt"``, ``"layout-guidance"``, ``"boxdiff"``,
                ``"none"``) or a ``GuidanceConfig``.
            seed: shorthand for ``generator=torch.Generator("cpu").manual_seed(seed)``.
            latents: the initial latent, as in diffusers (the same as ``init=tensor``; not with ``init``).
            prompt_embeds, negative_prompt_embeds: text embeddings ``[1, T, D]`` used instead of
                encoding ``prompt`` / ``negative_prompt`` (prompt weighting, textual inversion, ...).
            pooled_prompt_embeds, negative_pooled_prompt_embeds: SDXL's pooled embeddings ``[1, D]``,
                needed with (negative) ``prompt_embeds`` there, as in diffusers; not for SD 1.x/2.x.
            ip_adapter_image, ip_adapter_image_embeds: IP-Adapter inputs, as in diffusers (after
                ``load_ip_adapter``); they condition sampling, not the reference or its inversion.
            cross_attention_kwargs: passed to every UNet call (e.g. ``{"scale": 0.7}`` for a LoRA).
            clip_skip: text-encoder layers to skip, as in diffusers.
            reference_image: a whole reference image for ``init="salt"`` (instead of generated objects).
            inversion_steps: override ``SpatialAwareInit.inversion_steps`` for ``init="salt"``.
            return_dict: ``False`` returns ``(images, nsfw_content_detected)`` as diffusers does; the
                reference image, latent, losses and maps are on the ``SaltOutput`` only.
            return_attention_maps: also return per-phrase attention maps averaged over steps.
            callback_on_step_end: a function ``(pipe, i, t, tensors) -> dict`` or a diffusers
                ``PipelineCallback``; ``prompt_embeds`` is diffusers' CFG batch (negative rows first).
        """
        # 1. Check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        height, width = self._default_size(height, width)
        layout = as_layout(layout)
        init = resolve_init(init, latents, reference_image, inversion_steps)
        prompt_text = text_for_tokens(prompt, prompt_embeds, layout, init)
        self.check_salt_inputs(
            prompt_text,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            output_type,
            callback_on_step_end_tensor_inputs,
        )
        check_embeds(prompt_embeds, negative_prompt_embeds, negative_prompt)
        if not prompt_text.strip() and len(layout):
            raise ValueError(
                "prompt is empty but the layout has boxes: every boxed phrase must be in the prompt"
            )
        token_indices = self._resolve_tokens(layout, prompt_text)
        layout = with_unboxed_objects(layout, prompt_text, self.model_vocabulary)
        self.warn_unknown_words(prompt_text, init)
        guidance = as_guidance(guidance)
        if guidance.prediction_kind != "updated":
            raise ValueError(
                f"guided_prediction={guidance.guided_prediction!r} is for flow-matching models (SD3, FLUX); "
                "a UNet's guided step always runs the denoiser again on the updated latent ('updated')"
            )
        if guidance.guided_gradient != "full":
            raise ValueError(
                f"guided_gradient={guidance.guided_gradient!r} is for flow-matching models (SD3, FLUX); "
                "a UNet's guided pass always backpropagates through every layer ('full')"
            )
        if len(layout) and guidance.enabled:
            check_supported(self.scheduler)  # guided steps read its alphas_cumprod
        generator = seeded_generator(seed, generator)
        self._guidance_scale = guidance_scale
        self._guidance_rescale = 0.0
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        n = num_images_per_prompt
        do_cfg = self._uses_cfg(guidance_scale)

        # 2. Encode the prompt (and the IP-Adapter image)
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        prompt_embeds, negative_embeds, added = self._encode_text(
            prompt_text if prompt_embeds is None else None,
            device,
            n,
            do_cfg,
            negative_prompt,
            height=height,
            width=width,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled=(pooled_prompt_embeds, negative_pooled_prompt_embeds),
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        image_embeds = None
        if ip_adapter_image is not None or ip_adapter_image_embeds is not None:
            image_embeds = self.prepare_ip_adapter_image_embeds(
                ip_adapter_image, ip_adapter_image_embeds, device, n, do_cfg
            )
        extras = self._unet_extras(
            n,
            guidance_scale,
            cross_attention_kwargs=cross_attention_kwargs,
            image_embeds=image_embeds,
            image_embeds_cfg=do_cfg,
            added_cond=added,
            added_cond_cfg=do_cfg,
        )

        # 3. Timesteps (before the initial latents: Euler-type samplers' init_noise_sigma depends on them)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 4. Initial latents (reference builders generate objects on a copy of the scheduler)
        init_result = self._init_latents(
            init, prompt_text, layout, generator, height, width, num_inference_steps, n
        )
        init_latent = init_result.latents.detach().cpu().clone()
        timesteps = self.scheduler.timesteps
        if init_result.start_skip:  # an ancestral sampler starts SALT's latent lower (samplers.py)
            timesteps = set_sampler_timesteps(
                self.scheduler, num_inference_steps, skip=init_result.start_skip, device=device
            )
            self._num_timesteps = len(timesteps)
        guidance = guidance.for_start(init_result.reference is not None)

        # 5. Denoising loop with attention guidance on the first steps
        on_step = None
        if callback_on_step_end is not None:
            on_step = step_callback(
                self, callback_on_step_end, callback_on_step_end_tensor_inputs, negative_embeds, extras
            )

        has_boxes = len(layout) > 0
        guided = guided_layout(layout, init_result.info, guidance)
        guided_tokens = token_indices if guided is layout else self._resolve_tokens(guided, prompt_text)
        outside = None
        if has_boxes and guidance.outside_steps > 0:
            if guidance.outside_prompt == "boxed-negative":
                # the boxed phrases alone, whether the negative prompt came as text or as embeds
                outside_text = boxed_phrases_prompt(guided.phrases)
            else:
                outside_text = strip_phrases(prompt_text, guided.phrases)
            outside_embeds, _, outside_added = self._encode_text(
                outside_text, device, n, False, height=height, width=width, clip_skip=clip_skip
            )
            outside = OutsidePrompt(
                outside_embeds,
                lambda h, w: guided.masks(h, w).amax(0),
                guidance.outside_steps,
                added_cond=outside_added,
                replaces="negative" if guidance.outside_prompt == "boxed-negative" else "conditional",
            )
        unboxed = []
        if has_boxes and guidance.enabled and guidance.needs_unboxed_tokens:
            unboxed = self._unboxed_indices(prompt_text, guided_tokens)
        denoised = self._denoise(
            init_result.latents,
            scheduler=self.scheduler,
            timesteps=timesteps,
            embeds=torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds,
            guidance_scale=guidance_scale,
            extra_step_kwargs=extra_step_kwargs,
            extras=extras,
            token_indices=guided_tokens if has_boxes else None,
            layout_masks=(lambda h, w: guided.masks(h, w)) if has_boxes else None,
            guidance=guidance,
            unboxed_indices=unboxed,
            collect_maps=return_attention_maps and has_boxes,
            on_step=on_step,
            interrupted=lambda: self.interrupt,
            outside=outside,
            progress=progress,
        )

        # 6. Decode, and the safety checker as in the parent pipeline
        images, nsfw = self._decode(denoised.latents, output_type, safety_dtype=prompt_embeds.dtype)
        self.maybe_free_model_hooks()

        attention_maps = (
            None if denoised.mean_maps is None else denoised.mean_maps[:, : len(layout)].cpu().numpy()
        )
        output = SaltOutput(
            images=images,
            reference_image=init_result.reference_image,
            init_latent=init_latent,
            layout_losses=denoised.layout_losses,
            guidance_losses=denoised.guidance_losses,
            attention_maps=attention_maps,
            phrases=layout.phrases,
            token_indices=token_indices,
            nsfw_content_detected=nsfw,
            info={**init_result.info, "guidance": guidance.to_dict()},
        )
        if not return_dict:  # diffusers' tuple; the reference image and the rest are on SaltOutput
            return (output.images, output.nsfw_content_detected)
        return output


__all__ = ["SaltMixin", "SaltOutput", "as_layout"]
