"""``saltdiff`` command line: ``generate`` (one image), plus ``bench``, ``study`` and ``demo``.

Flags map one to one onto the request (:class:`saltdiff.request.GenerationRequest`) and the
registered params (:mod:`saltdiff.registry`): a flag ``--guidance-steps`` is the guidance field
``guidance_steps``. Building the parser imports no torch; each command imports what it needs. Bad
input exits with status 2 and one line naming the problem (``SALTDIFF_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Sequence

from . import __version__
from .cli_args import CliError, HelpFormatter, Parser, add_method_args, add_model_args, method_options
from .demo.cli import add_demo_parser
from .eval.cli import add_bench_parser

logger = logging.getLogger("saltdiff")


def build_parser() -> Parser:
    parser = Parser(
        prog="saltdiff",
        description="Layout-controlled text-to-image generation with spatial-aware latent initialization "
        "(SALT): generate an image, benchmark methods, run studies, or start the demo.",
    )
    parser.add_argument("--version", action="version", version=f"saltdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser(
        "generate",
        help="generate one image for a prompt and a layout",
        description="Generate an image whose boxed phrases land in their boxes.",
        formatter_class=HelpFormatter,
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
        "--layout",
        default=None,
        help="a layout JSON file ({'boxes': [{'phrase', 'box'}], 'unboxed'?: [phrase]}) instead of --box",
    )
    gen.add_argument(
        "--unboxed",
        action="append",
        default=[],
        metavar="PHRASE",
        help="a phrase of the prompt naming an object wanted somewhere, without a box: SALT's reference "
        "places it away from the boxes; repeat for more (default: found from the model's vocabulary, "
        "for the built-in models)",
    )
    add_model_args(gen, scheduler_default=None)
    gen.add_argument("--steps", type=int, default=50, help="denoising steps")
    gen.add_argument(
        "--cfg",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the model's: 5 for the built-in models, as their model cards "
        "say; else its pipeline's: 7.5 SD 1.x/2.x and SDXL, 7.0 SD3, 3.5 FLUX's embedded guidance)",
    )
    gen.add_argument("--negative-prompt", default=None, help="negative prompt")
    gen.add_argument(
        "--true-cfg-scale",
        type=float,
        default=1.0,
        help="FLUX only: true classifier-free guidance on --negative-prompt (a second transformer call per "
        "step); 1 = off. FLUX's --cfg is its embedded guidance",
    )
    gen.add_argument("--seed", type=int, default=0, help="random seed (same seed → same image)")
    gen.add_argument("--height", type=int, default=None, help="image height (default: the model's)")
    gen.add_argument("--width", type=int, default=None, help="image width (default: the model's)")
    gen.add_argument(
        "--force",
        action="store_true",
        help="run a height or width more than 4x the model's trained size (refused otherwise: slow)",
    )
    gen.add_argument(
        "--out",
        default="out.png",
        help="output image, in the format of its extension (.png, .jpg/.jpeg, .webp: lossless), the recipe "
        "in its metadata",
    )
    gen.add_argument(
        "--overlay",
        action="store_true",
        help="also write OUT-overlay.png (boxes, reference, attention maps) and OUT-reference.png",
    )
    add_method_args(gen)
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)

    add_bench_parser(sub)
    add_demo_parser(sub)
    return parser


def build_layout(args):
    from .layout import Layout

    if args.layout and args.box:
        raise CliError("give either --layout or --box, not both")
    if args.layout:
        if not os.path.isfile(args.layout):
            raise CliError(f"layout file {args.layout!r} not found")
        layout = Layout.from_json(args.layout)
        if args.unboxed and layout.unboxed:
            raise CliError("the layout file lists unboxed phrases: give --unboxed or the file's, not both")
        return Layout(layout.boxes, tuple(args.unboxed) or layout.unboxed)
    return Layout(tuple(Layout.parse_box_spec(spec) for spec in args.box), tuple(args.unboxed))


def build_request(args):
    """The :class:`GenerationRequest` of ``saltdiff generate``'s flags."""
    from .guidance import GuidanceConfig
    from .request import GenerationRequest

    if not args.prompt.strip():
        raise CliError("--prompt is empty")
    options = method_options(args)
    return GenerationRequest(
        prompt=args.prompt,
        layout=build_layout(args),
        init=options.init,
        init_params=options.init_params,
        reference=options.reference or "objects",
        reference_params=options.reference_params,
        guidance=GuidanceConfig(loss=options.loss, **options.guidance, loss_params=options.loss_params),
        num_inference_steps=args.steps,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        seed=args.seed,
        scheduler=args.scheduler or "ddim",
        height=args.height,
        width=args.width,
        # unset: the request's default until cmd_generate puts in the loaded model's own scale
        **({} if args.cfg is None else {"guidance_scale": args.cfg}),
    )


