"""The SD3 family adapter: ``SD3Transformer2DModel`` (MMDiT) with CLIP-L, CLIP-G and T5, flow matching.

What the adapter knows about SD3 (diffusers 0.42.1's ``StableDiffusion3Pipeline``):

- the transformer takes ``[B, 16, h, w]`` latents and patchifies them itself (no packing), and its
  ``timestep`` is ``1000 sigma`` (the scheduler's ``num_train_timesteps`` times the flow sigma);
- the text sequence is ``[CLIP (77 tokens: CLIP-L and CLIP-G side by side in the features, zero
  padded to T5's width); T5 (max_sequence_length tokens)]``, pooled = CLIP-L pooled ++ CLIP-G pooled;
- joint attention ``[image, text]`` in every block (:mod:`saltdiff.joint_attention`);
- VAE latents are ``(mean - shift_factor) * scaling_factor``.

Phrase tokens: a phrase is read in both text streams by default (its CLIP positions and its T5
positions offset by the CLIP length) because both sit in the joint softmax and both carry the
word; ``text_tokens="clip"`` or ``"t5"`` picks one. Without a T5 encoder the T5 columns are zeros,
so ``"both"`` reads CLIP only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..flow_inversion import dynamic_shift_mu
from ..joint_attention import capture_joint_attention, joint_attention_layers
from ..phrases import Phrase, agreed_positions, check_sequence_length, resolve_boxes
from . import Conditions, vae_decode, vae_encode

__all__ = ["SD3Family"]

TEXT_TOKENS = ("both", "clip", "t5")


class SD3Family:
    """:class:`~saltdiff.families.FamilyAdapter` for a ``StableDiffusion3Pipeline``'s components.

    Args:
        pipe: the pipeline (its transformer, VAE, text encoders, tokenizers and scheduler are used;
            nothing is changed on it).
        max_sequence_length: T5 tokens per prompt (SD3's default 256).
        text_tokens: which text stream's tokens :meth:`phrase_tokens` returns: ``"both"``,
            ``"clip"`` or ``"t5"``.
        joint_attention_kwargs: passed to every transformer call, as the pipeline passes its own
            (e.g. ``{"scale": 0.7}`` for a LoRA); ``None``: none.
    """

    name = "sd3"
    noise_family = "flow"

    def __init__(
        self,
        pipe,
        *,
        max_sequence_length: int = 256,
        text_tokens: str = "both",
        joint_attention_kwargs: dict | None = None,
    ):
        if text_tokens not in TEXT_TOKENS:
            raise ValueError(f"text_tokens must be one of {TEXT_TOKENS}, got {text_tokens!r}")
        if (
            isinstance(max_sequence_length, bool)
            or not isinstance(max_sequence_length, int)
            or max_sequence_length < 1
        ):
            raise ValueError(f"max_sequence_length must be a positive int, got {max_sequence_length!r}")
        if text_tokens == "t5" and pipe.text_encoder_3 is None:
            raise ValueError(
                "text_tokens='t5' needs a T5 text encoder; this pipeline has text_encoder_3=None"
            )
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.text_tokens = text_tokens
        if joint_attention_kwargs is not None and not isinstance(joint_attention_kwargs, dict):
            raise ValueError(
                f"joint_attention_kwargs must be a dict or None, got {type(joint_attention_kwargs).__name__}"
            )
        self.joint_attention_kwargs = joint_attention_kwargs

    @property
    def transformer(self):
        return self.pipe.transformer

    @property
    def size_multiple(self) -> int:
        """Pixels per token side: the VAE's downsampling times the patch size."""
        return int(self.pipe.vae_scale_factor) * int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    @property
    def clip_length(self) -> int:
        """Tokens of the CLIP part at the front of the text sequence."""
        return int(self.pipe.tokenizer_max_length)

    def schedule_kwargs(self, num_inference_steps: int, latent_hw: tuple[int, int]) -> dict:
        """What ``StableDiffusion3Pipeline`` passes to ``set_timesteps``: the step count, and ``mu`` for
        the image's token count when the scheduler shifts dynamically (SD3.5 configs may)."""
        kwargs: dict = {"num_inference_steps": num_inference_steps}
        if self.pipe.scheduler.config.get("use_dynamic_shifting"):
            patch = int(self.transformer.config.patch_size)
            tokens = (int(latent_hw[0]) // patch) * (int(latent_hw[1]) // patch)
            kwargs["mu"] = dynamic_shift_mu(self.pipe.scheduler.config, tokens)
        return kwargs

    def conditions(self, prompt: str | list[str]) -> Conditions:
        """``StableDiffusion3Pipeline.encode_prompt`` of ``prompt`` (same prompt for all three encoders)."""
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditions(embeds, pooled)

    def timestep(self, sigma: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
        """The transformer's ``timestep`` for ``sigma``: ``num_train_timesteps * sigma``, one per row."""
        t = (
            torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
            * self.pipe.scheduler.config.num_train_timesteps
        )
        return t.expand(batch) if t.ndim == 0 else t

    def denoise(
        self, latents: torch.Tensor, sigma: float | torch.Tensor, conditions: Conditions
    ) -> torch.Tensor:
        """The velocity ``eps - x0`` the transformer predicts for ``latents`` at ``sigma``."""
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"latents must be [B, {self.latent_channels}, h, w], got {tuple(latents.shape)}")
        if conditions.batch != latents.shape[0]:
            raise ValueError(f"conditions have {conditions.batch} rows for {latents.shape[0]} latents")
        model_in = self.pack(latents)
        out = self.transformer(
            hidden_states=model_in,
            timestep=self.timestep(sigma, latents.shape[0], model_in),
            encoder_hidden_states=conditions.embeds,
            pooled_projections=conditions.pooled,
            joint_attention_kwargs=self.joint_attention_kwargs,
            return_dict=False,
        )[0]
        return self.unpack(out, tuple(latents.shape[-2:]))

    def phrase_tokens(self, prompt: str, phrase: str, occurrence: int | None = None) -> list[int]:
        """Columns of the joint text sequence that hold ``phrase`` (see the module docstring)."""
        return self.box_tokens(prompt, [Phrase(phrase, occurrence)])[0]

    def box_tokens(self, prompt: str, boxes: Sequence) -> list[list[int]]:
        """Each box's columns of the joint text sequence: its CLIP positions (both CLIP tokenizers must
        agree: their states sit side by side) and its T5 positions after the CLIP block, inside
        ``max_sequence_length``; occurrences resolved across the boxes as ``Layout.resolve_tokens`` does."""
        if not len(boxes):
            return []
        columns: list[list[int]] = [[] for _ in boxes]
        if self.text_tokens in ("both", "clip"):
            clip = resolve_boxes(self.pipe.tokenizer, prompt, boxes)
            clip_g = resolve_boxes(self.pipe.tokenizer_2, prompt, boxes)
            agreed_positions("SD3's two CLIP tokenizers", [b.phrase for b in boxes], prompt, clip, clip_g)
            columns = [c + p for c, p in zip(columns, clip)]
        if self.text_tokens in ("both", "t5") and self.pipe.text_encoder_3 is not None:
            t5 = resolve_boxes(self.pipe.tokenizer_3, prompt, boxes)
            t5 = [check_sequence_length(b.phrase, p, self.max_sequence_length) for b, p in zip(boxes, t5)]
            columns = [c + [self.clip_length + i for i in p] for c, p in zip(columns, t5)]
        return columns

    def attention_layers(self, latent_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
        """Every block's joint attention, at ``latent / patch_size`` (:func:`joint_attention_layers`)."""
        return joint_attention_layers(self.transformer, latent_hw)

    def capture(self, layers: Sequence[str] | None = None, store=None):
        """:func:`~saltdiff.joint_attention.capture_joint_attention` on the transformer."""
        return capture_joint_attention(self.transformer, layers, store)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Identity: SD3's transformer patchifies ``[B, C, h, w]`` itself."""
        return latents

    def unpack(self, output: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
        """Identity: SD3's transformer returns ``[B, C, h, w]``."""
        return output

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(VAE mean - shift_factor) * scaling_factor``: the latents SD3's transformer works in."""
        return vae_encode(self.pipe.vae, images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``VAE decode(latents / scaling_factor + shift_factor)``, as the pipeline decodes."""
        return vae_decode(self.pipe.vae, latents)
