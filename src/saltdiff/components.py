"""Component configurations shared by the code that builds models (``saltdiff.testing``, the trainer).

Kept free of heavy imports at module level: diffusers is imported inside the functions, so importing
this module costs nothing.
"""

from __future__ import annotations

__all__ = ["sd_ddim_scheduler"]


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
