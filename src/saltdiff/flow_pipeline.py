"""``FlowSaltMixin``: what the flow-matching SALT pipelines (SD3, FLUX) share around their family adapter.

Each flow pipeline (``pipeline_sd3.py``, ``pipeline_flux.py``) keeps only what its diffusers pipeline
does differently: prompt encoding (its text encoders, CFG rows), diffusers' random latent draw,
where a boxed phrase sits in the text sequence, and its step-callback tensors. Everything else runs
here, once, on the family adapter (:mod:`saltdiff.families`):

- loading (:class:`~saltdiff.pretrained.PretrainedMixin`: ``from_pretrained``/``from_pipe`` refuse
  another family before any weight is used);
- the SALT arguments checked up front (:meth:`FlowSaltMixin._check_salt_call`: sizes, layout,
  initializer, guidance, captured layers, the phrases' token columns);
- stages 3 to 6 of the call (:meth:`FlowSaltMixin._sample_and_decode`): the adapter's schedule on
  the pipeline's ``FlowMatchEulerDiscreteScheduler``, the initial latent (diffusers' draw, a tensor
  or SALT's flow start), :func:`saltdiff.flow_denoising.flow_denoise`, decode, ``SaltOutput``;
- ``generate_objects`` for reference builders.

The outside prompt of the UNet loop runs here too (:meth:`FlowSaltMixin._outside_prompt`); unset, its
steps are the family's (:meth:`FlowSaltMixin.guidance_defaults_for`, written into the recipe): SD3 10
with CFG, as measured on ``builtin:shapes-mmdit``; FLUX none (unmeasured on a trained FLUX); none on
any call without a negative branch. ``"boxed-negative"`` needs one (SD3's CFG, FLUX's true CFG) and is
refused in one line when asked for without it; ``"without-boxed"`` edits the conditional branch and
runs on any call.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from .call_inputs import OUTPUT_TYPES, as_guidance, as_layout, resolve_init, seeded_generator
from .families import Conditions, guided_denoiser
from .flow_denoising import FlowOutsidePrompt, flow_denoise
from .flow_init import flow_salt_start
from .guidance import GuidanceConfig
from .init import InitResult, RandomInit, SpatialAwareInit
from .init_context import InitContext
from .layout import Layout
from .object_generator import PipelineObjectGenerator
from .phrases import boxed_phrases_prompt, strip_phrases
from .pipeline_output import SaltOutput
from .placement import guided_layout
from .pretrained import PretrainedMixin
from .reference import GeneratedObject
from .samplers import config_family, family_samplers
from .vocabulary import warn_pipeline_prompt, with_unboxed_objects

__all__ = ["FlowCall", "FlowSaltMixin"]


@dataclasses.dataclass
class FlowCall:
    """The SALT arguments of one call, checked and resolved (:meth:`FlowSaltMixin._check_salt_call`)."""

    layout: Layout
    init: Callable | torch.Tensor
    guidance: GuidanceConfig
    layers: list[str]
    text: str
    token_indices: list[list[int]]
    generator: torch.Generator | None
    height: int
    width: int
    callback: Callable | None = None
    callback_tensor_inputs: list[str] = dataclasses.field(default_factory=list)


class FlowSaltMixin(PretrainedMixin):
    """SALT on a flow-matching diffusers pipeline; mix in before the diffusers class.

    A subclass sets :attr:`_family` (a :data:`saltdiff.checkpoints.FAMILIES` key), :attr:`_label`
    (the family's name in messages), :attr:`_cfg_batch` (how its diffusers pipeline runs CFG: one
    ``[negative; conditional]`` batch, or two calls) and implements ``family(...)`` (its adapter),
    ``_resolve_tokens``, ``_unboxed_indices``, ``_random_latents`` and ``_object_conditions``.
    """

    _family: str
    _label: str
    _cfg_batch: bool = True
    #: What gives the call a negative branch (for the boxed-negative outside prompt's message).
    _negative_branch: str = "guidance_scale > 1"
    #: Guidance fields whose unset value (``None``) means something else on this family than on the
    #: UNet loop, for a call with a negative branch (:meth:`guidance_defaults_for` has the rest): no
    #: outside prompt unless asked for, guided steps that run the conditional branch again (FLUX: both
    #: unmeasured on trained weights). The call applies them; the CLI writes them into the recipe.
    guidance_defaults = {"outside_prompt_steps": 0, "guided_prediction": "updated"}

    @staticmethod
    def _has_negative(guidance_scale: float, true_cfg_scale: float) -> bool:
        """Whether a call with these scales runs a negative branch (SD3's CFG; FLUX overrides)."""
        return guidance_scale > 1

    def guidance_defaults_for(self, *, guidance_scale: float, true_cfg_scale: float = 1.0) -> dict:
        """:attr:`guidance_defaults` for a call with these scales: without a negative branch no outside
        prompt unless asked for, since its default kind (``"boxed-negative"``) replaces that branch."""
        defaults = dict(self.guidance_defaults)
        if not self._has_negative(guidance_scale, true_cfg_scale):
            defaults["outside_prompt_steps"] = 0
        return defaults

    @property
    def denoiser(self):
        """The denoising network: the joint-attention transformer."""
        return self.transformer

    def default_size(self) -> int:
        """diffusers' default side in pixels: ``default_sample_size`` latents."""
        return int(self.default_sample_size) * int(self.vae_scale_factor)

    def object_generator(self) -> PipelineObjectGenerator:
        """What a reference builder may use of this pipeline: :meth:`generate_objects` and an identity."""
        return PipelineObjectGenerator(self)

    def init_context(self, adapter) -> InitContext:
        """What SALT's flow start may use of this pipeline in a call whose family adapter is
        ``adapter`` (:class:`~saltdiff.init_context.InitContext`), never the pipeline itself: the
        reference's VAE latent, a text's velocity and the sigma grid all go through ``adapter``."""
        return InitContext(
            denoiser=self.denoiser,
            scheduler=self.scheduler,
            device=self._execution_device,
            dtype=self.denoiser.dtype,
            latent_channels=adapter.latent_channels,
            vae_scale_factor=self.vae_scale_factor,
            objects=self.object_generator(),
            memo=self.inversion_memo,
            encode_reference=functools.partial(self._encode_reference, adapter),
            velocity=lambda text: guided_denoiser(adapter, adapter.conditions(text)),
            schedule_kwargs=adapter.schedule_kwargs,
            conditioning_key=(
                adapter.name,
                adapter.max_sequence_length,
                getattr(adapter, "guidance_scale", None),
                adapter.joint_attention_kwargs,
            ),
        )

    def _encode_reference(self, adapter, image) -> torch.Tensor:
        """The latent ``adapter`` works in of a reference image (the image processor, then the VAE)."""
        pixels = self.image_processor.preprocess(image)
        return adapter.encode(pixels.to(device=self._execution_device, dtype=self.vae.dtype))

    # -- inputs --------------------------------------------------------------------------------------
    def _check_sizes(self, adapter, height, width, num_inference_steps, guidance_scale, n):
        multiple = adapter.size_multiple
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(
                    f"{name} must be a positive multiple of {multiple} for this model, got {value!r}"
                )
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if (
            not isinstance(guidance_scale, (int, float))
            or not np.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {n!r}")

    @staticmethod
    def _select_layers(available: Mapping[str, tuple[int, int]], spec) -> list[str]:
        """``"default"``/``"all"``: every joint-attention layer; else names or dotted prefixes (a
        comma-separated string or a sequence), each of which must match."""
        names = list(available)
        if spec in (None, "default", "all"):
            return names
        tokens = (
            [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [str(t).strip() for t in spec]
        )
        chosen = set()
        for token in tokens:
            hits = [n for n in names if n == token or n.startswith(token.rstrip(".") + ".")]
            if not hits:
                raise ValueError(
                    f"guidance layers: {token!r} matches no joint-attention layer; choose among {names}"
                )
            chosen.update(hits)
        return [n for n in names if n in chosen]

    def _check_salt_call(
        self,
        adapter,
        *,
        callback,
        prompt,
        layout,
        init,
        latents,
        reference_image,
        inversion_steps,
        guidance,
        height,
        width,
        num_inference_steps,
        guidance_scale,
        num_images_per_prompt,
        output_type,
        callback_tensor_inputs,
        seed,
        generator,
        true_cfg_scale=1.0,
    ) -> FlowCall:
        """Stage 1's SALT part, before any network runs: every bad value one ``ValueError``/``TypeError``.

        ``callback``: diffusers' ``callback_on_step_end`` (a ``PipelineCallback`` brings its own
        tensor names), kept on the returned :class:`FlowCall` for :meth:`_sample_and_decode`."""
        if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
            callback_tensor_inputs = callback.tensor_inputs
        default = self.default_size()
        height = default if height is None else height
        width = default if width is None else width
        layout = as_layout(layout)
        init = resolve_init(init, latents, reference_image, inversion_steps)
        if prompt is None and (len(layout) or isinstance(init, SpatialAwareInit)):
            raise ValueError(
                "with prompt_embeds, also pass the prompt it encodes when the layout has boxes or the "
                "initializer builds a reference: the boxed phrases' tokens are found in its text"
            )
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string (one prompt per call), got {type(prompt).__name__}")
        if prompt is not None and not prompt.strip() and len(layout):
            raise ValueError(
                "prompt is empty but the layout has boxes: every boxed phrase must be in the prompt"
            )
        self._check_sizes(adapter, height, width, num_inference_steps, guidance_scale, num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        allowed = list(self._callback_tensor_inputs)
        unknown = [k for k in callback_tensor_inputs if k not in allowed]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from {allowed}"
            )
        if config_family(self.scheduler.config) != "flow":
            raise ValueError(
                f"scheduler {type(self.scheduler).__name__} is not a flow-matching sampler: {self._label} "
                f"samples with {family_samplers('flow')} (pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(...))"
            )
        guidance = as_guidance(guidance)
        # unset means "the family's default" for this call (no outside prompt without a negative branch)
        guidance = guidance.with_unset(
            self.guidance_defaults_for(guidance_scale=guidance_scale, true_cfg_scale=true_cfg_scale)
        )
        layers = self._select_layers(
            adapter.attention_layers((2 * adapter.size_multiple,) * 2), guidance.layers
        )
        text = "" if prompt is None else prompt
        token_indices = self._resolve_tokens(adapter, layout, text)
        warn_pipeline_prompt(self, text, init)  # words its vocabulary or a tokenizer (T5's unknown) lacks
        return FlowCall(
            layout=with_unboxed_objects(layout, text, self.model_vocabulary),
            init=init,
            guidance=guidance,
            layers=layers,
            text=text,
            token_indices=token_indices,
            generator=seeded_generator(seed, generator),
            height=height,
            width=width,
            callback=callback,
            callback_tensor_inputs=list(callback_tensor_inputs),
        )

    # -- stages 3 to 6 -------------------------------------------------------------------------------
    def _sample_and_decode(
        self,
        adapter,
        call: FlowCall,
        conditions: Conditions,
        *,
        cfg_scale: float,
        num_inference_steps: int,
        n: int,
        output_type: str,
        return_attention_maps: bool,
        return_dict: bool,
        progress: bool,
    ) -> SaltOutput | tuple:
        """Timesteps → initial latents → the (guided) loop → decode → :class:`SaltOutput` (diffusers'
        ``(images, reference)`` tuple when not ``return_dict``).

        ``conditions`` holds the CFG rows ``[negative; conditional]`` when ``cfg_scale > 1``.
        """
        on_step = None
        if call.callback is not None:
            on_step = self._step_callback(call.callback, call.callback_tensor_inputs, n)
        device = self._execution_device
        layout = call.layout
        self._check_outside_branch(call, conditions.batch == 2 * n)  # before any work
        # 3. Timesteps: the adapter's schedule (FLUX's and SD3.5's dynamic shift), shared with the inversion
        latent_hw = (call.height // self.vae_scale_factor, call.width // self.vae_scale_factor)
        self.scheduler.set_timesteps(**adapter.schedule_kwargs(num_inference_steps, latent_hw), device=device)
        self.scheduler.set_begin_index(0)  # as FluxPipeline; SD3's distinct timesteps give index 0 anyway
        self._num_timesteps = len(self.scheduler.timesteps)

        # 4. Initial latents
        init_result = self._init_latents(
            call.init,
            adapter,
            call.text,
            layout,
            call.generator,
            height=call.height,
            width=call.width,
            steps=num_inference_steps,
            n=n,
            dtype=conditions.embeds.dtype,
        )
        init_latent = init_result.latents.detach().cpu().clone()
        guidance = call.guidance.for_start(init_result.reference is not None, flow=True)

        # 5. Denoising loop with attention guidance on the first steps (and the places SALT's reference
        # chose for unboxed objects: saltdiff.placement.guided_layout, as on the UNet pipelines)
        has_boxes = len(layout) > 0
        guided = guided_layout(layout, init_result.info, guidance)
        guided_tokens = (
            call.token_indices if guided is layout else self._resolve_tokens(adapter, guided, call.text)
        )
        outside = self._outside_prompt(adapter, call, guided, conditions.batch == 2 * n, n)
        unboxed = []
        if has_boxes and guidance.enabled and guidance.needs_unboxed_tokens:
            unboxed = self._unboxed_indices(adapter, call.text, guided_tokens)
        denoised = self._sample(
            adapter,
            init_result.latents,
            conditions,
            guidance_scale=cfg_scale,
            token_indices=guided_tokens if has_boxes else None,
            layout_masks=(lambda h, w: guided.masks(h, w)) if has_boxes else None,
            guidance=guidance,
            layers=call.layers,
            unboxed_indices=unboxed,
            collect_maps=return_attention_maps and has_boxes,
            on_step=on_step,
            progress=progress,
            outside=outside,
        )

        # 6. Decode
        images = self._decode(adapter, denoised.latents, output_type)
        self.maybe_free_model_hooks()
        output = SaltOutput(
            images=images,
            reference_image=init_result.reference_image,
            init_latent=init_latent,
            layout_losses=denoised.layout_losses,
            guidance_losses=denoised.guidance_losses,
            attention_maps=None
            if denoised.mean_maps is None
            else denoised.mean_maps[:, : len(layout)].cpu().numpy(),
            phrases=layout.phrases,
            token_indices=call.token_indices,
            info={**init_result.info, "guidance": guidance.to_dict(), "family": adapter.name},
        )
        return output if return_dict else (output.images, output.reference_image)

    def _check_outside_branch(self, call: FlowCall, has_negative: bool) -> None:
        """``"boxed-negative"`` replaces the negative branch: a call without one is refused in one line."""
        guidance = call.guidance
        if len(call.layout) and guidance.outside_steps and guidance.outside_prompt == "boxed-negative":
            if not has_negative:
                raise ValueError(
                    f"outside_prompt='boxed-negative' replaces the negative branch outside the boxes, and this "
                    f"{self._label} call has none (it needs {self._negative_branch}); use "
                    "outside_prompt='without-boxed' or outside_prompt_steps=0"
                )

    def _outside_prompt(
        self, adapter, call: FlowCall, layout: Layout, has_negative: bool, n: int
    ) -> FlowOutsidePrompt | None:
        """The outside prompt of this call (:class:`~saltdiff.flow_denoising.FlowOutsidePrompt`), or
        ``None``: no boxes, or ``outside_prompt_steps`` 0 (FLUX's default, and any call's without CFG).
        ``"boxed-negative"`` replaces the negative branch, so a call without one is refused in one line."""
        guidance = call.guidance
        if not len(layout) or not guidance.outside_steps:
            return None
        self._check_outside_branch(call, has_negative)
        if guidance.outside_prompt == "boxed-negative":
            text = boxed_phrases_prompt(layout.phrases)
        else:
            text = strip_phrases(call.text, layout.phrases)
        return FlowOutsidePrompt(
            adapter.conditions(text).repeat(n),
            lambda h, w: layout.masks(h, w).amax(0),
            guidance.outside_steps,
            replaces="negative" if guidance.outside_prompt == "boxed-negative" else "conditional",
        )

    def _sample(self, adapter, latents, conditions, *, progress=True, scheduler=None, **kwargs):
        """:func:`saltdiff.flow_denoising.flow_denoise` with this pipeline's scheduler, progress bar,
        interrupt flag and CFG batching."""
        scheduler = self.scheduler if scheduler is None else scheduler
        bar = self.progress_bar(total=len(scheduler.timesteps)) if progress else None
        return flow_denoise(
            adapter,
            scheduler,
            latents,
            conditions,
            progress_bar=bar,
            interrupted=lambda: self.interrupt,
            cfg_batch=self._cfg_batch,
            **kwargs,
        )

    def _decode(self, adapter, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return self._latent_output(latents)
        image = adapter.decode(latents)
        return self.image_processor.postprocess(image, output_type=output_type)

    def _latent_output(self, latents: torch.Tensor) -> torch.Tensor:
        """``output_type="latent"``: the latents as the diffusers pipeline returns them."""
        return latents

    # -- initial latents -----------------------------------------------------------------------------
    def salt_latents(
        self, init: SpatialAwareInit, adapter, prompt, layout, generator, **kwargs
    ) -> InitResult:
        """SALT's initial latent on this flow model (:func:`saltdiff.flow_init.flow_salt_start`), given
        this call's :meth:`init_context`."""
        return flow_salt_start(init, self.init_context(adapter), prompt, layout, generator, **kwargs)

    def _tensor_latents(self, init: torch.Tensor, shape: tuple[int, ...], n: int) -> torch.Tensor:
        """A user's latent tensor as ``[n, C, h, w]`` (``[C, h, w]`` or one row is repeated)."""
        latents = init[None] if init.ndim == 3 else init
        if latents.ndim != 4 or latents.shape[1:] != shape[1:] or latents.shape[0] not in (1, n):
            raise ValueError(f"init latent has shape {tuple(init.shape)}, expected {shape}")
        return latents.expand(n, -1, -1, -1)

    def _init_latents(
        self, init, adapter, prompt, layout, generator, *, height, width, steps, n, dtype
    ) -> InitResult:
        device = self._execution_device
        shape = (n, adapter.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if torch.is_tensor(init):
            latents = self._tensor_latents(init, shape, n).to(device=device, dtype=dtype)
            return InitResult(latents, None, {"init": "tensor"})
        if isinstance(init, RandomInit):  # diffusers' own draw: the same noise as its pipeline
            return InitResult(self._random_latents(shape, dtype, device, generator), None, {"init": "random"})
        if isinstance(init, SpatialAwareInit):
            result = self.salt_latents(
                init,
                adapter,
                prompt,
                layout,
                generator,
                height=height,
                width=width,
                num_inference_steps=steps,
                num_images=n,
            )
            result.latents = result.latents.to(device=device, dtype=dtype)
            return result
        raise ValueError(
            f"{type(self).__name__} runs init='salt' (SpatialAwareInit), 'random' (RandomInit) or a latent "
            f"tensor; got {type(init).__name__}"
        )

    # -- objects for the reference -------------------------------------------------------------------
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
        max_sequence_length: int | None = None,
    ) -> list[GeneratedObject]:
        """Plain text-to-image of ``prompts`` in one batch, each from the same noise (``seed``).

        What a reference builder needs: random init, no layout or guidance, on a copy of the
        pipeline's scheduler; ``guidance_scale`` is the family's own (SD3: CFG; FLUX: the embedded
        guidance of a guidance-distilled transformer). With ``phrases`` (one per prompt) each image
        also gets its phrase's joint attention map averaged over steps and layers, for attention
        cut-outs. ``max_sequence_length``: the family's default when unset.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        if phrases is not None and len(phrases) != len(prompts):
            raise ValueError(f"got {len(phrases)} phrases for {len(prompts)} prompts")
        adapter, conditions, cfg_scale = self._object_conditions(prompts, guidance_scale, max_sequence_length)
        self._check_sizes(adapter, height, width, num_inference_steps, guidance_scale, 1)
        device = self._execution_device
        n = len(prompts)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in prompts]
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        shape = (n, adapter.latent_channels, *latent_hw)
        latents = randn_tensor(shape, generator=generators, device=device, dtype=conditions.embeds.dtype)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(**adapter.schedule_kwargs(num_inference_steps, latent_hw), device=device)
        token_indices = None
        if phrases is not None:
            token_indices = [
                self._resolve_tokens(adapter, Layout.from_pairs([(phrase, (0.0, 0.0, 1.0, 1.0))]), prompt)[0]
                for prompt, phrase in zip(prompts, phrases)
            ]
        denoised = flow_denoise(  # never interrupted: the call that asked for the objects decides that
            adapter,
            scheduler,
            latents,
            conditions,
            guidance_scale=cfg_scale,
            token_indices=token_indices,
            collect_maps=phrases is not None,
            cfg_batch=self._cfg_batch,
        )
        images = self._decode(adapter, denoised.latents, "np")
        maps = None if denoised.mean_maps is None else denoised.mean_maps.cpu().numpy()
        return [
            GeneratedObject(np.asarray(images[b], dtype=np.float32), None if maps is None else maps[b, b])
            for b in range(n)
        ]
