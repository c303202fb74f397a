"""``SaltFluxPipeline``: FLUX with a layout, attention guidance and SALT's initial latent.

Every transformer call goes through :class:`~saltdiff.families.flux.FluxFamily` (2x2-packed latents,
image and text RoPE ids, the embedded guidance of guidance-distilled checkpoints), and what the flow
pipelines share is :class:`~saltdiff.flow_pipeline.FlowSaltMixin`. The call keeps diffusers'
``FluxPipeline`` stages and arithmetic, so that with ``init="random"`` and ``guidance="none"`` the
image is diffusers' own, bit for bit, with or without ``guidance_embeds`` and with true CFG
(``tests/test_pipeline_flux.py``):

1. check inputs (diffusers' ``check_inputs`` plus the SALT arguments);
2. encode the prompt (diffusers' ``encode_prompt``: CLIP's pooled embedding, T5's sequence, ``txt_ids``;
   with true CFG the negative prompt too, rows ``[negative; conditional]``);
3. timesteps: sigmas ``linspace(1, 1/N, N)`` shifted by ``mu`` for the image's packed token count
   (:meth:`FluxFamily.schedule_kwargs`), the very grid SALT's inversion runs on;
4. initial latents: diffusers' ``prepare_latents`` draw (``init="random"``), a tensor (packed
   ``[B, tokens, 64]`` as diffusers takes it, or ``[B, 16, h, w]``), or SALT's flow start
   (:func:`saltdiff.flow_init.flow_salt_start`: reference → VAE → reverse-Euler inversion on the
   shifted sigmas → fresh noise outside the objects);
5. the loop (:func:`saltdiff.flow_denoising.flow_denoise`): guided updates on the conditional
   branch on the first steps, one transformer call per CFG branch as ``FluxPipeline`` does;
6. decode (``latents / scaling_factor + shift_factor``) and the :class:`~saltdiff.pipeline_output.SaltOutput`
   (``output_type="latent"``: packed, as diffusers returns them; ``init_latent``: ``[B, 16, h, w]``).

**The outside prompt.** On UNet models the "boxed-negative" outside prompt replaces, outside the
boxes, the negative branch of CFG by the boxed phrases' prediction. FLUX.1-dev is guidance-distilled:
it has no negative branch unless true CFG is on (``true_cfg_scale > 1`` with a ``negative_prompt``).
So on FLUX: with true CFG, "boxed-negative" replaces the true-CFG negative branch outside the boxes,
as on the UNets; without it, nothing replaces it -- "boxed-negative" is refused in one line, and
``outside_prompt="without-boxed"`` (the conditional branch becomes the prompt without its boxed
phrases outside the boxes, one more transformer call per step) is the variant that needs no
negative branch. Unset, ``outside_prompt_steps`` is 0 on FLUX (the recipe records 0; SD3's 10 were
measured on ``builtin:shapes-mmdit`` with CFG, nothing on a trained FLUX):
SALT's start and the guidance loss alone keep copies of the boxed objects out of the fresh noise
outside the boxes. Only the mechanics were checked (tiny random models, ``tests/test_pipeline_flux.py``);
whether either variant helps on a trained FLUX is unmeasured.

Phrases are looked up in the T5 tokenizer (SentencePiece pieces): FLUX's text sequence is T5's
alone, CLIP gives only the pooled embedding. Not yet on FLUX (refused in one line): noise added
during inversion, initializers other than ``"salt"`` / ``"random"`` / a tensor, custom ``sigmas``,
IP-Adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import FluxPipeline

from .families import Conditions
from .families.flux import FluxFamily, pack_latents, unpack_latents
from .flow_pipeline import FlowSaltMixin
from .guidance import GuidanceConfig
from .layout import Layout
from .phrases import other_tokens
from .pipeline_output import SaltOutput

logger = logging.getLogger(__name__)

__all__ = ["SaltFluxPipeline"]


class SaltFluxPipeline(FlowSaltMixin, FluxPipeline):
    """Layout-controlled FLUX with spatial-aware latent initialization (SALT).

    Loads like ``FluxPipeline`` (``from_pretrained(id_or_folder)``, ``from_pipe(pipe)``;
    :func:`saltdiff.load_pipeline` picks this class from ``model_index.json``) and adds a ``layout``,
    an initializer (``init``) and a guidance method (``guidance``) to ``__call__``.
    """

    _family = "flux"
    _label = "FLUX"
    _cfg_batch = False  # FluxPipeline's true CFG: one transformer call per branch
    _negative_branch = "true CFG: true_cfg_scale > 1 with a negative_prompt"

    @staticmethod
    def _has_negative(guidance_scale: float, true_cfg_scale: float) -> bool:
        """FLUX's ``guidance_scale`` is embedded guidance: only true CFG runs a negative branch."""
        return true_cfg_scale > 1

    # -- the family seam -----------------------------------------------------------------------------
    def family(
        self,
        *,
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        joint_attention_kwargs: dict | None = None,
    ) -> FluxFamily:
        """The :class:`~saltdiff.families.flux.FluxFamily` adapter of this pipeline's components."""
        return FluxFamily(
            self,
            max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale,
            joint_attention_kwargs=joint_attention_kwargs,
        )

    def _resolve_tokens(self, adapter: FluxFamily, layout: Layout, prompt: str) -> list[list[int]]:
        """Each box's T5 positions (FLUX attends to T5's sequence only), occurrences resolved as
        :meth:`Layout.resolve_tokens` does; a phrase past ``max_sequence_length`` is one line
        (:meth:`FluxFamily.box_tokens`)."""
        return adapter.box_tokens(prompt, layout.boxes)

    def _unboxed_indices(self, adapter: FluxFamily, prompt: str, token_indices: list[list[int]]) -> list[int]:
        """The prompt's other T5 pieces (before EOS, inside ``max_sequence_length``)."""
        return other_tokens(self.tokenizer_2, prompt, token_indices, adapter.max_sequence_length)

    def _random_latents(self, shape, dtype, device, generator) -> torch.Tensor:
        """diffusers' own draw (``prepare_latents``: noise drawn unpacked, then packed), unpacked."""
        n, channels, h, w = shape
        packed, _ = self.prepare_latents(
            n, channels, h * self.vae_scale_factor, w * self.vae_scale_factor, dtype, device, generator
        )
        return unpack_latents(packed, (h, w))

    def _tensor_latents(self, init: torch.Tensor, shape: tuple[int, ...], n: int) -> torch.Tensor:
        """diffusers' packed ``[B, tokens, 4C]`` latents are unpacked; ``[B, C, h, w]`` as on SD3."""
        c, h, w = shape[1:]
        if init.ndim == 3 and tuple(init.shape[1:]) == ((h // 2) * (w // 2), 4 * c):
            init = unpack_latents(init, (h, w))
        return super()._tensor_latents(init, shape, n)

    def _latent_output(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed, as ``FluxPipeline`` returns ``output_type="latent"``."""
        return pack_latents(latents)

    def _object_conditions(self, prompts, guidance_scale, max_sequence_length):
        """:meth:`generate_objects`' adapter and prompts: ``guidance_scale`` is the embedded guidance
        (a guidance-distilled transformer), no true CFG."""
        adapter = self.family(max_sequence_length=max_sequence_length or 512, guidance_scale=guidance_scale)
        embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self._execution_device,
            max_sequence_length=adapter.max_sequence_length,
        )
        return adapter, Conditions(embeds, pooled, {"txt_ids": text_ids}), 1.0

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
        negative_prompt: str | None = None,
        negative_prompt_2: str | None = None,
        true_cfg_scale: float = 1.0,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        joint_attention_kwargs: dict[str, Any] | None = None,
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
        diffusers' ``FluxPipeline``: ``guidance_scale`` is the embedded guidance of a
        guidance-distilled transformer (FLUX.1-dev; unused by FLUX.1-schnell), true CFG is
        ``negative_prompt`` + ``true_cfg_scale > 1`` (two transformer calls per step). Defaults:
        diffusers' FLUX ones (28 steps, guidance 3.5, T5 length 512). Boxed phrases are read in the
        T5 columns of the joint attention. The outside prompt: see the module docstring.
        """
        # 1. Check inputs
        if (
            isinstance(true_cfg_scale, bool)
            or not isinstance(true_cfg_scale, (int, float))
            or not np.isfinite(true_cfg_scale)
            or true_cfg_scale < 1
        ):
            raise ValueError(
                f"true_cfg_scale must be a finite number >= 1 (1: no true CFG), got {true_cfg_scale!r}"
            )
        has_negative = negative_prompt is not None or (
            negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
        )
        if true_cfg_scale > 1 and not has_negative:
            raise ValueError(
                f"true_cfg_scale={true_cfg_scale} needs negative_prompt (or negative_prompt_embeds and "
                "negative_pooled_prompt_embeds): FluxPipeline runs no true CFG without one"
            )
        if true_cfg_scale == 1 and has_negative:
            raise ValueError(
                "negative_prompt has no effect on FLUX with true_cfg_scale=1 (guidance-distilled: no "
                "negative branch); pass true_cfg_scale > 1 for true CFG, or drop the negative prompt"
            )
        do_true_cfg = true_cfg_scale > 1
        adapter = self.family(
            max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale,
            joint_attention_kwargs=joint_attention_kwargs,
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
            true_cfg_scale=true_cfg_scale,
        )
        self.check_inputs(
            prompt,
            prompt_2,
            call.height,
            call.width,
            negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=call.callback_tensor_inputs,
            max_sequence_length=max_sequence_length,
        )
        if (
            do_true_cfg
            and prompt_embeds is not None
            and negative_prompt_embeds is not None
            and prompt_embeds.shape != negative_prompt_embeds.shape
        ):
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
        self._guidance_scale = guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        n = num_images_per_prompt

        # 2. Encode the prompt (diffusers' encode_prompt: the same embeddings as FluxPipeline)
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        encode = dict(
            device=device,
            num_images_per_prompt=n,
            max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        embeds, pooled, text_ids = self.encode_prompt(
            prompt=prompt,
            prompt_2=prompt_2,
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds,
            **encode,
        )
        if embeds.shape[0] != n:
            raise ValueError(f"one prompt per call: got {embeds.shape[0] // n} prompts' embeddings")
        conditions = Conditions(embeds, pooled, {"txt_ids": text_ids})
        if do_true_cfg:
            negative, negative_pooled, negative_ids = self.encode_prompt(
                prompt=negative_prompt,
                prompt_2=negative_prompt_2,
                prompt_embeds=negative_prompt_embeds,
                pooled_prompt_embeds=negative_pooled_prompt_embeds,
                **encode,
            )
            conditions = Conditions.cat(
                Conditions(negative, negative_pooled, {"txt_ids": negative_ids}), conditions
            )

        # 3.-6. Timesteps, initial latents, the guided loop, decode (FlowSaltMixin)
        return self._sample_and_decode(
            adapter,
            call,
            conditions,
            cfg_scale=true_cfg_scale,
            num_inference_steps=num_inference_steps,
            n=n,
            output_type=output_type,
            return_attention_maps=return_attention_maps,
            return_dict=return_dict,
            progress=progress,
        )

    def _step_callback(self, callback, names, n: int):
        """diffusers' ``callback_on_step_end`` with FLUX's tensors: packed ``latents`` and the
        conditional ``prompt_embeds``, either of which it may replace."""

        def on_step(i, t, latents, conditions: Conditions):
            rows = slice(conditions.batch - n, conditions.batch)  # the conditional rows
            local = {"latents": pack_latents(latents), "prompt_embeds": conditions.embeds[rows]}
            outputs = callback(self, i, t, {k: local[k] for k in names}) or {}
            if "latents" in outputs:
                latents = unpack_latents(outputs.pop("latents"), tuple(latents.shape[-2:]))
            if "prompt_embeds" in outputs:
                embeds = torch.cat([conditions.embeds[: rows.start], outputs.pop("prompt_embeds")])
                conditions = Conditions(embeds, conditions.pooled, conditions.extras)
            return latents, conditions

        return on_step
