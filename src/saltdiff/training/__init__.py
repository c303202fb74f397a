"""Reproducible training of the built-in model ``builtin:shapes`` on the synthetic shapes world.

Two stages, both on scenes rendered from :data:`saltdiff.worlds.shapes.TRAIN_SEEDS`:

1. a tiny ``AutoencoderKL`` (64x64x3 <-> 16x16x4), L1 reconstruction + a small KL term; its
   ``scaling_factor`` is then set so that scaled latents have unit standard deviation;
2. a tiny ``UNet2DConditionModel`` (cross-attention at the 8x8 and 4x4 levels) and a tiny
   ``CLIPTextModel`` trained jointly from scratch: epsilon prediction on the SD-1.x noise schedule,
   caption dropout for classifier-free guidance, min-SNR loss weighting, EMA of the weights.

The UNet stage reads VAE latents from a cache encoded once (``--latent-cache`` scenes, a fixed
deterministic subset of the training seeds): encoding on the fly cost about a third of each step on
a 2-core CPU. Every random choice (seed order, noise, timesteps, caption dropout) is a pure function
of ``--seed`` and the step number, so a run killed and resumed with ``--resume`` sees exactly the
data an uninterrupted run would. Checkpoints (model, optimizer, EMA, step, RNG) are written
atomically to ``--work``; at each UNet checkpoint the EMA weights are exported (fp16) as a diffusers
``StableDiffusionPipeline`` folder into ``--out``.

    python -m saltdiff.training --out src/saltdiff/models/shapes --work train_work/shapes

Modules, one idea each: :mod:`.config` (every knob), :mod:`.data` (seeds, rendering, tokens, batches,
latent cache), :mod:`.bookkeeping` (schedule, atomic saves, JSON log), :mod:`.vae` (stage 1),
:mod:`.unet` (stage 2), :mod:`.grounding` (token-grounding loss), :mod:`.export` (pipeline folders in
and out), :mod:`.run` (both stages), :mod:`.plots` (loss curves), :mod:`.cli` (command line).
Importing this package imports no torch; :func:`train` is loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import TrainConfig

if TYPE_CHECKING:
    from .run import train

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from .run import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
