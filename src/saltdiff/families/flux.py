"""The FLUX family adapter: ``FluxTransformer2DModel`` with CLIP (pooled only) and T5, flow matching.

What the adapter knows about FLUX (diffusers 0.42.1's ``FluxPipeline``):

- latents ``[B, 16, h, w]`` are packed into 2x2 patches, ``[B, (h/2)(w/2), 64]`` (:func:`pack_latents`),
  with RoPE positions ``img_ids`` ``(0, row, col)`` on the packed grid and ``txt_ids`` zeros;
- the transformer's ``timestep`` is the sigma (the pipeline passes ``timesteps / 1000``, computed
  here the same way so that the value is the pipeline's to the bit);
  guidance-distilled checkpoints (``guidance_embeds``, FLUX.1-dev) also take the guidance scale;
- the text sequence is T5's alone (CLIP gives only the pooled embedding), so phrase tokens are T5
  positions;
- the sampler runs custom sigmas ``linspace(1, 1/N, N)`` shifted by ``mu``, which grows with the
  image's token count (:meth:`FluxFamily.schedule_kwargs`);
- VAE latents are ``(mean - shift_factor) * scaling_factor``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..flow_inversion import dynamic_shift_mu
from ..joint_attention import capture_joint_attention, joint_attention_layers
from ..phrases import Phrase, check_sequence_length, resolve_boxes
from . import Conditions, vae_decode, vae_encode

__all__ = ["FluxFamily", "image_ids", "pack_latents", "unpack_latents"]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B, (h/2)(w/2), 4C]``: each 2x2 patch one token, channels-major (as FLUX)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 patches: latent height and width must be even, got {h}x{w}")
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for a latent of ``latent_hw``."""
    b, n, channels = tokens.shape
    h, w = (int(v) for v in latent_hw)
    if n != (h // 2) * (w // 2):
        raise ValueError(f"{n} tokens do not make a {h}x{w} latent of 2x2 patches")
    patches = tokens.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, h, w)


def image_ids(latent_hw: tuple[int, int], device=None, dtype=torch.float32) -> torch.Tensor:
    """``[(h/2)(w/2), 3]`` RoPE positions ``(0, row, col)`` of the packed tokens, row-major."""
    h, w = int(latent_hw[0]) // 2, int(latent_hw[1]) // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


class FluxFamily:
    """:class:`~saltdiff.families.FamilyAdapter` for a ``FluxPipeline``'s components.

    Args:
        pipe: the pipeline (nothing is changed on it).
        max_sequence_length: T5 tokens per prompt (FLUX's default 512).
        guidance_scale: the distilled guidance a ``guidance_embeds`` transformer is told
            (FluxPipeline's default 3.5); unused otherwise.
        joint_attention_kwargs: passed to every transformer call, as the pipeline passes its own
            (e.g. ``{"scale": 0.7}`` for a LoRA); ``None``: none.
    """

    name = "flux"
    noise_family = "flow"

    def __init__(
        self,
        pipe,
        *,
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        joint_attention_kwargs: dict | None = None,
    ):
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        if not isinstance(guidance_scale, (int, float)) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a number >= 0, got {guidance_scale!r}")
        if joint_attention_kwargs is not None and not isinstance(joint_attention_kwargs, dict):
            raise ValueError(
                f"joint_attention_kwargs must be a dict or None, got {type(joint_attention_kwargs).__name__}"
            )
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.guidance_scale = float(guidance_scale)
        self.joint_attention_kwargs = joint_attention_kwargs

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def size_multiple(self) -> int:
        """Pixels per token side: the VAE's downsampling times the 2x2 packing."""
        return int(self.pipe.vae_scale_factor) * 2

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels) // 4

    def schedule_kwargs(self, num_inference_steps: int, latent_hw: tuple[int, int]) -> dict:
        """What ``FluxPipeline`` passes to ``set_timesteps``: sigmas ``linspace(1, 1/N, N)`` and ``mu``
        for the image's packed token count; give them to :func:`~saltdiff.flow_inversion.inversion_sigmas`."""
        tokens = (int(latent_hw[0]) // 2) * (int(latent_hw[1]) // 2)
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return {"sigmas": sigmas, "mu": dynamic_shift_mu(self.pipe.scheduler.config, tokens)}

    def conditions(self, prompt: str | list[str]) -> Conditions:
        """``FluxPipeline.encode_prompt``: T5 states, CLIP's pooled embedding, and ``txt_ids``."""
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, max_sequence_length=self.max_sequence_length
        )
        return Conditions(embeds, pooled, {"txt_ids": text_ids})

    def timestep(self, sigma: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The transformer's ``timestep`` for ``sigma``, one per row, as ``FluxPipeline`` computes it:
        the scheduler's ``t = sigma * num_train_timesteps`` (float32), cast to the latents' dtype, ``/ 1000``
        (``t / 1000`` is not always ``sigma`` to the last bit)."""
        t = torch.as_tensor(sigma, dtype=torch.float32, device=like.device)
        t = (t * self.pipe.scheduler.config.num_train_timesteps).to(like.dtype)
        return (t.expand(batch) if t.ndim == 0 else t) / 1000

    def denoise(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, conditions: Conditions
    ) -> torch.Tensor:
        """The velocity ``eps - x0`` the transformer predicts for ``[B, C, h, w]`` latents at ``sigma``."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        if conditions.batch != latents.shape[0]:
            raise ValueError(f"conditions have {conditions.batch} rows for {latents.shape[0]} latents")
        batch, hw = latents.shape[0], tuple(latents.shape[-2:])
        tokens = self.pack(latents)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=tokens.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens,
            timestep=self.timestep(sigma, batch, tokens),
            guidance=guidance,
            pooled_projections=conditions.pooled,
            encoder_hidden_states=conditions.embeds,
            txt_ids=conditions.extras["txt_ids"],
            img_ids=image_ids(hw, device=tokens.device, dtype=tokens.dtype),
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
        return self.unpack(out, hw)

    def phrase_tokens(self, prompt: str, phrase: str, occurrence: int | None = None) -> list[int]:
        """T5 positions of ``phrase``: FLUX's text sequence is T5's alone."""
        return self.box_tokens(prompt, [Phrase(phrase, occurrence)])[0]

    def box_tokens(self, prompt: str, boxes: Sequence) -> list[list[int]]:
        """Each box's T5 positions, inside ``max_sequence_length`` (one line naming a phrase past it),
        occurrences resolved across the boxes as ``Layout.resolve_tokens`` does."""
        positions = resolve_boxes(self.pipe.tokenizer_2, prompt, boxes)
        return [
            check_sequence_length(b.phrase, p, self.max_sequence_length) for b, p in zip(boxes, positions)
        ]

    def attention_layers(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Double and single blocks' attention, at the packed grid ``latent / 2``."""
        return joint_attention_layers(self.transformer, latent_hw)

    def capture(self, layers: Sequence[str] | None = None, store=None):
        """:func:`~saltdiff.joint_attention.capture_joint_attention` on the transformer."""
        return capture_joint_attention(self.transformer, layers, store)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """:func:`pack_latents`."""
        return pack_latents(latents)

    def unpack(self, output: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """:func:`unpack_latents`."""
        return unpack_latents(output, latent_hw)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(VAE mean - shift_factor) * scaling_factor``, unpacked ``[B, 16, h, w]``."""
        return vae_encode(self.pipe.vae, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``VAE decode(latents / scaling_factor + shift_factor)`` of unpacked latents."""
        return vae_decode(self.pipe.vae, latents)
