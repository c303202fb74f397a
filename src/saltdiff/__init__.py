"""saltdiff: layout-controlled text-to-image generation with spatial-aware latent initialization.

from saltdiff import SaltPipeline, Layout
pipe = SaltPipeline.from_pretrained("builtin:shapes")
out = pipe("a red circle and a blue square", [("red circle", (0.05, 0.3, 0.45, 0.7)),
                                             ("blue square", (0.55, 0.3, 0.95, 0.7))], seed=0)
"""

from __future__ import annotations

import importlib
import sys

__version__ = "0.1.0"

# Public names → defining module; imported lazily so `saltdiff --help` does not pay for diffusers.
_EXPORTS = {
    "Box": "layout",
    "Layout": "layout",
    "LayoutError": "layout",
    "SaltPipeline": "pipeline",
    "SaltOutput": "pipeline",
    "SaltXLPipeline": "pipeline_xl",
    "SaltSD3Pipeline": "pipeline_sd3",
    "SaltFluxPipeline": "pipeline_flux",
    "resolve_model": "checkpoints",
    "load_pipeline": "loading",
    "GenerationRequest": "request",
    "GuidanceConfig": "guidance",
    "RandomInit": "init",
    "SpatialAwareInit": "init",
    "InitResult": "init",
    "InitContext": "init_context",
    "InversionMemo": "init_context",
    "GeneratedObjects": "reference",
    "UserImages": "reference",
    "ReferenceImage": "reference",
    "ddim_invert": "inversion",
    "capture_cross_attention": "attention",
    "AttentionStore": "attention",
    "layout_guidance_loss": "losses",
    "boxdiff_loss": "losses",
    "salt_loss": "losses",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module = f"{__name__}.{_EXPORTS[name]}"
        if _EXPORTS[name] in ("pipeline", "pipeline_xl", "pipeline_sd3", "pipeline_flux") and module not in sys.modules:
            from .loading import quiet_loading

            with quiet_loading():  # no notes from image processors saltdiff never uses (torchvision)
                importlib.import_module(module)
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'saltdiff' has no attribute {name!r}")
