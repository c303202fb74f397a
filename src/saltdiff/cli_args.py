"""Command-line flags shared by ``saltdiff generate``, ``bench``, ``study`` and ``demo``.

Each config dataclass (``GuidanceConfig``, ``SpatialAwareInit``, ``GeneratedObjects``) maps one to
one onto flags: the field ``guidance_steps`` is the flag ``--guidance-steps``, with the field's
default shown in ``--help``. Kept apart from ``cli.py`` so the evaluation CLI can import it without
a cycle.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

GUIDANCE_HELP = {
    "guidance_steps": "guide the first N denoising steps",
    "guidance_iters": "at most N gradient updates of the latent per guided step",
    "step_size": "guidance step size eta (scaled by 1 - alpha_bar_t under the 'sigma' schedule)",
    "step_size_schedule": "'sigma' (eta * (1 - alpha_bar_t)) or 'constant' (eta)",
    "loss_threshold": "stop a step's updates once the loss is below this",
    "layers": "cross-attention layers for the loss: default, all, down, mid, up, x4/x8 tags or names",
    "reg_weight": "weight of SALT's outside-box regularization term",
    "unboxed_weight": "weight of SALT's term that keeps unboxed tokens' attention alive",
    "boxdiff_topk_fraction": "BoxDiff: fraction of pixels in its top-k constraints",
    "max_grad_norm": "clip the latent gradient to this norm (off by default)",
}
SALT_INIT_HELP = {
    "inversion_steps": "DDIM inversion steps up to the sampler's first timestep",
    "inversion_prompt": "'empty' or 'prompt': text condition used during inversion (CFG 1)",
    "noise_outside": "blend this much fresh noise into z_T outside the boxes (0 = off)",
    "feather": "feather the boxes by this many latent cells when blending noise",
    "inversion_noise_scale": "SDE-style inversion: add this much fresh noise per step (0 = DDIM ODE)",
}
OBJECTS_HELP = {
    "background": "reference background: generated, gray, white or noise",
    "object_prompt": "prompt used to generate each object; must contain {phrase}",
    "object_seed": "seed for the object and background generations",
    "num_inference_steps": "steps for each object generation",
    "guidance_scale": "CFG scale for each object generation",
    "cutout": "how objects are cut out: foreground (border color) or attention (its own map)",
    "threshold": "cut-out threshold (color distance for foreground, fraction of max for attention)",
    "fit": "stretch the object to its box, or contain it keeping its aspect ratio",
    "cache": "cache generated objects on disk",
    "cache_dir": "object cache folder (default ~/.cache/saltdiff/objects or $SALTDIFF_CACHE)",
}
# Fields whose flag name differs from the field name (to keep flags short and unambiguous).
FLAG_NAMES = {
    ("GuidanceConfig", "loss"): "guidance",
    ("GeneratedObjects", "num_inference_steps"): "object-steps",
    ("GeneratedObjects", "guidance_scale"): "object-cfg",
    ("GeneratedObjects", "threshold"): "cutout-threshold",
    ("GeneratedObjects", "cache"): "object-cache",
    ("GeneratedObjects", "cache_dir"): "object-cache-dir",
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls, helps: dict, skip: Sequence[str] = ()) -> None:
    """Add one ``--flag`` per dataclass field (default: the field's default, shown in --help)."""
    group = parser.add_argument_group(f"{cls.__name__} options")
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in helps:
            continue
        flag = "--" + FLAG_NAMES.get((cls.__name__, f.name), f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = type(default) if default is not None else str
        if f.name == "max_grad_norm":
            kind = float
        if kind is bool:
            kind = _parse_bool
        group.add_argument(
            flag,
            dest=f"{cls.__name__}.{f.name}",
            type=kind,
            default=None,
            metavar=f.name.upper(),
            help=f"{helps[f.name]} (default: {default})",
        )


def dataclass_kwargs(args: argparse.Namespace, cls) -> dict:
    prefix = cls.__name__ + "."
    return {k[len(prefix) :]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="builtin:shapes",
        help="hub id, local diffusers folder, or builtin:NAME (default: builtin:shapes; a real "
        "checkpoint is e.g. stable-diffusion-v1-5/stable-diffusion-v1-5)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("float32", "float16", "bfloat16"),
        help="weights dtype (default: float16 on cuda, float32 on cpu)",
    )
