"""The model-family seam: what differs between denoisers, behind one declared contract.

A family adapter (one module each: ``unet`` for SD 1.x/2.x, ``sd3``, ``flux``; SDXL next) owns everything that
differs between SD 1.x/2.x/XL UNets and flow-matching transformers: how the network is called, what
it is conditioned on, which text tokens the layout loss reads, which attention can be captured and
at what token grid, how latents are packed, and which noise family (:mod:`saltdiff.noise`) its
latents live in. The rest of the package (initializers, inversion, guidance, the sampling loop)
talks to :class:`FamilyAdapter` only.

Conventions every adapter keeps, so callers never branch on the family:

- **Latents are ``[B, C, h, w]``** (the VAE's latent, scaled and shifted as the network expects)
  on both sides of the contract; packing (FLUX's 2x2 patches into a token sequence) happens inside
  :meth:`FamilyAdapter.denoise`. Guidance gradients and box masks are therefore always spatial;
  packing is a permutation, so a gradient step commutes with it.
- **Noise levels are sigmas** of the adapter's :attr:`~FamilyAdapter.noise_family`: the adapter
  converts a sigma into its network's timestep (SD3: ``1000 sigma``; FLUX: ``sigma``; a VP UNet:
  the discrete timestep of ``sqrt((1 - a) / a)``), so :mod:`saltdiff.flow_inversion` takes
  ``lambda x, s: adapter.denoise(x, s, conditions)`` as its velocity.
- :meth:`~FamilyAdapter.denoise` returns the network's own prediction (flow: the velocity
  ``eps - x0``; VP: epsilon or v per the scheduler's ``prediction_type``); :mod:`saltdiff.noise`
  turns it into ``x0`` / ``eps``.
- Captured maps are distributions over the text tokens per image token (joint attention:
  ``[B, image_tokens, T]``; UNet cross-attention keeps its heads), always read through the
  :class:`~saltdiff.attention.AttentionStore` interface (``phrase_maps_per_layer``, what
  ``guidance.layer_losses`` reads), with each layer's grid taken from the call itself;
  :meth:`~FamilyAdapter.phrase_tokens` returns column indices of those maps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ..noise import NOISE_FAMILIES

__all__ = ["Conditions", "FamilyAdapter", "check_adapter", "guided_denoiser", "vae_decode", "vae_encode"]


@dataclass(frozen=True)
class Conditions:
    """What one denoiser call is conditioned on, one row per latent.

    Attributes:
        embeds: ``[B, T, D]``: the text sequence the network attends to (its ``T`` columns are what
            :meth:`FamilyAdapter.phrase_tokens` indexes).
        pooled: ``[B, P]`` pooled text embeddings (SD3, FLUX, SDXL), or ``None``.
        extras: further per-family inputs under the network's own argument names (FLUX's
            ``txt_ids``, ``guidance``; SDXL's ``time_ids``).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.ndim != 3:
            shape = tuple(self.embeds.shape) if isinstance(self.embeds, torch.Tensor) else self.embeds
            raise ValueError(f"embeds must be a [B, T, D] tensor, got {shape!r}")
        if self.pooled is not None and (
            not isinstance(self.pooled, torch.Tensor)
            or self.pooled.ndim != 2
            or self.pooled.shape[0] != self.embeds.shape[0]
        ):
            shape = tuple(self.pooled.shape) if isinstance(self.pooled, torch.Tensor) else self.pooled
            raise ValueError(
                f"pooled must be [B, P] with B = {self.embeds.shape[0]} (the embeds' batch), got {shape!r}"
            )

    @property
    def batch(self) -> int:
        return self.embeds.shape[0]

    def rows(self, index: slice | Sequence[int]) -> Conditions:
        """These rows only (e.g. the conditional half of a classifier-free-guidance batch)."""
        pooled = None if self.pooled is None else self.pooled[index]
        return Conditions(self.embeds[index], pooled, self.extras)

    @staticmethod
    def cat(*parts: Conditions) -> Conditions:
        """The rows of ``parts`` stacked in order (a ``[negative; conditional]`` batch); extras from the first.

        Text sequences of different lengths cannot share a batch: ``ValueError`` naming both shapes.
        """
        if not parts:
            raise ValueError("Conditions.cat needs at least one Conditions")
        shapes = {tuple(p.embeds.shape[1:]) for p in parts}
        if len(shapes) > 1 or len({p.pooled is None for p in parts}) > 1:
            raise ValueError(
                f"cannot stack conditions with embeds {sorted(shapes)} and pooled of mixed presence"
            )
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return Conditions(torch.cat([p.embeds for p in parts]), pooled, parts[0].extras)

    def repeat(self, n: int) -> Conditions:
        """Each row repeated ``n`` times in place (one prompt for ``n`` latents)."""
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(n, dim=0)
        return Conditions(self.embeds.repeat_interleave(n, dim=0), pooled, self.extras)


