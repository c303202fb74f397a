"""``SaltPipeline``: Stable Diffusion with a layout, attention guidance and a pluggable initial latent."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .attention import AttentionStore, capture_cross_attention
from .checkpoints import DEFAULT_MODEL, builtin_models, resolve_model, weights_stamp
from .components import check_component_dtypes, dtype_keyword, fit_tokenizer_length
from .guidance import GuidanceConfig, GuidanceTargets, guided_update, layer_losses, step_scale
from .init import InitResult, SpatialAwareInit
from .layout import Layout, LayoutError
from .losses import layout_guidance_loss
from .reference import GeneratedObject, UserImages
from .registry import INITIALIZERS
from .samplers import model_input_scale

logger = logging.getLogger(__name__)

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_INIT = "salt"


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


class _ObjectGenerator:
    """The narrow view of a pipeline that reference builders get: plain text-to-image, nothing else.

    ``identity`` names the model's weights for on-disk caches (``None`` for an in-memory model,
    whose objects must never be shared through a cache).
    """

    def __init__(self, pipe: SaltPipeline) -> None:
        self._pipe = pipe

    @property
    def identity(self) -> list | None:
        pipe = self._pipe
        model_id = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
        if not model_id:
            return None
        return [str(model_id), weights_stamp(str(model_id)), str(pipe.unet.dtype)]

    def __call__(self, prompts, *, phrases=None, height, width, num_inference_steps, guidance_scale, seed):
        return self._pipe.generate_objects(
            prompts,
            phrases=phrases,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )


@dataclass
class _Denoised:
    latents: torch.Tensor
    layout_losses: list[float]
    guidance_losses: list[list[float]]
    mean_maps: torch.Tensor | None  # [B, K, h, w] phrase maps averaged over steps


class SaltPipeline(StableDiffusionPipeline):
    """Layout-controlled Stable Diffusion with spatial-aware latent initialization (SALT).

    Loads like any SD pipeline (``SaltPipeline.from_pretrained(id_or_folder)``,
    ``SaltPipeline.from_pipe(sd_pipe)``, plus ``"builtin:shapes"`` for the shipped model) and adds
    a ``layout``, an initializer (``init``) and a guidance method (``guidance``) to ``__call__``.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        name = str(pretrained_model_name_or_path)
        if "torch_dtype" not in kwargs and "dtype" not in kwargs:
            # One dtype throughout, whatever the files hold (transformers loads a text encoder in its
            # files' dtype, diffusers its models in fp32; the built-in model is fp16 on disk): fp32.
            kwargs[dtype_keyword()] = torch.float32
        pipe = super().from_pretrained(resolve_model(name), **kwargs)
        fit_tokenizer_length(pipe.tokenizer, pipe.text_encoder)
        return pipe

    # -- inputs --------------------------------------------------------------------------------------
    def _resolve_init(self, init, latents, reference_image, inversion_steps):
        if latents is not None:
            if init is not None:
                raise ValueError(
                    "pass either `latents` or `init`, not both (a latent tensor can also be given as init=)"
                )
            init = latents
        init = DEFAULT_INIT if init is None else init
        if reference_image is not None:
            if not (init == "salt" or isinstance(init, SpatialAwareInit)):
                raise ValueError("reference_image is only used by init='salt'")
            base = init if isinstance(init, SpatialAwareInit) else SpatialAwareInit()
            init = dataclasses.replace(base, reference=UserImages(image=reference_image))
        if isinstance(init, str):
            init = INITIALIZERS.get(init).load()()
        if inversion_steps is not None:
            if not isinstance(init, SpatialAwareInit):
                raise ValueError("inversion_steps only applies to init='salt'")
            init = dataclasses.replace(init, inversion_steps=inversion_steps)
        if not (torch.is_tensor(init) or callable(init)):
            raise TypeError(
                f"init must be one of {list(INITIALIZERS.names())}, an initializer or a latent tensor, "
                f"got {type(init).__name__}"
            )
        return init

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
        fit_tokenizer_length(self.tokenizer, self.text_encoder)  # pipelines built by hand or from_pipe
        multiple = self.vae_scale_factor * 2 ** (len(self.unet.config.down_block_types) - 1)
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
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
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {unknown} are not available; "
                f"choose from {list(CALLBACK_TENSOR_INPUTS)}"
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

    def object_generator(self) -> _ObjectGenerator:
        """What a reference builder may use of this pipeline: :meth:`generate_objects` and an identity."""
        return _ObjectGenerator(self)

    # -- the denoising loop --------------------------------------------------------------------------
    def _denoise(
        self,
        latents: torch.Tensor,
        *,
        scheduler,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        guidance_scale: float,
        extra_step_kwargs: dict,
        token_indices: list[list[int]] | None = None,
        layout_masks: Callable[[int, int], torch.Tensor] | None = None,
        guidance: GuidanceConfig | None = None,
        unboxed_indices: Sequence[int] = (),
        collect_maps: bool = False,
        on_step: Callable[[int, Any, torch.Tensor], torch.Tensor] | None = None,
        progress: bool = True,
    ) -> _Denoised:
        """The sampling loop: guided updates on the first steps, then one CFG step of ``scheduler``.

        Attention is captured only when ``token_indices`` is given (the capture processor computes
        attention explicitly, the default one does not); ``layout_masks`` turns on the per-step layout
        energy, ``guidance`` the guided updates, ``collect_maps`` the step-averaged phrase maps.
        """
        n = latents.shape[0]
        do_cfg = negative_embeds is not None
        embeds = torch.cat([negative_embeds, prompt_embeds]) if do_cfg else prompt_embeds
        timesteps = scheduler.timesteps
        track = token_indices is not None
        guide = track and guidance is not None and guidance.enabled and layout_masks is not None
        targets = tracking = None
        if layout_masks is not None:
            tracking = GuidanceTargets(token_indices=token_indices, layout_masks=layout_masks)
            targets = GuidanceTargets(token_indices, layout_masks, list(unboxed_indices))
        layout_losses: list[float] = []
        guidance_losses: list[list[float]] = []
        maps_sum: torch.Tensor | None = None
        layers = guidance.layers if guidance is not None else "default"
        capture = capture_cross_attention(self.unet, layers) if track else nullcontext(AttentionStore())
        check_loss = guidance.loss_fn() if guide else None
        bar = self.progress_bar(total=len(timesteps)) if progress else _NoBar()
        with capture as store, bar as progress_bar:
            store.latent_hw = tuple(latents.shape[-2:])
            for i, t in enumerate(timesteps):

                def denoise_pass(z, t=t):
                    store.batch_rows = slice(n, 2 * n) if do_cfg else None
                    store.reset()
                    z_in = scheduler.scale_model_input(torch.cat([z] * 2) if do_cfg else z, t)
                    return self.unet(z_in, t, encoder_hidden_states=embeds).sample

                noise_pred = denoise_pass(latents)
                if guide and i < guidance.guidance_steps:
                    # The pass above already holds this step's conditional attention: when its loss is
                    # under the threshold no gradient is needed (the usual case from z_T*), else the
                    # latent gets its gradient steps and the pass is redone on the updated latent.
                    loss_now = float(layer_losses(store, targets, check_loss, []))
                    if not loss_now < guidance.loss_threshold:
                        store.batch_rows = None

                        def unet_cond(z, t=t):
                            self.unet(z, t, encoder_hidden_states=prompt_embeds)

                        # gradient steps in the UNet's (VP) input space, whatever the sampler's own space
                        to_vp = model_input_scale(scheduler, t, latents)
                        scale = step_scale(scheduler.alphas_cumprod, t, guidance.step_size_schedule)
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
                    noise_pred = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                latents = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if on_step is not None:
                    latents = on_step(i, t, latents)
                progress_bar.update()
        mean_maps = None if maps_sum is None else maps_sum / len(timesteps)
        return _Denoised(latents, layout_losses, guidance_losses, mean_maps)

    def _decode(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(decoded, output_type=output_type)

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

        What a reference builder needs and no more: random init, classifier-free guidance, no
        layout and no guidance, a copy of the scheduler (a call in progress keeps its own). With
        ``phrases`` (one per prompt) each image also gets its phrase's cross-attention map, averaged
        over steps, for attention cut-outs.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        if phrases is not None and len(phrases) != len(prompts):
            raise ValueError(f"got {len(phrases)} phrases for {len(prompts)} prompts")
        self.check_salt_inputs(prompts[0], height, width, num_inference_steps, guidance_scale, 1)
        device = self._execution_device
        n = len(prompts)
        do_cfg = guidance_scale > 1.0
        prompt_embeds, negative_embeds = self.encode_prompt(prompts, device, 1, do_cfg, None)
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for _ in prompts]
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
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
                Layout.from_pairs([(phrase, (0.0, 0.0, 1.0, 1.0))]).resolve_tokens(self.tokenizer, prompt)[0]
                for prompt, phrase in zip(prompts, phrases)
            ]
        denoised = self._denoise(
            latents,
            scheduler=scheduler,
            prompt_embeds=prompt_embeds,
            negative_embeds=negative_embeds if do_cfg else None,
            guidance_scale=guidance_scale,
            extra_step_kwargs=self.prepare_extra_step_kwargs(generators, 0.0),
            token_indices=token_indices,
            collect_maps=phrases is not None,
            progress=False,
        )
        images = self._decode(denoised.latents, "np")
        maps = None if denoised.mean_maps is None else denoised.mean_maps.cpu().numpy()
        return [
            GeneratedObject(np.asarray(images[b], dtype=np.float32), None if maps is None else maps[b, b])
            for b in range(n)
        ]

    # -- the call ------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
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
            init: ``"salt"`` (spatial-aware init, the default), ``"random"``, any initializer
                (``SpatialAwareInit(...)``, ``RandomInit()``, your own callable), or a latent tensor.
                Registered names: :data:`saltdiff.registry.INITIALIZERS`.
            guidance: a registered loss name (``"salt"``, ``"layout-guidance"``, ``"boxdiff"``,
                ``"none"``) or a ``GuidanceConfig``.
            seed: shorthand for ``generator=torch.Generator("cpu").manual_seed(seed)``.
            latents: the initial latent, as in diffusers (the same as ``init=tensor``; not with ``init``).
            reference_image: a whole reference image for ``init="salt"`` (instead of generated objects).
            inversion_steps: override ``SpatialAwareInit.inversion_steps`` for ``init="salt"``.
            return_attention_maps: also return per-phrase attention maps averaged over steps.
        """
        # 1. Check inputs
        height, width = self._default_size(height, width)
        self.check_salt_inputs(
            prompt,
            height,
            width,
            num_inference_steps,
            guidance_scale,
            num_images_per_prompt,
            output_type,
            callback_on_step_end_tensor_inputs,
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

        # 3. Timesteps (before the initial latents: Euler-type samplers' init_noise_sigma depends on them)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra_step_kwargs = self.prepare_extra_step_kwargs(generator, eta)

        # 4. Initial latents (reference builders generate objects on a copy of the scheduler)
        init_result = self._init_latents(
            init, prompt, layout, generator, height, width, num_inference_steps, n
        )
        init_latent = init_result.latents.detach().cpu().clone()

        # 5. Denoising loop with attention guidance on the first steps
        on_step = None
        if callback_on_step_end is not None:

            def on_step(i, t, latents):
                local = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": negative_embeds,
                }
                callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                return callback_outputs.pop("latents", latents)

        has_boxes = len(layout) > 0
        unboxed = []
        if has_boxes and guidance.enabled and guidance.needs_unboxed_tokens:
            unboxed = self._unboxed_indices(prompt, token_indices)
        denoised = self._denoise(
            init_result.latents,
            scheduler=self.scheduler,
            prompt_embeds=prompt_embeds,
            negative_embeds=negative_embeds if do_cfg else None,
            guidance_scale=guidance_scale,
            extra_step_kwargs=extra_step_kwargs,
            token_indices=token_indices if has_boxes else None,
            layout_masks=(lambda h, w: layout.masks(h, w)) if has_boxes else None,
            guidance=guidance,
            unboxed_indices=unboxed,
            collect_maps=return_attention_maps and has_boxes,
            on_step=on_step,
            progress=progress,
        )

        # 6. Decode
        images = self._decode(denoised.latents, output_type)
        self.maybe_free_model_hooks()

        attention_maps = None if denoised.mean_maps is None else denoised.mean_maps.cpu().numpy()
        output = SaltOutput(
            images=images,
            reference_image=init_result.reference_image,
            init_latent=init_latent,
            layout_losses=denoised.layout_losses,
            guidance_losses=denoised.guidance_losses,
            attention_maps=attention_maps,
            phrases=layout.phrases,
            token_indices=token_indices,
            info={**init_result.info, "guidance": guidance.to_dict()},
        )
        if not return_dict:
            return (output.images, output.reference_image)
        return output


__all__ = ["SaltPipeline", "SaltOutput", "LayoutError", "DEFAULT_MODEL", "resolve_model", "builtin_models"]
