"""What a run can be checked against before any weight loads: the model's config files.

Loading a checkpoint takes seconds (the built-in model) to minutes (SDXL); a phrase missing from the
prompt, a height the UNet cannot take or an inversion depth the sampler's first timestep does not
allow should not wait for it. :func:`check_before_loading` reads only what a model folder holds
besides its weights (``unet/config.json``, ``vae/config.json``, the scheduler config, the tokenizer)
from a folder, a ``builtin:`` name or the local Hugging Face cache, never the network, and raises
the same one-line errors the pipeline call would. Whatever is not at hand is left to the call.
"""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace
from typing import Any

from .checkpoints import resolve_model

__all__ = [
    "check_before_loading",
    "check_image_sides",
    "check_steps_and_scale",
    "check_trained_size",
    "local_model_folder",
    "size_multiple",
]


def size_multiple(vae_scale_factor: int, num_down_blocks: int) -> int:
    """The multiple every image side must be: the VAE's factor times the UNet's downsampling."""
    return int(vae_scale_factor) * 2 ** (int(num_down_blocks) - 1)


def check_image_sides(height, width, multiple: int) -> None:
    """Each image side a positive multiple of ``multiple`` (:func:`size_multiple`)."""
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
            raise ValueError(
                f"{name} must be a positive multiple of {multiple} for this model, got {value!r}"
            )


def check_steps_and_scale(num_inference_steps, guidance_scale) -> None:
    """Sampling steps an integer >= 1 and the CFG scale a finite number >= 0."""
    steps = num_inference_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, (int, float))
        or not math.isfinite(guidance_scale)
        or guidance_scale < 0
    ):
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")


#: An image side more than this many times the model's trained size is refused unless forced.
MAX_SIZE_FACTOR = 4


def check_trained_size(trained: int, height: int | None, width: int | None, *, force: bool = False) -> None:
    """:func:`saltdiff.loading.check_image_size` for a model trained at ``trained`` pixels a side (read from its config)."""
    limit = MAX_SIZE_FACTOR * trained
    sides = (("height", height), ("width", width))
    over = [f"{name} {value}" for name, value in sides if (value or 0) > limit]
    if over and not force:
        raise ValueError(
            f"{' and '.join(over)} is more than {MAX_SIZE_FACTOR}x the size this model was trained at "
            f"({trained}, so at most {limit}): pass --force (API: force=True) to run it anyway"
        )


def local_model_folder(model: str) -> str | None:
    """The folder holding ``model``'s files: the folder itself, a ``builtin:`` model's, or a hub id's
    snapshot in the local Hugging Face cache; ``None`` when it is not at hand (never the network)."""
    path = resolve_model(model)
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if path.startswith((".", "/", "~")):
        return None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 -- not cached, or not a valid hub id: nothing at hand
        return None


def _config(folder: str, name: str) -> dict[str, Any] | None:
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None  # a damaged file: the load says what is wrong with it
    return data if isinstance(data, dict) else None


#: T5 tokens a FLUX prompt is encoded to unless told (``FluxPipeline``'s ``max_sequence_length``).
FLUX_SEQUENCE_LENGTH = 512


def _tokenizer(folder: str):
    """The tokenizer the model's boxed phrases are read with, capped as the pipeline caps it: the
    (first) CLIP tokenizer at its text encoder's length, or FLUX's T5 tokenizer (its text sequence
    is T5's alone) at ``max_sequence_length``."""
    from .components import fit_tokenizer_length

    index = _config(folder, "model_index.json") or {}
    flux = str(index.get("_class_name", "")).startswith(("Flux", "SaltFlux"))
    name = "tokenizer_2" if flux else "tokenizer"
    library, class_name = (index.get(name) or [None, None])[:2]
    if library != "transformers" or not class_name or not os.path.isdir(os.path.join(folder, name)):
        return None
    import transformers

    cls = getattr(transformers, str(class_name), None)
    if cls is None:
        return None
    try:
        tokenizer = cls.from_pretrained(os.path.join(folder, name))
    except (OSError, ValueError):
        return None
    if flux:  # T5 has no position limit of its own: the pipeline pads and truncates to 512
        tokenizer.model_max_length = FLUX_SEQUENCE_LENGTH
        return tokenizer
    encoder = _config(folder, "text_encoder/config.json") or {}
    limit = encoder.get("max_position_embeddings") or (encoder.get("text_config") or {}).get(
        "max_position_embeddings"
    )
    fit_tokenizer_length(tokenizer, SimpleNamespace(config=SimpleNamespace(max_position_embeddings=limit)))
    return tokenizer


def check_before_loading(model: str, request, *, force: bool = False) -> bool:
    """The checks of ``request`` (a :class:`~saltdiff.request.GenerationRequest`) on ``model`` that
    need only its config files: image sides (multiple and trained size, ``force`` as
    :func:`~saltdiff.loading.check_image_size`), steps and CFG scale, the initializer's steps against
    the request's sampler, and each boxed phrase in the prompt as the model's tokenizer splits it.

    Raises the ``ValueError`` (``LayoutError``) the pipeline call would; returns whether the model's
    files were at hand (``False``: nothing beyond the request itself could be checked)."""
    check_steps_and_scale(request.num_inference_steps, request.guidance_scale)
    folder = local_model_folder(model)
    if folder is None:
        return False
    unet = _config(folder, "unet/config.json")
    vae = _config(folder, "vae/config.json")
    blocks, channels, side = (
        (unet or {}).get("down_block_types"),
        (vae or {}).get("block_out_channels"),
        (unet or {}).get("sample_size"),
    )
    if isinstance(blocks, list) and isinstance(channels, list) and isinstance(side, int) and blocks:
        scale = 2 ** (len(channels) - 1)
        trained = side * scale
        height = trained if request.height is None else request.height
        width = trained if request.width is None else request.width
        multiple = size_multiple(scale, len(blocks))
        check_image_sides(height, width, multiple)
        check_trained_size(trained, request.height, request.width, force=force)
    if len(request.layout):  # (transformers is a shorter import than diffusers: phrases first)
        tokenizer = _tokenizer(folder)
        if tokenizer is not None:
            request.layout.resolve_tokens(tokenizer, request.prompt)
    scheduler_config = _config(folder, "scheduler/scheduler_config.json")
    init = request.build_init()
    if scheduler_config and callable(getattr(init, "check_steps", None)):
        from .samplers import check_supported, make_scheduler, sampler_family

        sampler = make_scheduler(request.scheduler, scheduler_config)  # the other noise family: one line
        if sampler_family(request.scheduler) == "vp":  # a flow sampler's grid fits any inversion depth
            check_supported(sampler)
        init.check_steps(sampler, request.num_inference_steps)
    return True
