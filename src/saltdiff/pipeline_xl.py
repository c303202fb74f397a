"""``SaltXLPipeline``: SDXL with a layout, attention guidance and a pluggable initial latent.

The SALT call is :class:`saltdiff.salt_mixin.SaltMixin`'s, unchanged; what SDXL needs besides is
here: two CLIP text encoders (their penultimate states side by side, 2048 wide), the UNet's added
conditioning on every call (pooled text embeddings of the second encoder and ``add_time_ids``: original
size, crop corner, target size), phrase tokens that both tokenizers must agree on, and a VAE that
overflows in fp16 (``vae.config.force_upcast``: encode and decode in fp32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import PIL.Image
import torch
from diffusers import StableDiffusionXLPipeline

from .call_inputs import CALLBACK_TENSOR_INPUTS
from .checkpoints import SDXL_MODEL_ID
from .components import fit_tokenizer_length
from .denoising import ADDED_COND_INPUTS
from .layout import Layout
from .phrases import agreed_positions
from .pipeline_output import SaltOutput
from .salt_mixin import SaltMixin


class SaltXLPipeline(SaltMixin, StableDiffusionXLPipeline):
    """Layout-controlled SDXL with spatial-aware latent initialization (SALT).

    ``SaltXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0", dtype=torch.float16)``,
    ``SaltXLPipeline.from_pipe(sdxl_pipe)``; the call is :class:`saltdiff.pipeline.SaltPipeline`'s.
    Default captured layers: :func:`saltdiff.attention.default_capture_layers` (SDXL: the mid block
    and the first transformer stack of the first up block, 20 of the 70 cross-attention layers).
    """

    _family = "sdxl"
    _salt_callback_inputs = (*CALLBACK_TENSOR_INPUTS, *ADDED_COND_INPUTS)  # SDXLCFGCutoffCallback's too

    # -- family hooks (see saltdiff.salt_mixin) ------------------------------------------------------
    def _fit_tokenizers(self) -> None:
        fit_tokenizer_length(self.tokenizer, self.text_encoder)
        fit_tokenizer_length(self.tokenizer_2, self.text_encoder_2)

    def _added_cond(self, pooled, negative_pooled, do_cfg: bool, height: int, width: int, dtype):
        """SDXL's ``added_cond_kwargs`` rows (``[negative; conditional]`` under CFG): pooled text
        embeddings and ``add_time_ids`` = (height, width, 0, 0, height, width), as diffusers makes them."""
        if self.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        time_ids = self._get_add_time_ids(
            (height, width), (0, 0), (height, width), dtype=dtype, text_encoder_projection_dim=projection_dim
        )
        time_ids = time_ids.to(pooled.device).repeat(pooled.shape[0], 1)
        if do_cfg:
            return {
                "text_embeds": torch.cat([negative_pooled, pooled]),
                "time_ids": torch.cat([time_ids] * 2),
            }
        return {"text_embeds": pooled, "time_ids": time_ids}

    def _encode_text(
        self,
        prompt,
        device,
        n: int,
        do_cfg: bool,
        negative_prompt=None,
        *,
        height: int,
        width: int,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        pooled=(None, None),
        lora_scale=None,
        clip_skip=None,
    ):
        """``(prompt_embeds, negative_embeds, added_cond)`` from both text encoders (or from the given
        embeddings, each with its pooled ``[1, D]`` counterpart as diffusers asks)."""
        given = (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds))
        for (name, embeds), pooled_embeds in zip(given, pooled):
            if (embeds is None) != (pooled_embeds is None):
                raise ValueError(
                    f"SDXL needs {name} and {name.replace('prompt_embeds', 'pooled_prompt_embeds')} "
                    "together (the second text encoder's pooled output goes to the UNet)"
                )
            if pooled_embeds is not None and (not torch.is_tensor(pooled_embeds) or pooled_embeds.ndim != 2):
                raise ValueError(f"pooled embeddings must be a [1, D] tensor, got {pooled_embeds!r:.60}")
        embeds, negative, pooled_out, negative_pooled = self.encode_prompt(
            prompt,
            device=device,
            num_images_per_prompt=n,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled[0],
            negative_pooled_prompt_embeds=pooled[1],
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        added = self._added_cond(pooled_out, negative_pooled, do_cfg, height, width, embeds.dtype)
        return embeds, negative, added

    def _resolve_tokens(self, layout: Layout, prompt: str) -> list[list[int]]:
        """Token positions of the boxed phrases. The UNet attends to both encoders' states side by side
        (one position per token), so both tokenizers must put each phrase at the same positions."""
        positions = layout.resolve_tokens(self.tokenizer, prompt)
        if self.tokenizer_2 is None:
            return positions
        other = layout.resolve_tokens(self.tokenizer_2, prompt)
        return agreed_positions("SDXL's two tokenizers", layout.phrases, prompt, positions, other)

    @contextmanager
    def _vae_in_fp32(self) -> Iterator[torch.dtype]:
        """The VAE in fp32 inside the block when it is fp16 and says it overflows there
        (``force_upcast``, SDXL's VAE); restored afterwards. Yields the dtype it runs in."""
        dtype = self.vae.dtype
        upcast = dtype == torch.float16 and bool(getattr(self.vae.config, "force_upcast", False))
        cast = torch.nn.Module.to  # the plain cast: ModelMixin.to warns about keep-in-fp32 modules
        if upcast:
            cast(self.vae, torch.float32)
        try:
            yield self.vae.dtype
        finally:
            if upcast:
                cast(self.vae, dtype)

    def _latent_stats(self, latents: torch.Tensor):
        """``(mean, std)`` of the VAE's latents when its config has them, else ``(0, 1)``."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
            return 0.0, 1.0
        as_tensor = lambda v: torch.tensor(v).view(1, -1, 1, 1).to(latents)  # noqa: E731
        return as_tensor(config.latents_mean), as_tensor(config.latents_std)

    def encode_reference(self, image: PIL.Image.Image) -> torch.Tensor:
        """The VAE latent (mean, scaled as SDXL's img2img does) of a reference image, ``[1, C, h, w]``."""
        pixels = self.image_processor.preprocess(image).to(device=self._execution_device)
        with self._vae_in_fp32() as dtype:
            z0 = self.vae.encode(pixels.to(dtype)).latent_dist.mean
        mean, std = self._latent_stats(z0)
        return ((z0 - mean) * self.vae.config.scaling_factor / std).to(self.denoiser.dtype)

    def inversion_conditioning(self, text: str, height: int, width: int):
        """``(embeds, model_kwargs)`` of DDIM inversion's conditional branch: text, pooled embeds, time ids."""
        embeds, _, added = self._encode_text(
            text, self._execution_device, 1, False, height=height, width=width
        )
        return embeds, {"added_cond_kwargs": added}

    def _decode(self, latents: torch.Tensor, output_type: str, *, safety_dtype=None):
        """``(images, None)``: VAE decode (in fp32 where SDXL's VAE needs it), the watermark when the
        pipeline has one, post-processing. SDXL has no safety checker."""
        if output_type == "latent":
            return latents, None
        with self._vae_in_fp32() as dtype:
            z = latents.to(dtype)
            mean, std = self._latent_stats(z)
            decoded = self.vae.decode(z * std / self.vae.config.scaling_factor + mean, return_dict=False)[0]
        if getattr(self, "watermark", None) is not None:
            decoded = self.watermark.apply_watermark(decoded)
        return self.image_processor.postprocess(decoded, output_type=output_type), None


__all__ = ["SaltXLPipeline", "SaltOutput", "SDXL_MODEL_ID"]
