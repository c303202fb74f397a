"""``SaltSD3Pipeline``: Stable Diffusion 3 with a layout, attention guidance and SALT's initial latent.

The first pipeline on the family seam (:mod:`saltdiff.families`): every transformer call goes through
:class:`~saltdiff.families.sd3.SD3Family`, noise levels are flow sigmas (:mod:`saltdiff.noise`), and the
call keeps diffusers' ``StableDiffusion3Pipeline`` stages and arithmetic, so that with
``init="random"`` and ``guidance="none"`` the image is diffusers' own, bit for bit
(``tests/test_pipeline_sd3.py``):

1. check inputs (diffusers' ``check_inputs`` plus the SALT arguments, :mod:`saltdiff.call_inputs`);
2. encode the prompt (diffusers' ``encode_prompt``: CLIP-L, CLIP-G, T5; CFG rows ``[negative; conditional]``);
3. timesteps: the pipeline's ``FlowMatchEulerDiscreteScheduler`` on the adapter's ``schedule_kwargs``;
4. initial latents: diffusers' ``prepare_latents`` (``init="random"``), a tensor, or SALT's start
   (:meth:`SaltSD3Pipeline.salt_latents`): the layout's reference image, VAE-encoded with SD3's scaling and
   shift, carried up the flow ODE by :func:`saltdiff.flow_inversion.flow_invert` on the sampler's own
   sigma grid to its first sigma, fresh noise from the call's seed outside the pasted objects;
5. the loop: on the first ``guidance_steps`` steps :func:`saltdiff.guidance.guided_update` on the
   conditional branch, with the joint attention captured into a ``JointAttentionStore`` and the step
   scaled by ``noise.guided_step_scale("flow", sigma) = sigma^2``; then one CFG step of the scheduler;
   capture processors are restored in ``try/finally`` (:func:`~saltdiff.joint_attention.capture_joint_attention`);
6. decode (``latents / scaling_factor + shift_factor``) and the :class:`~saltdiff.pipeline_output.SaltOutput`.

Not yet on SD3 (each refused in one line rather than ignored): the outside prompt of the UNet loop
(``outside_prompt_steps > 0``), noise added during inversion, initializers other than ``"salt"`` /
``"random"`` / a tensor, SD3.5's skip-layer guidance, IP-Adapters.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from .call_inputs import OUTPUT_TYPES, as_guidance, as_layout, resolve_init, seeded_generator
from .checkpoints import check_family, check_model_index, null_components, resolve_model
from .components import dtype_keyword
from .families import Conditions
from .families.sd3 import SD3Family
from .flow_denoising import flow_denoise
from .flow_init import flow_salt_start
from .guidance import GuidanceConfig
from .init import InitResult, RandomInit, SpatialAwareInit
from .layout import Layout, LayoutError
from .object_generator import PipelineObjectGenerator
from .pipeline_output import SaltOutput
from .reference import GeneratedObject
from .samplers import config_family, family_samplers
from .vocabulary import ModelVocabulary, load_vocabulary

logger = logging.getLogger(__name__)

__all__ = ["SaltSD3Pipeline"]

#: Tensors a step callback may ask for (diffusers' SD3 names).
SD3_CALLBACK_INPUTS = ("latents", "prompt_embeds", "pooled_prompt_embeds")


class SaltSD3Pipeline(StableDiffusion3Pipeline):
    """Layout-controlled Stable Diffusion 3 with spatial-aware latent initialization (SALT).

    Loads like ``StableDiffusion3Pipeline`` (``from_pretrained(id_or_folder)``, ``from_pipe(pipe)``;
    :func:`saltdiff.load_pipeline` picks this class from ``model_index.json``) and adds a ``layout``,
    an initializer (``init``) and a guidance method (``guidance``) to ``__call__``.
    """

    _family = "sd3"
    #: Guidance fields whose unset value (``None``) means something else on SD3 than on the UNet loop:
    #: no outside prompt yet. The call applies them; the CLI writes them into the recipe.
    guidance_defaults = {"outside_prompt_steps": 0}
    model_name: str | None = None
    model_vocabulary: ModelVocabulary | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        name = str(pretrained_model_name_or_path)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            kwargs[dtype_keyword()] = torch.float32  # one dtype throughout, as SaltMixin loads
        path = resolve_model(name)
        where = {"cache_dir": kwargs.get("cache_dir"), "revision": kwargs.get("revision")}
        checked = check_model_index(path, name, **where, family=cls._family)
        for component in null_components(path):  # e.g. a folder saved without T5
            kwargs.setdefault(component, None)
        pipe = super().from_pretrained(path, **kwargs)
        if not checked:
            check_model_index(path, name, **where, family=cls._family)
        pipe.model_name = name
        pipe.model_vocabulary = load_vocabulary(path) if os.path.isdir(str(path)) else None
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        source = f"the {type(pipeline).__name__} given"
        check_family(type(pipeline).__name__, pipeline.components, source, family=cls._family)
        pipe = super().from_pipe(pipeline, **kwargs)
        pipe.model_name = getattr(pipeline, "model_name", None)
        pipe.model_vocabulary = getattr(pipeline, "model_vocabulary", None)
        return pipe

    # -- the family seam -----------------------------------------------------------------------------
    def family(
        self, *, max_sequence_length: int = 256, joint_attention_kwargs: dict | None = None
    ) -> SD3Family:
        """The :class:`~saltdiff.families.sd3.SD3Family` adapter of this pipeline's components."""
        return SD3Family(
            self, max_sequence_length=max_sequence_length, joint_attention_kwargs=joint_attention_kwargs
        )

    def default_size(self) -> int:
        """The side the transformer was trained at, in pixels (``sample_size`` latents)."""
        return int(self.transformer.config.sample_size) * int(self.vae_scale_factor)

    def object_generator(self) -> PipelineObjectGenerator:
        """What a reference builder may use of this pipeline: :meth:`generate_objects` and an identity."""
        return PipelineObjectGenerator(self)

    # -- inputs --------------------------------------------------------------------------------------
    def _check_sizes(self, adapter: SD3Family, height, width, num_inference_steps, guidance_scale, n):
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

    def _resolve_tokens(self, adapter: SD3Family, layout: Layout, prompt: str) -> list[list[int]]:
        """Each box's columns of the joint text sequence: its CLIP positions (both CLIP tokenizers must
        agree) and its T5 positions after the CLIP block (:meth:`SD3Family.phrase_tokens`'s choice),
        occurrences resolved as :meth:`Layout.resolve_tokens` does."""
        if not len(layout):
            return []
        columns = [[] for _ in layout]
        if adapter.text_tokens in ("both", "clip"):
            clip = layout.resolve_tokens(self.tokenizer, prompt)
            clip_g = layout.resolve_tokens(self.tokenizer_2, prompt)
            if clip != clip_g:
                raise LayoutError(
                    f"the two CLIP tokenizers put the boxed phrases at different positions ({clip} and {clip_g})"
                )
            columns = [c + p for c, p in zip(columns, clip)]
        if adapter.text_tokens in ("both", "t5") and self.text_encoder_3 is not None:
            t5 = layout.resolve_tokens(self.tokenizer_3, prompt)
            for box, positions in zip(layout, t5):
                if positions[-1] >= adapter.max_sequence_length:
                    raise LayoutError(
                        f"phrase {box.phrase!r} is at T5 token {positions[-1]}, past "
                        f"max_sequence_length={adapter.max_sequence_length}"
                    )
            columns = [c + [adapter.clip_length + i for i in p] for c, p in zip(columns, t5)]
        return columns

    def _unboxed_indices(self, prompt: str, token_indices: list[list[int]]) -> list[int]:
        """The prompt's other CLIP tokens (between BOS and EOS): what an ``unboxed_tokens`` loss protects."""
        ids = self.tokenizer(prompt).input_ids
        boxed = {i for group in token_indices for i in group}
        return [i for i in range(1, len(ids) - 1) if i not in boxed]

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

    # -- the sampling loop ---------------------------------------------------------------------------
    def _sample(
        self,
        adapter: SD3Family,
        latents: torch.Tensor,
        conditions: Conditions,
        *,
        progress=True,
        scheduler=None,
        **kwargs,
    ):
        """:func:`saltdiff.flow_denoising.flow_denoise` with this pipeline's scheduler, progress bar and interrupt flag."""
        scheduler = self.scheduler if scheduler is None else scheduler
        bar = self.progress_bar(total=len(scheduler.timesteps)) if progress else None
        return flow_denoise(
            adapter,
            scheduler,
            latents,
            conditions,
            progress_bar=bar,
            interrupted=lambda: self.interrupt,
            **kwargs,
        )

    def _decode(self, adapter: SD3Family, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        image = adapter.decode(latents)
        return self.image_processor.postprocess(image, output_type=output_type)

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
        max_sequence_length: int = 256,
    ) -> list[GeneratedObject]:
        """Plain text-to-image of ``prompts`` in one batch, each from the same noise (``seed``).

        What a reference builder needs: random init, CFG, no layout or guidance, on a copy of the
        pipeline's scheduler. With ``phrases`` (one per prompt) each image also gets its phrase's
        joint attention map averaged over steps and layers, for attention cut-outs.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        if phrases is not None and len(phrases) != len(prompts):
            raise ValueError(f"got {len(phrases)} phrases for {len(prompts)} prompts")
        adapter = self.family(max_sequence_length=max_sequence_length)
        self._check_sizes(adapter, height, width, num_inference_steps, guidance_scale, 1)
        device = self._execution_device
        n = len(prompts)
        do_cfg = guidance_scale > 1
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=do_cfg,
            device=device,
            max_sequence_length=max_sequence_length,
        )
        conditions = Conditions(embeds, pooled)
        if do_cfg:
            conditions = Conditions.cat(Conditions(negative, negative_pooled), conditions)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in prompts]
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = randn_tensor(
            (n, adapter.latent_channels, *latent_hw), generator=generators, device=device, dtype=embeds.dtype
        )
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
            guidance_scale=guidance_scale,
            token_indices=token_indices,
            collect_maps=phrases is not None,
        )
        images = self._decode(adapter, denoised.latents, "np")
        maps = None if denoised.mean_maps is None else denoised.mean_maps.cpu().numpy()
        return [
            GeneratedObject(np.asarray(images[b], dtype=np.float32), None if maps is None else maps[b, b])
            for b in range(n)
        ]

    # -- SALT's start --------------------------------------------------------------------------------
    def salt_latents(
        self, init: SpatialAwareInit, adapter: SD3Family, prompt, layout, generator, **kwargs
    ) -> InitResult:
        """SALT's initial latent on this flow model (:func:`saltdiff.flow_init.flow_salt_start`)."""
        return flow_salt_start(init, self, adapter, prompt, layout, generator, **kwargs)

    def _init_latents(
        self, init, adapter, prompt, layout, generator, *, height, width, steps, n, dtype
    ) -> InitResult:
        device = self._execution_device
        shape = (n, adapter.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if torch.is_tensor(init):
            latents = init[None] if init.ndim == 3 else init
            if latents.shape[1:] != shape[1:] or latents.shape[0] not in (1, n):
                raise ValueError(f"init latent has shape {tuple(init.shape)}, expected {shape}")
            latents = latents.to(device=device, dtype=dtype).expand(n, -1, -1, -1)
            return InitResult(latents, None, {"init": "tensor"})
        if isinstance(init, RandomInit):  # diffusers' own draw: the same noise as StableDiffusion3Pipeline
            latents = self.prepare_latents(n, shape[1], height, width, dtype, device, generator, None)
            return InitResult(latents, None, {"init": "random"})
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
            f"SaltSD3Pipeline runs init='salt' (SpatialAwareInit), 'random' (RandomInit) or a latent tensor; "
            f"got {type(init).__name__}"
        )

    # -- the call ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | None = None,
        layout: Layout | Mapping | Sequence | None = None,
        *,
        init: str | Callable | torch.Tensor | None = None,
        guidance: str | GuidanceConfig = "salt",
        prompt_2: str | None = None,
        prompt_3: str | None = None,
        num_inference_steps: int = 28,
        guidance_scale: float = 7.0,
        negative_prompt: str | None = None,
        negative_prompt_2: str | None = None,
        negative_prompt_3: str | None = None,
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
        max_sequence_length: int = 256,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        reference_image: PIL.Image.Image | str | None = None,
        inversion_steps: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        return_attention_maps: bool = False,
        callback_on_step_end: Callable[[Any, int, Any, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        progress: bool = True,
    ) -> SaltOutput | tuple:
        """Generate an image whose boxed phrases land in their boxes.

        Arguments as :meth:`saltdiff.SaltPipeline.__call__` (``layout``, ``init``, ``guidance``,
        ``seed``, ``reference_image``, ``inversion_steps``, ``return_attention_maps``) and as
        diffusers' ``StableDiffusion3Pipeline`` (``prompt_2``/``prompt_3``, pooled embeddings,
        ``max_sequence_length``, ``joint_attention_kwargs``). Defaults: diffusers' SD3 ones (28 steps,
        CFG 7). Boxed phrases are read in the CLIP and T5 columns of the joint attention.
        """
        # 1. Check inputs
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
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
        adapter = self.family(
            max_sequence_length=max_sequence_length, joint_attention_kwargs=joint_attention_kwargs
        )
        self._check_sizes(adapter, height, width, num_inference_steps, guidance_scale, num_images_per_prompt)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in SD3_CALLBACK_INPUTS]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; choose from {list(SD3_CALLBACK_INPUTS)}"
            )
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            height,
            width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        if config_family(self.scheduler.config) != "flow":
            raise ValueError(
                f"scheduler {type(self.scheduler).__name__} is not a flow-matching sampler: SD3 samples with "
                f"{family_samplers('flow')} (pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(...))"
            )
        guidance = as_guidance(guidance)
        if guidance.outside_prompt_steps:
            raise ValueError(
                f"outside_prompt_steps={guidance.outside_prompt_steps}: the outside prompt is not implemented on SD3 yet (use 0)"
            )
        # unset means "the family's default": none on SD3 (recorded as 0, not the UNet loop's 10)
        unset = {k: v for k, v in self.guidance_defaults.items() if getattr(guidance, k) is None}
        guidance = dataclasses.replace(guidance, **unset)
        layers = self._select_layers(
            adapter.attention_layers((2 * adapter.size_multiple,) * 2), guidance.layers
        )
        text = "" if prompt is None else prompt
        token_indices = self._resolve_tokens(adapter, layout, text)
        generator = seeded_generator(seed, generator)
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        n = num_images_per_prompt
        do_cfg = self.do_classifier_free_guidance

        # 2. Encode the prompt (diffusers' encode_prompt: the same embeddings as StableDiffusion3Pipeline)
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        embeds, negative_embeds, pooled, negative_pooled = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_3=prompt_3,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=do_cfg,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device,
            clip_skip=clip_skip,
            num_images_per_prompt=n,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        if embeds.shape[0] != n:
            raise ValueError(f"one prompt per call: got {embeds.shape[0] // n} prompts' embeddings")
        conditions = Conditions(embeds, pooled)
        if do_cfg:
            conditions = Conditions.cat(Conditions(negative_embeds, negative_pooled), conditions)

        # 3. Timesteps: the adapter's schedule (SD3.5's dynamic shift included), shared with the inversion
        latent_hw = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        self.scheduler.set_timesteps(**adapter.schedule_kwargs(num_inference_steps, latent_hw), device=device)
        self._num_timesteps = len(self.scheduler.timesteps)

        # 4. Initial latents
        init_result = self._init_latents(
            init,
            adapter,
            text,
            layout,
            generator,
            height=height,
            width=width,
            steps=num_inference_steps,
            n=n,
            dtype=embeds.dtype,
        )
        init_latent = init_result.latents.detach().cpu().clone()
        guidance = guidance.for_start(init_result.reference is not None)

        # 5. Denoising loop with attention guidance on the first steps
        on_step = None
        if callback_on_step_end is not None:
            on_step = self._step_callback(callback_on_step_end, callback_on_step_end_tensor_inputs, n)
        has_boxes = len(layout) > 0
        unboxed = []
        if has_boxes and guidance.enabled and guidance.needs_unboxed_tokens:
            unboxed = self._unboxed_indices(text, token_indices)
        denoised = self._sample(
            adapter,
            init_result.latents,
            conditions,
            guidance_scale=guidance_scale,
            token_indices=token_indices if has_boxes else None,
            layout_masks=(lambda h, w: layout.masks(h, w)) if has_boxes else None,
            guidance=guidance,
            layers=layers,
            unboxed_indices=unboxed,
            collect_maps=return_attention_maps and has_boxes,
            on_step=on_step,
            progress=progress,
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
            attention_maps=None if denoised.mean_maps is None else denoised.mean_maps.cpu().numpy(),
            phrases=layout.phrases,
            token_indices=token_indices,
            info={**init_result.info, "guidance": guidance.to_dict(), "family": adapter.name},
        )
        if not return_dict:
            return (output.images, output.reference_image)
        return output

    def _step_callback(self, callback, names, n: int):
        """diffusers' ``callback_on_step_end`` with SD3's tensor names; it may replace the latents and
        the (CFG batch of) ``prompt_embeds`` / ``pooled_prompt_embeds``; ``_guidance_scale`` is read back."""

        def on_step(i, t, latents, conditions: Conditions):
            local = {
                "latents": latents,
                "prompt_embeds": conditions.embeds,
                "pooled_prompt_embeds": conditions.pooled,
            }
            outputs = callback(self, i, t, {k: local[k] for k in names}) or {}
            embeds = outputs.pop("prompt_embeds", conditions.embeds)
            pooled = outputs.pop("pooled_prompt_embeds", conditions.pooled)
            if embeds is not conditions.embeds or pooled is not conditions.pooled:
                conditions = Conditions(embeds, pooled, conditions.extras)
            return outputs.pop("latents", latents), conditions

        return on_step
