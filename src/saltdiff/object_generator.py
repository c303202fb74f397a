"""``PipelineObjectGenerator``: the narrow view of a pipeline that reference builders get.

A builder sees plain batched text-to-image (the pipeline's ``generate_objects``) and an identity
for on-disk caches, never the pipeline itself, so it cannot re-enter the SALT call or change a
component (the :class:`saltdiff.reference.ObjectGenerator` protocol).
"""

from __future__ import annotations

from typing import Any

from .checkpoints import weights_stamp


class PipelineObjectGenerator:
    """:class:`saltdiff.reference.ObjectGenerator` over a SALT pipeline's ``generate_objects``.

    ``identity`` names the model's weights for on-disk caches (``None`` for an in-memory model,
    whose objects must never be shared through a cache).
    """

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    @property
    def identity(self) -> list | None:
        pipe = self._pipe
        model_id = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
        if not model_id:
            return None
        return [str(model_id), weights_stamp(str(model_id)), str(pipe.denoiser.dtype)]

    def __call__(self, prompts, *, phrases=None, height, width, num_inference_steps, guidance_scale, seed):
        return self._pipe.generate_objects(
            prompts,
            phrases=phrases,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
        )


__all__ = ["PipelineObjectGenerator"]
