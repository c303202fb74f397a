"""``SaltSD3Pipeline``: Stable Diffusion 3 with a layout, attention guidance and SALT's initial latent.

On the family seam (:mod:`saltdiff.families`): every transformer call goes through
:class:`~saltdiff.families.sd3.SD3Family`, noise levels are flow sigmas (:mod:`saltdiff.noise`), what
the flow pipelines share is :class:`~saltdiff.flow_pipeline.FlowSaltMixin`, and the call keeps
diffusers' ``StableDiffusion3Pipeline`` stages and arithmetic, so that with
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

The outside prompt of the UNet loop runs on SD3's CFG rows (one batch, a third row on its steps): unset,
10 steps with CFG as on the UNet models, none without (``guidance_scale <= 1``: "boxed-negative" replaces
the negative branch; :meth:`~saltdiff.flow_pipeline.FlowSaltMixin.guidance_defaults_for`). Not yet on SD3 (each
refused in one line rather than ignored): noise added during inversion, initializers other than ``"salt"`` /
``"random"`` / a tensor, SD3.5's skip-layer guidance, IP-Adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import PIL.Image
import torch
from diffusers import StableDiffusion3Pipeline

from .families import Conditions
from .families.sd3 import SD3Family
from .flow_pipeline import FlowSaltMixin
from .guidance import GuidanceConfig
from .layout import Layout
from .phrases import other_tokens
from .pipeline_output import SaltOutput

logger = logging.getLogger(__name__)

__all__ = ["SaltSD3Pipeline"]

#: Tensors a step callback may ask for (diffusers' SD3 names).
SD3_CALLBACK_INPUTS = tuple(StableDiffusion3Pipeline._callback_tensor_inputs)


class SaltSD3Pipeline(FlowSaltMixin, StableDiffusion3Pipeline):
    """Layout-controlled Stable Diffusion 3 with spatial-aware latent initialization (SALT).

    Loads like ``StableDiffusion3Pipeline`` (``from_pretrained(id_or_folder)``, ``from_pipe(pipe)``;
    :func:`saltdiff.load_pipeline` picks this class from ``model_index.json``) and adds a ``layout``,
    an initializer (``init``) and a guidance method (``guidance``) to ``__call__``.
    """

    _family = "sd3"
    _label = "SD3"
    _cfg_batch = True  # StableDiffusion3Pipeline runs [negative; conditional] in one transformer call
    #: Unset, the outside prompt runs 10 steps with a loss as on the UNet loop (none without, nor
    #: without CFG): on ``builtin:shapes-mmdit``'s tuning split it cut extra objects (-0.44 per image)
    #: and raised mAP@0.5 (+0.069), both beyond noise, for a third batch row on those steps. A guided
    #: step samples with the guided pass's own prediction: one conditional row fewer, within noise of
    #: running it again on 64 tuning layouts x 2 seeds, warm time 1.81x -> 1.64x ``sd``
    #: (``benchmarks/RESULTS.md``).
    guidance_defaults: dict = {"guided_prediction": "guided-pass"}

    # -- the family seam -----------------------------------------------------------------------------
    def family(
        self, *, max_sequence_length: int = 256, joint_attention_kwargs: dict | None = None
    ) -> SD3Family:
        """The :class:`~saltdiff.families.sd3.SD3Family` adapter of this pipeline's components."""
        return SD3Family(
            self, max_sequence_length=max_sequence_length, joint_attention_kwargs=joint_attention_kwargs
        )

    def _resolve_tokens(self, adapter: SD3Family, layout: Layout, prompt: str) -> list[list[int]]:
        """Each box's columns of the joint text sequence (:meth:`SD3Family.box_tokens`): its CLIP
        positions (both CLIP tokenizers must agree) and its T5 positions after the CLIP block,
        occurrences resolved as :meth:`Layout.resolve_tokens` does."""
        return adapter.box_tokens(prompt, layout.boxes)

    def _unboxed_indices(self, adapter: SD3Family, prompt: str, token_indices: list[list[int]]) -> list[int]:
        """The prompt's other CLIP tokens (between BOS and EOS): what an ``unboxed_tokens`` loss protects."""
        return other_tokens(self.tokenizer, prompt, token_indices)

    def _random_latents(self, shape, dtype, device, generator) -> torch.Tensor:
        """diffusers' own draw: the same noise as ``StableDiffusion3Pipeline``."""
        n, channels = shape[:2]
        height, width = (side * self.vae_scale_factor for side in shape[2:])
        return self.prepare_latents(n, channels, height, width, dtype, device, generator, None)

    def _object_conditions(self, prompts, guidance_scale, max_sequence_length):
        """The adapter, the CFG rows of ``prompts`` and the CFG scale for :meth:`generate_objects`."""
        adapter = self.family(max_sequence_length=max_sequence_length or 256)
        do_cfg = guidance_scale > 1
        embeds, negative, pooled, negative_pooled = self.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=do_cfg,
            device=self._execution_device,
            max_sequence_length=adapter.max_sequence_length,
        )
        conditions = Conditions(embeds, pooled)
        if do_cfg:
            conditions = Conditions.cat(Conditions(negative, negative_pooled), conditions)
        return adapter, conditions, guidance_scale

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
        adapter = self.family(
            max_sequence_length=max_sequence_length, joint_attention_kwargs=joint_attention_kwargs
        )
        call = self._check_salt_call(
            adapter,
            prompt=prompt,
            layout=layout,
            init=init,
            latents=latents,
            reference_image=reference_image,
            inversion_steps=inversion_steps,
            guidance=guidance,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            callback=callback_on_step_end,
            callback_tensor_inputs=callback_on_step_end_tensor_inputs,
            seed=seed,
            generator=generator,
        )
        self.check_inputs(
            prompt,
            prompt_2,
            prompt_3,
            call.height,
            call.width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            negative_prompt_3=negative_prompt_3,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
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
            device=self._execution_device,
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

        # 3.-6. Timesteps, initial latents, the guided loop, decode (FlowSaltMixin)
        return self._sample_and_decode(
            adapter,
            call,
            conditions,
            cfg_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            n=n,
            output_type=output_type,
            return_attention_maps=return_attention_maps,
            return_dict=return_dict,
            progress=progress,
        )

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
