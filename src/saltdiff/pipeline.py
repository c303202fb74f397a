"""``SaltPipeline``: Stable Diffusion with a layout, attention guidance and a pluggable initial latent."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput

from .attention import AttentionStore, capture_cross_attention
from .guidance import GuidanceConfig, GuidanceTargets, guided_update, layer_losses, step_scale
from .init import InitResult, RandomInit, SpatialAwareInit
from .layout import Layout, LayoutError
from .losses import layout_guidance_loss
from .reference import UserImages

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
DEFAULT_MODEL = "builtin:shapes"
SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
INIT_NAMES = ("salt", "random")


def builtin_models() -> dict[str, str]:
    """Names of the diffusers folders shipped inside the package (``builtin:NAME``)."""
    root = os.path.join(os.path.dirname(__file__), "models")
    if not os.path.isdir(root):
        return {}
    return {
        name: os.path.join(root, name)
        for name in sorted(os.listdir(root))
        if os.path.isfile(os.path.join(root, name, "model_index.json"))
    }


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """``builtin:NAME`` → the shipped folder; anything else (hub id or folder) is passed through."""
    name = str(name_or_path)
    if name.startswith(BUILTIN_PREFIX):
        key = name[len(BUILTIN_PREFIX) :]
        models = builtin_models()
        if key not in models:
            raise ValueError(
                f"unknown built-in model {name!r}; available: {[BUILTIN_PREFIX + k for k in models]}"
            )
        return models[key]
    return name


@dataclass
class SaltOutput(BaseOutput):
    """What one call returns; everything a user needs to look at the result and reproduce it.

    Attributes:
        images: the generated images (PIL list, or array when ``output_type="np"``).
        reference_image: the reference image that was inverted (``None`` for random init).
        init_latent: the initial latent z_T the sampler started from, on CPU.
        layout_losses: per denoising step, layout-guidance energy (Chen et al.) of the boxed tokens,
            measured on the conditional branch of that step's forward pass — comparable across methods.
        guidance_losses: per guided step, the guidance loss at each gradient iteration.
        attention_maps: ``[num_images, K, h, w]`` cross-attention of each boxed phrase averaged over
            steps and the captured layers (when ``return_attention_maps=True``).
        phrases: the boxed phrases, in layout order; ``token_indices``: their prompt token positions.
    """

    images: list[PIL.Image.Image] | np.ndarray
    reference_image: PIL.Image.Image | None = None
    init_latent: torch.Tensor | None = None
    layout_losses: list[float] = field(default_factory=list)
    guidance_losses: list[list[float]] = field(default_factory=list)
    attention_maps: np.ndarray | None = None
    phrases: list[str] = field(default_factory=list)
    token_indices: list[list[int]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _layout_energy(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    return layout_guidance_loss(maps, masks)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int = 1) -> None:
        pass


def as_layout(layout: Layout | Mapping | Sequence | None) -> Layout:
    """Accept a ``Layout``, its dict form, or ``[(phrase, (x0, y0, x1, y1)), ...]``."""
    if layout is None:
        return Layout()
    if isinstance(layout, Layout):
        return layout
    if isinstance(layout, Mapping):
        return Layout.from_dict(layout)
    if isinstance(layout, Sequence) and not isinstance(layout, str):
        return Layout.from_pairs(layout)
    raise TypeError(
        f"layout must be a Layout, a dict or a list of (phrase, box) pairs, got {type(layout).__name__}"
    )


class SaltPipeline(StableDiffusionPipeline):
    """Layout-controlled Stable Diffusion with spatial-aware latent initialization (SALT).

    Loads like any SD pipeline (``SaltPipeline.from_pretrained(id_or_folder)``,
    ``SaltPipeline.from_pipe(sd_pipe)``, plus ``"builtin:shapes"`` for the shipped model) and adds
    a ``layout``, an initializer (``init``) and a guidance method (``guidance``) to ``__call__``.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return super().from_pretrained(resolve_model(pretrained_model_name_or_path), **kwargs)

    # -- inputs --------------------------------------------------------------------------------------
    def _resolve_init(self, init, latents, reference_image, inversion_steps):
        if latents is not None:
            init = latents
        if reference_image is not None:
            if not (init == "salt" or isinstance(init, SpatialAwareInit)):
                raise ValueError("reference_image is only used by init='salt'")
            base = init if isinstance(init, SpatialAwareInit) else SpatialAwareInit()
            init = dataclasses.replace(base, reference=UserImages(image=reference_image))
        if isinstance(init, str):
            if init not in INIT_NAMES:
                raise ValueError(
                    f"init must be one of {INIT_NAMES}, an initializer or a latent tensor, got {init!r}"
                )
            init = SpatialAwareInit() if init == "salt" else RandomInit()
        if inversion_steps is not None:
            if not isinstance(init, SpatialAwareInit):
                raise ValueError("inversion_steps only applies to init='salt'")
            init = dataclasses.replace(init, inversion_steps=inversion_steps)
        if not (torch.is_tensor(init) or callable(init)):
            raise TypeError(
                f"init must be 'salt', 'random', an initializer or a tensor, got {type(init).__name__}"
            )
        return init

    def check_salt_inputs(
        self, prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt
    ):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string (one prompt per call), got {type(prompt).__name__}")
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(
                    f"{name} must be a positive multiple of {multiple} for this model, got {value!r}"
                )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}")
        if (
            not isinstance(guidance_scale, (int, float))
            or not np.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")

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
            latents = (
                init.to(device=self._execution_device, dtype=self.unet.dtype).expand(n, -1, -1, -1).clone()
            )
            return InitResult(latents, None, {"init": "tensor"})
        result = init(
            self,
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
        ids = self.tokenizer(prompt).input_ids
        boxed = {i for group in token_indices for i in group}
        return [i for i in range(1, len(ids) - 1) if i not in boxed]

    # -- the call ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        layout: Layout | Mapping | Sequence | None = None,
        *,
        init: str | Callable | torch.Tensor = "salt",
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
            layout: boxed phrases of the prompt (``Layout``, its dict form, or ``[(phrase, box), ...]``
                with normalized ``x0, y0, x1, y1``); phrases are found with the pipeline's tokenizer.
            init: ``"salt"`` (spatial-aware init, default settings), ``"random"``, any initializer
                (``SpatialAwareInit(...)``, ``RandomInit()``, your own callable), or a latent tensor.
            guidance: ``"salt"``, ``"layout-guidance"``, ``"boxdiff"``, ``"none"`` or a ``GuidanceConfig``.
            seed: shorthand for ``generator=torch.Generator("cpu").manual_seed(seed)``.
            reference_image: a whole reference image for ``init="salt"`` (instead of generated objects).
            inversion_steps: override ``SpatialAwareInit.inversion_steps`` for ``init="salt"``.
            return_attention_maps: also return per-phrase attention maps averaged over steps.
        """
        # 1. Check inputs
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        self.check_salt_inputs(
            prompt, height, width, num_inference_steps, guidance_scale, num_images_per_prompt
        )
        layout = as_layout(layout)
        if not prompt.strip() and len(layout):
            raise ValueError(
                "prompt is empty but the layout has boxes: every boxed phrase must be in the prompt"
            )
        token_indices = layout.resolve_tokens(self.tokenizer, prompt)
        if isinstance(guidance, str):
            guidance = GuidanceConfig(loss=guidance)
        elif not isinstance(guidance, GuidanceConfig):
            raise TypeError(f"guidance must be a name or a GuidanceConfig, got {type(guidance).__name__}")
        init = self._resolve_init(init, latents, reference_image, inversion_steps)
        if seed is not None:
            if generator is not None:
                raise ValueError("pass either seed or generator, not both")
            generator = torch.Generator("cpu").manual_seed(int(seed))
        device = self._execution_device
        n = num_images_per_prompt
        do_cfg = guidance_scale > 1.0

        # 2. Encode the prompt
        prompt_embeds, negative_embeds = self.encode_prompt(prompt, device, n, do_cfg, negative_prompt)
        embeds = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds

        # 3. Initial latents (before set_timesteps: an initializer may run the pipeline itself)
        init_result = self._init_latents(
            init, prompt, layout, generator, height, width, num_inference_steps, n
        )
        latents = init_result.latents
        init_latent = latents.detach().cpu().clone()

        # 4. Timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 5. Denoising loop with attention guidance on the first steps
        targets = GuidanceTargets(
            token_indices=token_indices,
            layout_masks=lambda h, w: layout.masks(h, w),
            unboxed_indices=(
                self._unboxed_indices(prompt, token_indices)
                if guidance.loss == "salt" and guidance.unboxed_weight > 0
                else []
            ),
        )
        tracking = GuidanceTargets(token_indices=token_indices, layout_masks=targets.layout_masks)
        guide = guidance.enabled and len(layout) > 0
        track = len(layout) > 0
        layout_losses: list[float] = []
        guidance_losses: list[list[float]] = []
        maps_sum: torch.Tensor | None = None
        capture = (
            capture_cross_attention(self.unet, guidance.layers) if track else nullcontext(AttentionStore())
        )
        bar = self.progress_bar(total=len(timesteps)) if progress else _NoBar()
        alphas_cumprod = self.scheduler.alphas_cumprod
        with capture as store, bar as progress_bar:
            store.latent_hw = tuple(latents.shape[-2:])
            for i, t in enumerate(timesteps):
                if guide and i < guidance.guidance_steps:
                    store.batch_rows = None
                    cond = prompt_embeds

                    def unet_cond(z, t=t, cond=cond):
                        self.unet(self.scheduler.scale_model_input(z, t), t, encoder_hidden_states=cond)

                    result = guided_update(
                        unet_cond,
                        latents,
                        store,
                        targets,
                        guidance,
                        step_scale(alphas_cumprod, t, guidance.step_size_schedule),
                    )
                    latents = result.latents
                    guidance_losses.append(result.losses)

                store.batch_rows = slice(n, 2 * n) if do_cfg else None
                store.reset()
                latent_in = torch.cat([latents] * 2) if do_cfg else latents
                latent_in = self.scheduler.scale_model_input(latent_in, t)
                noise_pred = self.unet(latent_in, t, encoder_hidden_states=embeds).sample
                if track:
                    layout_losses.append(float(layer_losses(store, tracking, _layout_energy)))
                    if return_attention_maps:
                        maps = store.phrase_maps(token_indices, size=tuple(latents.shape[-2:])).float()
                        maps_sum = maps if maps_sum is None else maps_sum + maps
                    store.reset()
                if do_cfg:
                    noise_uncond, noise_text = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[
                    0
                ]

                if callback_on_step_end is not None:
                    local = {"latents": latents, "prompt_embeds": prompt_embeds}
                    callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                progress_bar.update()

        # 6. Decode
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()

        attention_maps = None
        if maps_sum is not None:
            attention_maps = (maps_sum / len(timesteps)).cpu().numpy()
        output = SaltOutput(
            images=images,
            reference_image=init_result.reference_image,
            init_latent=init_latent,
            layout_losses=layout_losses,
            guidance_losses=guidance_losses,
            attention_maps=attention_maps,
            phrases=layout.phrases,
            token_indices=token_indices,
            info={**init_result.info, "guidance": guidance.to_dict()},
        )
        if not return_dict:
            return (output.images, output.reference_image)
        return output


__all__ = ["SaltPipeline", "SaltOutput", "resolve_model", "builtin_models", "LayoutError", "DEFAULT_MODEL"]
