"""What an initializer gets of the pipeline (``InitContext``), and the z_T* a pipeline keeps (``InversionMemo``).

An initializer (:class:`saltdiff.init.Initializer`) is called with an :class:`InitContext`, not with
the pipeline: the denoiser and the call's sampler, the latent's device, dtype and shape, the family
hooks it may run (the VAE latent of a reference image, the inversion's conditioning or velocity),
the narrow object generator that reference builders get, and the pipeline's :class:`InversionMemo`.
Its callables (the hooks, the object generator) are bound to the pipeline; the pipeline object
itself is in no field, so an initializer does not re-enter the call or read the call's state. Each pipeline builds one per call
with ``init_context()`` (:meth:`saltdiff.salt_mixin.SaltMixin.init_context`,
:meth:`saltdiff.flow_pipeline.FlowSaltMixin.init_context`), where it calls the initializer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

    from .reference import ObjectGenerator

__all__ = ["INVERSION_MEMO_SIZE", "InitContext", "InversionMemo"]

#: How many z_T* a pipeline keeps (:class:`InversionMemo`).
INVERSION_MEMO_SIZE = 16


class InversionMemo:
    """The last ``size`` z_T* a pipeline inverted, by key (least recently used goes first).

    The inversion is deterministic, so the same layout with another seed, or the next image of a
    batch call, reuses its z_T* (:func:`saltdiff.init.inversion_memo_key`,
    :func:`saltdiff.flow_init.flow_memo_key`). Every pipeline owns one, ``pipe.inversion_memo``;
    ``pipe.inversion_memo.clear()`` forgets them (say, after changing weights in place, which no key sees).
    """

    def __init__(self, size: int = INVERSION_MEMO_SIZE) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an integer >= 0, got {size!r}")
        self.size = size
        self._latents: OrderedDict[Hashable, torch.Tensor] = OrderedDict()

    def get_or_compute(self, key: Hashable | None, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A copy of the z_T* kept under ``key``, else ``compute()`` run and a copy of it kept;
        ``key`` ``None``: run, nothing kept. The kept tensor itself is never handed out."""
        if key is not None and key in self._latents:
            self._latents.move_to_end(key)
            return self._latents[key].clone()
        latent = compute()
        if key is not None:
            self._latents[key] = latent.detach().clone()
            while len(self._latents) > self.size:
                self._latents.popitem(last=False)
        return latent

    def clear(self) -> None:
        """Forget every kept z_T*."""
        self._latents.clear()

    def __len__(self) -> int:
        return len(self._latents)

    def __contains__(self, key: object) -> bool:
        return key in self._latents

    def __repr__(self) -> str:
        return f"InversionMemo({len(self)} of {self.size})"


@dataclass(frozen=True)
class InitContext:
    """What an initializer may use of the pipeline that calls it (one call's worth).

    ``encode_reference`` gives the latent a reference image encodes to (SDXL's VAE in fp32, SD3's
    shift and scale); a VP model also gives ``inversion_conditioning`` (DDIM inversion's denoiser
    inputs), a flow model ``velocity`` and ``schedule_kwargs`` (its family adapter's, for flow
    inversion) and ``conditioning_key`` (what its conditioning depends on besides the text: the z_T*
    memo key).
    """

    denoiser: torch.nn.Module  # the UNet or the transformer (its dtype, DDIM inversion's network)
    scheduler: Any  # the call's sampler, its timesteps already set; read it, do not step it
    device: torch.device
    dtype: torch.dtype  # the denoiser's
    latent_channels: int
    vae_scale_factor: int
    objects: (
        ObjectGenerator  # what a reference builder gets; its ``identity`` names the model (None: in memory)
    )
    memo: InversionMemo  # the pipeline's
    encode_reference: Callable[[Image.Image], torch.Tensor]  # PIL image -> [1, C, h, w] latent
    #: VP: ``(text, height, width) -> (embeds, model_kwargs)`` for :func:`saltdiff.inversion.ddim_invert`
    inversion_conditioning: Callable[[str, int, int], tuple[torch.Tensor, dict]] | None = None
    #: flow: ``text -> ((x, sigma) -> velocity)`` at guidance scale 1
    velocity: Callable[[str], Callable[[torch.Tensor, Any], torch.Tensor]] | None = None
    #: flow: ``(steps, latent_hw) -> set_timesteps kwargs`` (the family's sigmas, FLUX's ``mu``)
    schedule_kwargs: Callable[[int, tuple[int, int]], dict] | None = None
    conditioning_key: tuple = ()

    def latent_shape(self, num_images: int, height: int, width: int) -> tuple[int, int, int, int]:
        """``(num_images, C, h, w)``: the latent of ``num_images`` images of ``height`` x ``width`` pixels."""
        return (
            num_images,
            self.latent_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )

    def __getattr__(self, name: str):
        # only reached for a name that is no field: an initializer written for the pipeline (`pipe.unet`)
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"InitContext has no {name!r}: initializers are called with an InitContext, not the pipeline "
            f"(saltdiff.init_context); it has {[f.name for f in fields(self)]} and latent_shape()"
        )
