"""``saltdiff`` command line: ``generate`` (one image), plus ``bench``, ``demo``, ``train-builtin``.

Flags map one to one onto the config dataclasses (``GuidanceConfig``, ``SpatialAwareInit``,
``GeneratedObjects``): a flag ``--guidance-steps`` is the field ``guidance_steps``. Bad input exits
with status 2 and one line naming the problem (``SALTDIFF_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from .cli_args import (
    GUIDANCE_HELP,
    OBJECTS_HELP,
    SALT_INIT_HELP,
    CliError,
    add_dataclass_args,
    add_model_args,
    dataclass_kwargs,
)

logger = logging.getLogger("saltdiff")


def build_parser() -> argparse.ArgumentParser:
    from .guidance import GuidanceConfig
    from .init import SpatialAwareInit
    from .reference import GeneratedObjects

    parser = argparse.ArgumentParser(prog="saltdiff", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"saltdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate one image for a prompt and a layout",
        description="Generate an image whose boxed phrases land in their boxes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    gen.add_argument("--prompt", required=True, help="the text prompt")
    gen.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="PHRASE=x0,y0,x1,y1",
        help="a boxed phrase of the prompt, normalized coordinates in [0,1]; repeat for more boxes; "
        "'dog#2=...' boxes the second 'dog'",
    )
    gen.add_argument(
        "--layout", default=None, help="a layout JSON file ({'boxes': [{'phrase', 'box'}]}) instead of --box"
    )
    add_model_args(gen)
    gen.add_argument("--init", default="salt", choices=("salt", "random"), help="initial latent")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps")
    gen.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale")
    gen.add_argument("--negative-prompt", default=None, help="negative prompt")
    gen.add_argument("--seed", type=int, default=0, help="random seed (same seed → same image)")
    gen.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    gen.add_argument(
        "--reference",
        default=None,
        metavar="IMG",
        help="use this whole image as the reference for --init salt (instead of generated objects)",
    )
    gen.add_argument("--out", default="out.png", help="output PNG (recipe stored in its metadata)")
    gen.add_argument(
        "--overlay",
        action="store_true",
        help="also write OUT-overlay.png (boxes, reference, attention maps) and OUT-reference.png",
    )
    add_dataclass_args(
        gen,
        GuidanceConfig,
        {"loss": "guidance loss: salt, layout-guidance, boxdiff or none", **GUIDANCE_HELP},
    )
    add_dataclass_args(gen, SpatialAwareInit, SALT_INIT_HELP)
    add_dataclass_args(gen, GeneratedObjects, OBJECTS_HELP)
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    try:
        from .eval.cli import add_bench_parser
    except ImportError:  # evaluation extras not built
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub, add_model_args)
    try:
        from .demo import add_demo_parser
    except ImportError:
        add_demo_parser = None
    if add_demo_parser is not None:
        add_demo_parser(sub, add_model_args)
    return parser


def pick_device_dtype(device: str | None, dtype: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {device} requested but CUDA is not available on this machine")
    if dtype is None:
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def load_pipeline(model: str, device: str | None, dtype: str | None):
    """Load a ``SaltPipeline`` with a one-line error for a missing or broken model."""
    from .pipeline import SaltPipeline

    device, torch_dtype = pick_device_dtype(device, dtype)
    if model.startswith((".", "/")) and not os.path.exists(model):
        raise CliError(f"model folder {model!r} does not exist")
    try:
        pipe = SaltPipeline.from_pretrained(model, torch_dtype=torch_dtype)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CliError(f"cannot load model {model!r}: {first}") from exc
    return pipe.to(device)


def build_layout(args):
    from .layout import Layout

    if args.layout and args.box:
        raise CliError("give either --layout or --box, not both")
    if args.layout:
        if not os.path.isfile(args.layout):
            raise CliError(f"layout file {args.layout!r} not found")
        return Layout.from_json(args.layout)
    return Layout(tuple(Layout.parse_box_spec(spec) for spec in args.box))


def cmd_generate(args) -> int:
    from .guidance import GuidanceConfig
    from .init import RandomInit, SpatialAwareInit
    from .reference import GeneratedObjects, UserImages
    from .viz import overlay_figure, save_png_with_recipe

    if not args.prompt.strip():
        raise CliError("--prompt is empty")
    layout = build_layout(args)
    guidance = GuidanceConfig(**dataclass_kwargs(args, GuidanceConfig))
    if args.init == "salt":
        if args.reference:
            if dataclass_kwargs(args, GeneratedObjects):
                raise CliError("--reference replaces generated objects: object options do not apply")
            reference = UserImages(image=args.reference)
        else:
            reference = GeneratedObjects(**dataclass_kwargs(args, GeneratedObjects))
        init = SpatialAwareInit(reference=reference, **dataclass_kwargs(args, SpatialAwareInit))
    else:
        if args.reference or dataclass_kwargs(args, SpatialAwareInit):
            raise CliError("--reference and inversion options need --init salt")
        init = RandomInit()
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CliError(f"output folder {out_dir!r} does not exist")

    if args.quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    pipe = load_pipeline(args.model, args.device, args.dtype)
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    result = pipe(
        args.prompt,
        layout,
        init=init,
        guidance=guidance,
        num_inference_steps=args.steps,
        guidance_scale=args.cfg,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        seed=args.seed,
        return_attention_maps=args.overlay,
    )
    seconds = time.perf_counter() - start
    image = result.images[0]
    recipe = {
        "saltdiff_version": __version__,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "layout": layout.to_dict(),
        "model": args.model,
        "seed": args.seed,
        "steps": args.steps,
        "cfg": args.cfg,
        "height": image.height,
        "width": image.width,
        "init": args.init,
        "init_config": _init_recipe(init),
        "guidance": guidance.to_dict(),
        "dtype": str(pipe.unet.dtype).replace("torch.", ""),
    }
    save_png_with_recipe(image, args.out, recipe)
    written = [args.out]
    if args.overlay:
        stem = os.path.splitext(args.out)[0]
        maps = result.attention_maps[0] if result.attention_maps is not None else None
        overlay_figure(image, layout, maps, result.reference_image).save(stem + "-overlay.png")
        written.append(stem + "-overlay.png")
        if result.reference_image is not None:
            result.reference_image.save(stem + "-reference.png")
            written.append(stem + "-reference.png")
    sys.stderr.write(f"saltdiff: wrote {', '.join(written)} ({seconds:.1f} s)\n")
    return 0


def _init_recipe(init) -> dict:
    from .init import SpatialAwareInit

    if not isinstance(init, SpatialAwareInit):
        return {}
    data = {k: v for k, v in dataclasses.asdict(init).items() if k != "reference"}
    ref = init.reference
    data["reference"] = {"type": type(ref).__name__}
    if dataclasses.is_dataclass(ref):
        data["reference"].update(
            {
                k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                for k, v in dataclasses.asdict(ref).items()
            }
        )
    return data


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="saltdiff: %(levelname)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = os.environ.get("SALTDIFF_DEBUG") not in (None, "", "0")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("saltdiff: interrupted\n")
        return 130
    except (CliError, ValueError, TypeError, OSError) as exc:
        if debug:
            raise
        sys.stderr.write(f"saltdiff: error: {exc}\n")
        return 2
    except Exception as exc:  # a bug or a torch failure: still one line, with a pointer to debug
        if debug:
            raise
        sys.stderr.write(
            f"saltdiff: error: {type(exc).__name__}: {exc} (set SALTDIFF_DEBUG=1 for a traceback)\n"
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