@runtime_checkable
class FamilyAdapter(Protocol):
    """The contract between saltdiff and one model family (see the module docstring for conventions).

    Attributes:
        name: the family's name (``"sd3"``, ``"flux"``, ``"unet"``).
        noise_family: ``"vp"`` or ``"flow"`` (:data:`saltdiff.noise.NOISE_FAMILIES`).
        size_multiple: image height and width must be multiples of this many pixels.
        latent_channels: ``C`` of the ``[B, C, h, w]`` latents.
    """

    name: str
    noise_family: str
    size_multiple: int
    latent_channels: int

    def schedule_kwargs(self, num_inference_steps: int, latent_hw: tuple[int, int]) -> dict:
        """What the family's pipeline passes to ``scheduler.set_timesteps`` (step count or custom sigmas,
        FLUX's ``mu``): inversion and sampling must run the same grid."""
        ...

    def conditions(self, prompt: str | list[str]) -> Conditions:
        """Encode ``prompt`` (one row per prompt) with every text encoder the network reads."""
        ...

    def denoise(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, conditions: Conditions
    ) -> torch.Tensor:
        """The network's prediction for ``[B, C, h, w]`` latents at ``sigma``: the only network call."""
        ...

    def phrase_tokens(self, prompt: str, phrase: str, occurrence: int | None = None) -> list[int]:
        """Columns of the captured maps (positions in ``conditions(prompt).embeds``) that make up ``phrase``."""
        ...

    def attention_layers(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Every capturable attention layer -> its token grid ``(h, w)`` for a latent of ``latent_hw``."""
        ...

    def capture(self, layers: Sequence[str] | None = None, store=None) -> contextlib.AbstractContextManager:
        """A context manager that installs the capture processors on ``layers`` and restores the originals."""
        ...

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> what the network takes (identity unless the family packs)."""
        ...

    def unpack(self, output: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """The network's output -> ``[B, C, h, w]`` (the inverse of :meth:`pack`)."""
        ...

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in ``[-1, 1]``, ``[B, 3, H, W]`` -> the network's latents (VAE mean, scaled and shifted)."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The network's latents -> images in ``[-1, 1]`` (the inverse of :meth:`encode`'s scaling)."""
        ...


def check_adapter(adapter) -> None:
    """One ``ValueError`` line when ``adapter`` does not declare the contract's attributes sensibly."""
    if not isinstance(adapter, FamilyAdapter):
        raise ValueError(f"{type(adapter).__name__} does not implement FamilyAdapter")
    if adapter.noise_family not in NOISE_FAMILIES:
        raise ValueError(
            f"{adapter.name}: noise_family must be one of {NOISE_FAMILIES}, got {adapter.noise_family!r}"
        )
    if not isinstance(adapter.size_multiple, int) or adapter.size_multiple < 1:
        raise ValueError(
            f"{adapter.name}: size_multiple must be a positive int, got {adapter.size_multiple!r}"
        )


def guided_denoiser(
    adapter, conditions: Conditions, negative: Conditions | None = None, guidance_scale: float = 1.0
):
    """``(x, sigma) -> prediction`` with classifier-free guidance ``u_neg + g (u_cond - u_neg)`` composed in.

    One network call per evaluation (the ``[negative; conditional]`` rows in one batch), as the
    pipelines do; with ``guidance_scale`` 1 only the conditional rows run. The result is a plain
    velocity callable for :func:`saltdiff.flow_inversion.flow_invert` (k-diffusion's
    ``CFGDenoiser``: guidance by composition, the integrator untouched).
    """
    if not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 1.0:
        raise ValueError(f"guidance_scale must be a number >= 1 (1 = no guidance), got {guidance_scale!r}")
    if guidance_scale == 1.0:
        return lambda x, sigma: adapter.denoise(x, sigma, conditions)
    if negative is None:
        raise ValueError(f"guidance_scale={guidance_scale} > 1 needs negative conditions")
    both = Conditions.cat(negative, conditions)

    def denoise(x: torch.Tensor, sigma) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        out = adapter.denoise(torch.cat([x, x]), sigma.repeat(2) if sigma.ndim else sigma, both)
        uncond, cond = out.chunk(2)
        return uncond + guidance_scale * (cond - uncond)

    return denoise


def vae_encode(vae, images: torch.Tensor) -> torch.Tensor:
    """``(VAE mean - shift_factor) * scaling_factor``: the latents a family's network works in
    (SD's VAEs have no shift; SD3's and FLUX's do). One place for every adapter's ``encode``."""
    mean = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mean
    return (mean - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`vae_encode`: images in [-1, 1]."""
    shift = vae.config.get("shift_factor") or 0.0
    return vae.decode(latents / vae.config.scaling_factor + shift, return_dict=False)[0]
