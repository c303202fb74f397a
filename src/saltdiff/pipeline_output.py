"""``SaltOutput``: what a SALT call returns, whatever the model family (diffusers keeps each pipeline's
output dataclass in its own ``pipeline_output.py`` too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput


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
        nsfw_content_detected: the safety checker's verdict per image (``None`` without one).
    """

    images: list[PIL.Image.Image] | np.ndarray
    reference_image: PIL.Image.Image | None = None
    init_latent: torch.Tensor | None = None
    layout_losses: list[float] = field(default_factory=list)
    guidance_losses: list[list[float]] = field(default_factory=list)
    attention_maps: np.ndarray | None = None
    phrases: list[str] = field(default_factory=list)
    token_indices: list[list[int]] = field(default_factory=list)
    nsfw_content_detected: list[bool] | None = None
    info: dict[str, Any] = field(default_factory=dict)


__all__ = ["SaltOutput"]