def cmd_generate(args) -> int:
    from .loading import (
        check_image_size,
        denoiser,
        load_pipeline,
        pipeline_guidance_scale,
        resolve_device_dtype,
    )
    from .preflight import check_before_loading
    from .request import image_format
    from .viz import overlay_figure

    request = build_request(args)
    image_format(args.out)  # an extension saltdiff cannot write: one line, before any work
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CliError(f"output folder {out_dir!r} does not exist")
    resolve_device_dtype(args.device, args.dtype)  # an unknown or missing device: one line, now
    if args.scheduler is None:  # the model's own family's sampler (SD3: flow-euler), from model_index.json
        request = dataclasses.replace(request, scheduler=default_sampler_of(args.model))
    check_before_loading(args.model, request, force=args.force)  # config files only: no waiting for weights
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype)  # quiet: no loading bars
    if args.scheduler is None:  # a hub id not in the cache has no index before loading: ask its scheduler
        from .samplers import default_sampler

        request = dataclasses.replace(request, scheduler=default_sampler(pipe.scheduler))
    # the family's defaults (SD3, FLUX: no outside prompt unset, as the recipe says); what it lacks: one line
    request = request.for_pipeline(pipe)
    if args.cfg is None:  # the model's own scale (pipeline_guidance_scale: 5 for the built-in models)
        request = dataclasses.replace(request, guidance_scale=pipeline_guidance_scale(pipe))
    check_image_size(pipe, args.height, args.width, force=args.force)
    request = request.resolved(pipe.scheduler)  # e.g. the inversion depth --steps allows, for the recipe
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    result = request.run(pipe, return_attention_maps=args.overlay)
    seconds = time.perf_counter() - start
    image = result.images[0]
    dtype = str(denoiser(pipe).dtype).replace("torch.", "")
    request.save_png(image, args.out, model=args.model, dtype=dtype)
    written = [args.out]
    if args.overlay:
        stem = os.path.splitext(args.out)[0]
        maps = result.attention_maps[0] if result.attention_maps is not None else None
        figure = overlay_figure(
            image, request.layout, maps, result.reference_image, placed=result.info.get("placed_unboxed", ())
        )
        written.append(save_png(figure, stem + "-overlay.png"))
        if result.reference_image is not None:
            written.append(save_png(result.reference_image, stem + "-reference.png"))
    sys.stderr.write(f"saltdiff: wrote {', '.join(written)} ({seconds:.1f} s)\n")
    return 0


def default_sampler_of(model: str) -> str:
    """The sampler ``model``'s family runs by default (:data:`saltdiff.checkpoints.DEFAULT_SAMPLERS`),
    read from its ``model_index.json`` (a folder or a cached hub id; never the network), else ``"ddim"``."""
    from .checkpoints import DEFAULT_SAMPLERS, ModelLoadError, index_family, resolve_model

    try:
        family = index_family(resolve_model(model), model)
    except (ModelLoadError, OSError, ValueError):  # load_pipeline says what is wrong, in one line
        family = None
    return DEFAULT_SAMPLERS.get(family or "sd", "ddim")


def save_png(image, path: str) -> str:
    """Write ``image`` as a PNG at ``path`` atomically (never a half-written file); returns ``path``."""
    from .fileio import atomic_write

    atomic_write(path, lambda fh: image.save(fh, format="PNG"))
    return path


def _log_to_stderr() -> None:
    """saltdiff's warnings as ``saltdiff: WARNING: ...`` lines on stderr, once. Only saltdiff's
    logger gets the handler: other libraries' records keep their own handlers (a handler on the
    root logger printed each of huggingface_hub's warnings a second time)."""
    if not any(getattr(h, "_saltdiff_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("saltdiff: %(levelname)s: %(message)s"))
        handler._saltdiff_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    _log_to_stderr()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error (already printed, one line)
        return int(exc.code or 0)
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
