"""``SaltPipeline``: Stable Diffusion 1.x/2.x with a layout, attention guidance and a pluggable initial latent.

The SALT call itself lives in :class:`saltdiff.salt_mixin.SaltMixin`; this module holds what is
particular to SD 1.x/2.x (one CLIP text encoder, no added conditioning, the safety checker).
SDXL: :class:`saltdiff.pipeline_xl.SaltXLPipeline`.
"""

from __future__ import annotations

import PIL.Image
import torch
from diffusers import StableDiffusionPipeline

from .call_inputs import as_layout
from .checkpoints import DEFAULT_MODEL, builtin_models, resolve_model
from .components import fit_tokenizer_length
from .layout import Layout, LayoutError
from .pipeline_output import SaltOutput
from .salt_mixin import SaltMixin


class SaltPipeline(SaltMixin, StableDiffusionPipeline):
    """Layout-controlled Stable Diffusion with spatial-aware latent initialization (SALT).

    Loads like any SD pipeline (``SaltPipeline.from_pretrained(id_or_folder)``,
    ``SaltPipeline.from_pipe(sd_pipe)``, plus ``"builtin:shapes"`` for the shipped model) and adds
    a ``layout``, an initializer (``init``) and a guidance method (``guidance``) to ``__call__``.
    SDXL checkpoints load with :class:`saltdiff.pipeline_xl.SaltXLPipeline` (or
    :func:`saltdiff.load_pipeline`, which picks the class).
    """

    _family = "sd"

    # -- family hooks (see saltdiff.salt_mixin) ------------------------------------------------------
    def _fit_tokenizers(self) -> None:
        fit_tokenizer_length(self.tokenizer, self.text_encoder)

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
        """``(prompt_embeds, negative_embeds, None)``: SD's UNet takes no added conditioning."""
        if any(p is not None for p in pooled):
            raise ValueError("pooled_prompt_embeds are SDXL's: SD 1.x/2.x text encoders have no pooled input")
        prompt_embeds, negative_embeds = self.encode_prompt(
            prompt,
            device,
            n,
            do_cfg,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        return prompt_embeds, negative_embeds, None

    def _resolve_tokens(self, layout: Layout, prompt: str) -> list[list[int]]:
        return layout.resolve_tokens(self.tokenizer, prompt)

    def encode_reference(self, image: PIL.Image.Image) -> torch.Tensor:
        """The VAE latent (mean, times the scaling factor) of a reference image, ``[1, C, h, w]``."""
        device = self._execution_device
        pixels = self.image_processor.preprocess(image).to(device=device, dtype=self.vae.dtype)
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor

    def inversion_conditioning(self, text: str, height: int, width: int):
        """``(embeds, model_kwargs)`` of DDIM inversion's conditional branch: the text alone."""
        embeds, _ = self.encode_prompt(text, self._execution_device, 1, do_classifier_free_guidance=False)
        return embeds, None

    def _decode(self, latents: torch.Tensor, output_type: str, *, safety_dtype=None):
        """``(images, nsfw flags)``; with ``safety_dtype`` the safety checker runs as in the parent
        pipeline (flagged images are left as it returns them, not denormalized)."""
        if output_type == "latent":
            return latents, None
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        nsfw = None
        if safety_dtype is not None:
            decoded, nsfw = self.run_safety_checker(decoded, self._execution_device, safety_dtype)
        denormalize = [True] * decoded.shape[0] if nsfw is None else [not flag for flag in nsfw]
        return self.image_processor.postprocess(
            decoded, output_type=output_type, do_denormalize=denormalize
        ), nsfw


__all__ = [
    "SaltPipeline",
    "SaltOutput",
    "LayoutError",
    "DEFAULT_MODEL",
    "as_layout",
    "resolve_model",
    "builtin_models",
]
