"""Initial latents z_T: random Gaussian noise, or SALT's spatial-aware inversion of a reference.

An initializer is any callable ``init(ctx, prompt, layout, generator, *, height, width,
num_inference_steps, num_images) -> InitResult``, where ``ctx`` is the
:class:`~saltdiff.init_context.InitContext` the pipeline builds for the call (never the pipeline
itself); the pipeline does not care which one it gets, and the guidance method does not care
either (plug-and-play).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from .init_context import InitContext
from .inversion import ddim_invert, inversion_timesteps
from .layout import Layout
from .losses import gaussian_blur
from .reference import OBJECT_STEPS, GeneratedObjects, ReferenceBuilder, ReferenceImage
from .registry import INITIALIZERS, check_fields
from .samplers import ancestral_start_skip, config_family, sampler_start_timestep, to_sampler_space

#: Reverse-Euler steps of SALT's flow inversion when ``inversion_steps`` is unset (:mod:`saltdiff.flow_init`).
#: Chosen on the tuning split with ``builtin:shapes-mmdit`` (``saltdiff study inversion-steps``, 32
#: layouts): 1 / 2 / 5 / 10 steps gave mIoU 0.133 / 0.141 / 0.186 / 0.211 and prompt accuracy 0.06 /
#: 0.06 / 0.03 / 0.16 (10 against 5 beyond noise on prompt accuracy, paired bootstrap); unlike DDIM
#: inversion on the UNet model, a deeper flow inversion keeps more of the layout. Unmeasured on real
#: SD3/FLUX weights. The memo inverts a layout once, so only a layout's first image pays for the depth.
FLOW_INVERSION_STEPS = 10

#: Steps of each object generation for SALT's reference on a flow model when the ``objects`` builder's
#: ``num_inference_steps`` is unset (UNet models: :data:`saltdiff.reference.OBJECT_STEPS`, 25). Chosen
#: on the tuning split with ``builtin:shapes-mmdit`` (64 layouts, session 14): 10 against 25 steps gave
#: mIoU +0.030 (-0.010 ... +0.076, paired bootstrap) and the same reference IoU, and cut the time of a
#: layout's first image (its objects not cached yet) from 3.62x to 2.67x that of plain sampling.
FLOW_OBJECT_STEPS = 10

#: Latent cells the kept region is feathered over when ``feather`` is unset, on the UNet models (the
#: feather study on the UNet model's tuning split, :class:`SpatialAwareInit`).
FEATHER = 3.5

#: ``feather`` on a flow model when unset. On ``builtin:shapes-mmdit``'s 16x16 latent, 3.5 cells keep
#: only a fifth to a half of z_T* inside an object (the rest is fresh noise), and the joint attention
#: lets that noise re-decide the whole layout: without guidance at CFG 5 the start carried almost nothing
#: (box IoU 0.09 where the reference held the object). Chosen on the tuning split (session 15, 32
#: layouts x 2 seeds, paired against 3.5): 1 cell gave mIoU +0.063 (+0.021 ... +0.112), and +0.090
#: (+0.041 ... +0.135) with mAP@0.5 +0.165 on 96 layouts; 0, 1.5 and 2 were within noise of 3.5, 0.5
#: within noise of 1 on mIoU but lost unboxed recall against it (benchmarks/RESULTS.md).
FLOW_FEATHER = 1.0


@dataclass
class InitResult:
    latents: torch.Tensor  # [num_images, C, h, w], in the sampler's noise space (see saltdiff.samplers)
    reference: ReferenceImage | None = None
    info: dict[str, Any] = field(default_factory=dict)
    #: the latent is at the first timestep of ``steps + start_skip`` steps without the noisiest
    #: ``start_skip`` (``samplers.set_sampler_timesteps``); sampling must start there
    start_skip: int = 0

    @property
    def reference_image(self) -> Image.Image | None:
        return None if self.reference is None else self.reference.image


class Initializer(Protocol):
    """What the pipeline calls for the initial latent: ``ctx`` is what it may use of the pipeline
    (:class:`~saltdiff.init_context.InitContext`: denoiser, sampler, device, dtype, ``latent_shape``,
    the reference's VAE latent, the inversion's conditioning, the object generator, the z_T* memo).
    An initializer written for the old ``init(pipe, ...)`` that reads a pipeline attribute the
    context lacks (``pipe.unet``) fails in one line naming it."""

    def __call__(
        self,
        ctx: InitContext,
        prompt: str,
        layout: Layout,
        generator: torch.Generator | None,
        *,
        height: int,
        width: int,
        num_inference_steps: int,
        num_images: int = 1,
    ) -> InitResult: ...


@dataclass
class RandomInit:
    """z_T ~ N(0, I) (times the scheduler's ``init_noise_sigma``): the usual baseline."""

    def __call__(self, ctx, prompt, layout, generator, *, height, width, num_inference_steps, num_images=1):
        shape = ctx.latent_shape(num_images, height, width)
        latents = randn_tensor(shape, generator=generator, device=ctx.device, dtype=ctx.dtype)
        return InitResult(latents * ctx.scheduler.init_noise_sigma, None, {"init": "random"})


def inversion_memo_key(
    init: SpatialAwareInit, ctx: InitContext, image: Image.Image, text: str, steps: int
) -> str | None:
    """Everything z_T* depends on, hashed; ``None`` (no reuse) when the model has no stable identity
    (an in-memory model, as for the object cache), the reference builder's cache is off, or the
    inversion draws noise. Weights changed in place (a LoRA fused into a loaded model) are not seen,
    as with the object cache."""
    identity = ctx.objects.identity
    if not identity or not getattr(init.reference, "cache", True) or init.inversion_noise_scale > 0:
        return None
    scheduler = ctx.scheduler
    digest = hashlib.sha256(image.convert("RGB").tobytes())
    parts = [
        identity,
        str(ctx.device),
        image.size,
        digest.hexdigest(),
        text,
        init.depth(scheduler, steps),
        steps,
        init.start_skip(scheduler, steps),
        type(scheduler).__name__,
        {k: v for k, v in sorted(scheduler.config.items()) if not k.startswith("_")},
    ]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def _grid_fits(scheduler, steps: int, end: int) -> bool:
    try:
        inversion_timesteps(scheduler, steps, end)
    except ValueError:
        return False
    return True


#: The inversion depth of an unset ``inversion_steps`` wherever the sampler's first timestep allows it.
DEFAULT_INVERSION_STEPS = 5


def default_inversion_steps(scheduler, end_timestep: int, most: int = DEFAULT_INVERSION_STEPS) -> int:
    """The depth an unset ``inversion_steps`` takes: ``most`` (5), or the largest fewer steps whose
    grid can end at ``end_timestep`` (few sampling steps start low, and ``DDIMInverseScheduler``
    steps by ``1000 // K``; e.g. SD's 4-step "leading" sampler starts at 751: 4 steps). One step
    always fits, so this never fails; at 25 or 50 steps it is 5."""
    return next((k for k in range(most, 1, -1) if _grid_fits(scheduler, k, end_timestep)), 1)


@dataclass
class SpatialAwareInit:
    """SALT's initializer: z_T* = DDIM-inversion(VAE(reference image)) in ``inversion_steps`` steps.

    The inversion runs with guidance scale 1 on the empty prompt (or the full prompt) up to the
    sampler's first timestep, so sampling starts exactly at the noise level the latent has, and the
    result is put into the sampler's noise space (Euler-type samplers scale it by ``sqrt(1 + sigma^2)``). Few
    steps keep the layout and drop the details (the paper's "finite" inversion).

    Fresh noise from the call's generator is blended in, variance preserving
    (``sqrt(1-w) z + sqrt(w) eps``): ``noise_outside`` outside the kept region and ``noise_inside``
    within it, feathered over ``feather`` latent cells. ``keep_region`` is ``"boxes"`` (the layout's
    boxes) or ``"objects"`` (only the pixels where an object was pasted, so that a box's corners
    follow the prompt's background too). Without fresh noise the start is the same for every seed
    and everything outside the objects is whatever the reference shows (the first version's
    "collage"). The defaults (all fresh noise outside the pasted objects, feathered over 3.5 cells;
    ``feather`` unset is :data:`FEATHER`, and :data:`FLOW_FEATHER`, 1 cell, on flow models) come from the noise-outside, feather and keep-region studies in ``benchmarks/RESULTS.md``: on the
    tuning split at CFG 5, feather 2 / 2.5 / 3 / 3.5 / 4 gave background 0.897 / 0.923 / 0.949 (seeded
    place) / 0.987 / 0.987, the last two `sd`'s level, while layout and seed diversity fall a little with
    each cell and beyond noise at 4 (RESULTS.md, "feather 3.5"). With feather 2, on
    the shapes suite (200 layouts × 2 seeds) they cost layout precision (mIoU 0.733 / mAP@0.5 0.746,
    against 0.805 / 0.941 without fresh noise on a white reference) and bring back the prompt's
    background (95 % right, was 29 %), its unboxed objects (77 %, was 12 %) and the seed (no two
    seeds alike, was every pair identical).

    ``inversion_steps`` trades layout for freedom (unset, ``None``: 5 steps, or fewer where the
    sampler's first timestep is too low for 5, see :func:`default_inversion_steps` and
    :meth:`depth`; an explicit value that cannot end there is refused by :meth:`check_steps`): with SALT guidance on the built-in model
    (``saltdiff study inversion-steps``, 50 layouts, white reference, shipped grounded weights)
    1 / 5 / 10 / 25 steps gave mIoU 0.840 / 0.826 / 0.772 / 0.716, mAP@0.5 0.959 / 0.970 / 0.906 /
    0.824 and text alignment 0.840 / 0.840 / 0.840 / 0.894; 5 has the best mAP@0.5, 1 nearly copies
    the reference, and more steps let the text decide more.
    """

    reference: ReferenceBuilder = field(default_factory=GeneratedObjects)
    inversion_steps: int | None = None
    inversion_method: str = "euler"
    inversion_prompt: str = "empty"
    noise_outside: float = 1.0
    noise_inside: float = 0.0
    keep_region: str = "objects"
    feather: float | None = None
    inversion_noise_scale: float = 0.0
    ancestral_skip: float = 0.14

    def __post_init__(self) -> None:
        check_fields(self, INITIALIZERS.get("salt").params, "SpatialAwareInit")
        if not callable(getattr(self.reference, "build", None)):
            raise TypeError(f"reference must be a reference builder, got {type(self.reference).__name__}")

    def kept_region(self, layout: Layout, reference: ReferenceImage, size) -> torch.Tensor:
        """``[h, w]`` in [0, 1]: where z_T* is kept (1) rather than renewed, at the latent's size."""
        h, w = int(size[0]), int(size[1])
        if not len(layout):
            return torch.zeros(h, w)
        if self.keep_region == "objects":
            pixels = torch.from_numpy(np.asarray(reference.all_masks, dtype=np.float32))
            masks = torch.nn.functional.adaptive_avg_pool2d(pixels[None], (h, w))[0]
        else:
            masks = layout.masks(h, w)
        feather = FEATHER if self.feather is None else self.feather  # resolved() sets the family's
        return gaussian_blur(masks, feather, truncate=3.0).amax(0).clamp(0, 1)

    def invert(
        self, ctx: InitContext, image: Image.Image, prompt: str, generator, *, num_inference_steps: int
    ) -> torch.Tensor:
        """z_T* of one reference image (shape [1, C, h, w]).

        The pipeline's family hooks give the VAE latent (``ctx.encode_reference``: SDXL's VAE runs
        in fp32) and the UNet's conditioning (``ctx.inversion_conditioning``: SDXL adds pooled
        embeddings and ``time_ids``). The inversion is deterministic, so the pipeline keeps the last
        few z_T* (``ctx.memo``, :func:`inversion_memo_key`): the same layout with another seed, or
        the next image of a batch call, reuses it (a sixth of ``sd``'s time on the built-in model)."""
        text = prompt if self.inversion_prompt == "prompt" else ""
        key = inversion_memo_key(self, ctx, image, text, num_inference_steps)
        return ctx.memo.get_or_compute(
            key, lambda: self._invert(ctx, image, text, generator, num_inference_steps=num_inference_steps)
        )

    def _invert(
        self, ctx: InitContext, image: Image.Image, text: str, generator, *, num_inference_steps: int
    ):
        z0 = ctx.encode_reference(image)
        embeds, model_kwargs = ctx.inversion_conditioning(text, image.height, image.width)
        return ddim_invert(
            ctx.denoiser,
            ctx.scheduler,
            z0.to(ctx.dtype),
            embeds,
            num_inference_steps=self.depth(ctx.scheduler, num_inference_steps),
            end_timestep=self.end_timestep(ctx.scheduler, num_inference_steps),
            noise_scale=self.inversion_noise_scale,
            generator=generator,
            model_kwargs=model_kwargs,
        )

    def start_skip(self, scheduler, num_inference_steps: int) -> int:
        """The noisiest steps SALT's start skips: ``ancestral_skip`` of a longer schedule under an
        ancestral sampler, whose fresh noise at every step keeps only ``sigma / sigma_start`` of the
        start's own noise (the layout) at level ``sigma``; none under a deterministic one."""
        return ancestral_start_skip(scheduler, num_inference_steps, self.ancestral_skip)

    def end_timestep(self, scheduler, num_inference_steps: int) -> int:
        """Where the inversion ends: the timestep sampling starts at (after :meth:`start_skip`)."""
        return sampler_start_timestep(
            scheduler, num_inference_steps, self.start_skip(scheduler, num_inference_steps)
        )

    def depth(self, scheduler, num_inference_steps: int) -> int:
        """The inversion steps this call uses: ``inversion_steps``, or when it is unset
        :func:`default_inversion_steps` for the sampler's first timestep at ``num_inference_steps``
        (a flow-matching sampler: :data:`FLOW_INVERSION_STEPS`, on its own sigma grid, which every
        depth fits)."""
        if self.inversion_steps is not None:
            return self.inversion_steps
        if config_family(scheduler.config) == "flow":
            return FLOW_INVERSION_STEPS
        return default_inversion_steps(scheduler, self.end_timestep(scheduler, num_inference_steps))

    def resolved(self, scheduler, num_inference_steps: int) -> SpatialAwareInit:
        """A copy as a model with this sampler runs it, what a recipe records: an unset
        ``inversion_steps`` set to :meth:`depth`, an unset ``feather`` to the family's
        (:data:`FLOW_FEATHER` on a flow-matching model, :data:`FEATHER` on the others) and the
        reference builder's unset object steps too (:meth:`builder`)."""
        feather = self.feather
        if feather is None:
            feather = FLOW_FEATHER if config_family(scheduler.config) == "flow" else FEATHER
        return replace(
            self,
            inversion_steps=self.depth(scheduler, num_inference_steps),
            feather=feather,
            reference=self.builder(scheduler),
        )

    def builder(self, scheduler) -> ReferenceBuilder:
        """The reference builder as a model with this sampler runs it: a builder whose
        ``num_inference_steps`` is unset (``GeneratedObjects``) gets :data:`FLOW_OBJECT_STEPS` on a
        flow-matching model and :data:`~saltdiff.reference.OBJECT_STEPS` on the others."""
        if getattr(self.reference, "num_inference_steps", 0) is not None:
            return self.reference
        steps = FLOW_OBJECT_STEPS if config_family(scheduler.config) == "flow" else OBJECT_STEPS
        return replace(self.reference, num_inference_steps=steps)

    def check_steps(self, scheduler, num_inference_steps: int) -> None:
        """One line, before any work, when an explicit ``inversion_steps`` cannot end at the sampler's
        first timestep (few sampling steps start low; ``DDIMInverseScheduler`` steps by 1000 // K)."""
        if self.inversion_steps is None or config_family(scheduler.config) == "flow":
            return  # the default depth always fits, and any depth fits a flow sampler's own grid
        end = self.end_timestep(scheduler, num_inference_steps)
        if not _grid_fits(scheduler, self.inversion_steps, end):
            fits = [k for k in range(1, self.inversion_steps) if _grid_fits(scheduler, k, end)]
            raise ValueError(
                f"inversion_steps={self.inversion_steps} cannot end at the sampler's first timestep {end} "
                f"({num_inference_steps} sampling steps): use inversion_steps <= {max(fits)} "
                "(--inversion-steps) or more sampling steps (--steps)"
            )

    def __call__(self, ctx, prompt, layout, generator, *, height, width, num_inference_steps, num_images=1):
        if self.inversion_method != "euler":
            raise ValueError(
                f"inversion_method={self.inversion_method!r} is for flow models (SD3, FLUX): "
                "a UNet model inverts with DDIM (use 'euler')"
            )
        self.check_steps(ctx.scheduler, num_inference_steps)
        resolved = self.resolved(ctx.scheduler, num_inference_steps)  # the family's values of unset fields
        return resolved._start(
            ctx,
            prompt,
            layout,
            generator,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            num_images=num_images,
        )

    def _start(self, ctx, prompt, layout, generator, *, height, width, num_inference_steps, num_images):
        reference = self.reference.build(
            ctx.objects, prompt, layout, height=height, width=width, generator=generator
        )
        if reference.image.size != (width, height):
            raise ValueError(
                f"reference builder returned a {reference.image.size} image, expected {(width, height)}"
            )
        latents = self.invert(
            ctx, reference.image, prompt, generator, num_inference_steps=num_inference_steps
        )
        latents = latents.expand(num_images, -1, -1, -1).clone()
        if self.noise_outside > 0 or self.noise_inside > 0:
            keep = self.kept_region(layout, reference, latents.shape[-2:]).to(latents)
            weight = self.noise_inside * keep + self.noise_outside * (1 - keep)
            noise = randn_tensor(
                latents.shape, generator=generator, device=latents.device, dtype=latents.dtype
            )
            latents = torch.sqrt(1 - weight) * latents + torch.sqrt(weight) * noise
        skip = self.start_skip(ctx.scheduler, num_inference_steps)
        latents = to_sampler_space(ctx.scheduler, latents, num_inference_steps, skip)
        info = {
            "init": "salt",
            "inversion_steps": self.depth(ctx.scheduler, num_inference_steps),
            "inversion_prompt": self.inversion_prompt,
            "start_skip": skip,
        }
        if reference.free_boxes:  # where the unboxed objects were placed (saltdiff.placement.free_boxes)
            info["placed_unboxed"] = [b.to_dict() for b in reference.free_boxes]
        return InitResult(latents, reference, info, start_skip=skip)
