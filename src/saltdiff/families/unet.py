"""The UNet family adapter (SD 1.x / 2.x): the VP side of the seam, over the existing capture code.

It exists to hold the contract to both noise families: a ``UNet2DConditionModel`` with one CLIP
text encoder, VP latents ``z = sqrt(a) x0 + sqrt(1 - a) eps``, a discrete training schedule. The
adapter reads a VP sigma (:func:`saltdiff.noise.vp_sigma` of ``alphas_cumprod``) and calls the UNet
at its (fractional, log-sigma interpolated) timestep; it returns what the UNet predicts (epsilon or
v, per the scheduler's ``prediction_type``: :func:`saltdiff.noise.vp_x0_eps` converts). Capture is
:func:`saltdiff.attention.capture_cross_attention` unchanged. SDXL (pooled embeddings and time ids
as added conditions) is refused here: ``SaltXLPipeline``'s hooks still own it, and the pipeline is
not rewired onto adapters yet.

The UNet's extra inputs live here too: :func:`ip_adapter_off`, the SALT call's IP-Adapter handling
(the image conditions sampling, not the reference or its inversion).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ..attention import capture_cross_attention, cross_attention_layers
from ..noise import vp_timestep
from ..phrases import resolve_phrase_tokens
from . import Conditions, vae_decode, vae_encode

__all__ = ["UNetFamily", "ip_adapter_off"]


@contextlib.contextmanager
def ip_adapter_off(unet) -> Iterator[None]:
    """Inside the block ``unet`` runs as without its IP-Adapter (a no-op when none is loaded); its
    image projection and attention processors are restored afterwards, also when the body raises.

    A UNet with an IP-Adapter loaded (``encoder_hid_dim_type="ip_image_proj"``) refuses a call without
    ``image_embeds``, and object generation and DDIM inversion call it with text alone: the adapter
    comes out as diffusers' ``unload_ip_adapter`` takes it out (no image projection, plain attention
    where the decoupled image attention was) and the same modules go back.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    projection = unet.encoder_hid_proj
    if projection is None or unet.config.encoder_hid_dim_type != "ip_image_proj":
        yield
        return
    original = dict(unet.attn_processors)
    plain = {name: AttnProcessor2_0() if hasattr(p, "to_k_ip") else p for name, p in original.items()}
    unet.encoder_hid_proj = None
    unet.set_attn_processor(plain)  # set_attn_processor pops from the dict it gets: hand it copies
    try:
        yield
    finally:
        unet.encoder_hid_proj = projection
        unet.set_attn_processor(dict(original))


class UNetFamily:
    """:class:`~saltdiff.families.FamilyAdapter` for a ``StableDiffusionPipeline``'s components (SD 1.x/2.x)."""

    name = "unet"
    noise_family = "vp"

    def __init__(self, pipe):
        if pipe.unet.config.get("addition_embed_type") is not None:
            raise ValueError(
                f"UNetFamily covers SD 1.x/2.x UNets; this one has addition_embed_type="
                f"{pipe.unet.config.addition_embed_type!r} (SDXL-style added conditions)"
            )
        self.pipe = pipe

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def size_multiple(self) -> int:
        """Pixels per latent cell (SD pipelines require multiples of the VAE's factor)."""
        return int(self.pipe.vae_scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.get("prediction_type", "epsilon")

    def schedule_kwargs(self, num_inference_steps: int, latent_hw: tuple[int, int]) -> dict:
        """What ``StableDiffusionPipeline`` passes to ``set_timesteps``: the step count."""
        return {"num_inference_steps": num_inference_steps}

    def conditions(self, prompt: str | list[str]) -> Conditions:
        """``StableDiffusionPipeline.encode_prompt`` of ``prompt``, conditional rows only."""
        embeds, _ = self.pipe.encode_prompt(
            prompt, self.pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditions(embeds)

    def timestep(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """The UNet's timestep for a VP ``sigma`` (:func:`~saltdiff.noise.vp_timestep`)."""
        return vp_timestep(sigma, self.pipe.scheduler.alphas_cumprod)

    def denoise(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, conditions: Conditions
    ) -> torch.Tensor:
        """What the UNet predicts (epsilon or v) for VP ``latents`` at ``sigma``."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        if conditions.batch != latents.shape[0]:
            raise ValueError(f"conditions have {conditions.batch} rows for {latents.shape[0]} latents")
        t = self.timestep(sigma).to(latents.device)
        return self.unet(
            latents, t if t.ndim else t.expand(latents.shape[0]), encoder_hidden_states=conditions.embeds
        ).sample

    def phrase_tokens(self, prompt: str, phrase: str, occurrence: int | None = None) -> list[int]:
        """CLIP positions of ``phrase`` (BOS is column 0)."""
        return resolve_phrase_tokens(self.pipe.tokenizer, prompt, phrase, occurrence)

    def attention_layers(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Every cross-attention layer -> its grid: the latent halved (rounding up) per downsampling."""
        layers = {}
        for name, factor in cross_attention_layers(self.unet).items():
            h, w = int(latent_hw[0]), int(latent_hw[1])
            while factor > 1:  # stride-2 convolutions with padding 1 round up
                h, w, factor = -(-h // 2), -(-w // 2), factor // 2
            layers[name] = (h, w)
        return layers

    @contextlib.contextmanager
    def capture(self, layers: Sequence[str] | None = None, store=None):
        """:func:`~saltdiff.attention.capture_cross_attention` (``None``: its default layers), with
        ``store.latent_hw`` read from each UNet call, as the joint-attention capture reads its grid
        (non-square latents need it); the hook goes with the processors on exit."""
        selection = "default" if layers is None else list(layers)
        with capture_cross_attention(self.unet, selection, store) as store:

            def read_size(module, args, kwargs):
                sample = args[0] if args else kwargs["sample"]
                store.latent_hw = tuple(sample.shape[-2:])

            handle = self.unet.register_forward_pre_hook(read_size, with_kwargs=True)
            try:
                yield store
            finally:
                handle.remove()

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Identity: the UNet takes ``[B, C, h, w]``."""
        return latents

    def unpack(self, output: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Identity."""
        return output

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``VAE mean * scaling_factor`` (SD's VAEs have no shift)."""
        return vae_encode(self.pipe.vae, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``VAE decode(latents / scaling_factor)``, as the pipeline decodes."""
        return vae_decode(self.pipe.vae, latents)
