"""Component configurations shared by the code that builds models (``saltdiff.testing``, the trainer),
and what a loaded pipeline's components must agree on (one dtype, a usable prompt length).

Kept free of heavy imports at module level: diffusers is imported inside the functions, so importing
this module costs nothing.
"""

from __future__ import annotations

__all__ = [
    "check_component_dtypes",
    "dtype_keyword",
    "fit_tokenizer_length",
    "sd_ddim_scheduler",
]

#: Components that exchange tensors in one call (text embeddings → UNet, latents → VAE).
DTYPE_COMPONENTS = ("unet", "vae", "text_encoder")


def sd_ddim_scheduler():
    """The SD-1.x DDIM scheduler: scaled_linear betas 0.00085..0.012 over 1000 steps, epsilon prediction.

    ``clip_sample=False``, ``set_alpha_to_one=False`` and ``steps_offset=1`` as in the Stable Diffusion
    1.x checkpoints. The number of training steps (1000) and the prediction type (epsilon) are
    diffusers' defaults and are left to them (``config["_use_default_values"]`` names them); the saved
    ``scheduler_config.json`` lists every value either way.
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the weights' dtype: ``dtype`` where diffusers takes it (it
    deprecated ``torch_dtype`` with a warning on every load), ``torch_dtype`` on older versions."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def fit_tokenizer_length(tokenizer, text_encoder) -> bool:
    """Cap ``tokenizer.model_max_length`` at the text encoder's ``max_position_embeddings``.

    A tokenizer config without ``model_max_length`` (common in community folders) leaves
    transformers' sentinel (1e30) there, and truncating a long prompt to it fails with
    ``OverflowError: int too big to convert``; the text encoder knows the real limit. Returns
    whether the tokenizer was changed.
    """
    limit = getattr(getattr(text_encoder, "config", None), "max_position_embeddings", None)
    length = getattr(tokenizer, "model_max_length", None)
    if tokenizer is None or not isinstance(limit, int) or limit <= 0:
        return False
    if isinstance(length, int) and 0 < length <= limit:
        return False
    tokenizer.model_max_length = limit
    return True


def check_component_dtypes(pipe) -> None:
    """A ``ValueError`` naming each component's dtype when the UNet, VAE and text encoder disagree.

    Text embeddings go into the UNet and latents into the VAE without a cast, so mixed dtypes would
    fail deep inside a matrix product; this says which component to load or cast instead.
    """
    dtypes = {
        name: getattr(pipe, name).dtype for name in DTYPE_COMPONENTS if getattr(pipe, name, None) is not None
    }
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{name} {str(dtype).replace('torch.', '')}" for name, dtype in dtypes.items())
        wanted = str(next(iter(dtypes.values()))).replace("torch.", "")  # the denoiser's, listed first
        raise ValueError(
            f"the pipeline's components have different dtypes ({listed}): load it with one dtype "
            f"(from_pretrained(..., dtype=torch.{wanted})) or cast it with pipe.to(torch.{wanted})"
        )
