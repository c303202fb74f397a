"""The SALT call's arguments, normalized and checked up front (diffusers' ``check_inputs`` stage).

Plain functions of the arguments alone; what needs the pipeline's components (sizes the UNet
accepts, dtypes, step-callback tensors) is :meth:`saltdiff.salt_mixin.SaltMixin.check_salt_inputs`.
Every bad value raises ``ValueError``/``TypeError`` naming it; nothing is corrected silently.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from .guidance import GuidanceConfig
from .init import RandomInit, SpatialAwareInit
from .layout import Layout
from .reference import UserImages
from .registry import INITIALIZERS

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_INIT = "salt"


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


def resolve_init(init, latents, reference_image, inversion_steps):
    """One initializer (or latent tensor) from ``init``, diffusers' ``latents`` and the shorthands
    ``reference_image`` and ``inversion_steps`` (both only for ``init="salt"``)."""
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


def text_for_tokens(prompt, prompt_embeds, layout: Layout, init) -> str | None:
    """The text the boxed phrases' tokens are looked up in: ``prompt``, or ``""`` when only
    ``prompt_embeds`` are given and nothing needs text (no boxes, no reference to build)."""
    if prompt is not None or prompt_embeds is None:
        return prompt
    if len(layout) > 0 or not (torch.is_tensor(init) or isinstance(init, RandomInit)):
        raise ValueError(
            "with prompt_embeds, also pass the prompt it encodes when the layout has boxes or the "
            "initializer builds a reference: the boxed phrases' tokens are found in its text"
        )
    return ""


def check_embeds(prompt_embeds, negative_prompt_embeds, negative_prompt) -> None:
    """Given text embeddings are one prompt's ``[1, T, D]``, alike in shape, and not doubled by text."""
    for name, value in (
        ("prompt_embeds", prompt_embeds),
        ("negative_prompt_embeds", negative_prompt_embeds),
    ):
        if value is None:
            continue
        if not torch.is_tensor(value) or value.ndim != 3 or value.shape[0] != 1:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name} must be a [1, T, D] tensor (one prompt per call), got {shape}")
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass either negative_prompt or negative_prompt_embeds, not both")
    if (
        prompt_embeds is not None
        and negative_prompt_embeds is not None
        and prompt_embeds.shape != negative_prompt_embeds.shape
    ):
        raise ValueError(
            f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
            f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
        )


def as_guidance(guidance: str | GuidanceConfig) -> GuidanceConfig:
    """A registered loss name or a ``GuidanceConfig`` → ``GuidanceConfig``."""
    if isinstance(guidance, str):
        return GuidanceConfig(loss=guidance)
    if not isinstance(guidance, GuidanceConfig):
        raise TypeError(f"guidance must be a name or a GuidanceConfig, got {type(guidance).__name__}")
    return guidance


def seeded_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """``seed`` is shorthand for a CPU generator seeded with it; not together with ``generator``."""
    if seed is None:
        return generator
    if generator is not None:
        raise ValueError("pass either seed or generator, not both")
    return torch.Generator("cpu").manual_seed(int(seed))


__all__ = [
    "CALLBACK_TENSOR_INPUTS",
    "DEFAULT_INIT",
    "OUTPUT_TYPES",
    "as_guidance",
    "as_layout",
    "check_embeds",
    "text_for_tokens",
    "resolve_init",
    "seeded_generator",
]
