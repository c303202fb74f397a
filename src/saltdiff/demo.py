"""``saltdiff demo``: a Gradio page to draw boxes, generate, compare SALT with random init, and inspect.

The request handling is plain functions, testable without a browser or a server:

* :func:`layout_from_annotation` turns the box-drawing component's value (boxes in pixels of the
  canvas image, each labelled with its phrase) into a normalized :class:`~saltdiff.layout.Layout`;
* :func:`validate_request` checks everything a page can send and returns a :class:`DemoRequest`
  (every bad value raises ``ValueError`` naming it, phrases are looked up in the model's tokenizer);
* :func:`run_generation` runs the pipeline (twice with ``compare``) and returns a :class:`DemoResult`
  with the pictures, the per-step losses and a PNG carrying the same recipe as ``saltdiff generate``.

:func:`build_app` wires them to the page; :func:`launch_kwargs` holds the server's safety settings
(loopback by default, no share link, upload size limit). Generations are queued one at a time.
Needs the ``demo`` extra: ``pip install 'saltdiff[demo]'``.
"""

import logging
import math
import numbers
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from . import __version__
from .guidance import GUIDANCE_LOSSES, GuidanceConfig
from .init import RandomInit, SpatialAwareInit
from .layout import Box, Layout, LayoutError
from .pipeline import DEFAULT_MODEL, INIT_NAMES, builtin_models
from .reference import BACKGROUNDS as REFERENCE_BACKGROUNDS
from .reference import GeneratedObjects, UserImages
from .viz import PALETTE, draw_boxes, heatmap, save_png_with_recipe

logger = logging.getLogger(__name__)

#: Side of the neutral canvas the boxes are drawn on (pixels; boxes are normalized by it).
CANVAS_SIZE = 512
CANVAS_COLOR = (236, 236, 236)
#: Side of the pictures shown in the page (small model outputs are upscaled, nearest neighbour).
DISPLAY_SIZE = 256
#: Limits on what a page may ask for.
MAX_PROMPT_CHARS = 400
MAX_BOXES = 8
MAX_STEPS = 150
MAX_INVERSION_STEPS = 100
MAX_CFG = 30.0
MAX_SEED = 2**32 - 1
MAX_CANVAS_SIDE = 4096
#: Largest accepted upload (Gradio refuses bigger files before they reach the handlers).
MAX_UPLOAD = "10mb"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Pixels a drawn box may overshoot the canvas edge (mouse rounding) before it counts as outside.
EDGE_TOLERANCE_PX = 2.0


class GenerationCancelled(Exception):
    """The user pressed Cancel while a generation was running."""


# -- pure request handling ------------------------------------------------------------------------


def neutral_canvas(size: int = CANVAS_SIZE) -> Image.Image:
    """The plain canvas boxes are drawn on: light gray with a faint grid every eighth of a side."""
    image = Image.new("RGB", (size, size), CANVAS_COLOR)
    draw = ImageDraw.Draw(image)
    for k in range(1, 8):
        p = round(k * size / 8)
        draw.line([(p, 0), (p, size - 1)], fill=(222, 222, 222))
        draw.line([(0, p), (size - 1, p)], fill=(222, 222, 222))
    return image


def annotation_image_size(value: Mapping | None) -> tuple[int, int]:
    """(width, height) of the image inside the component's value."""
    if not isinstance(value, Mapping) or value.get("image") is None:
        raise ValueError("draw the boxes on the canvas first: the layout has no image")
    image = value["image"]
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return int(image.shape[1]), int(image.shape[0])
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.size
    raise TypeError(f"unsupported canvas image of type {type(image).__name__}")


def annotation_image(value: Mapping) -> Image.Image:
    """The component's image as an RGB PIL image."""
    image = value["image"]
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _coord(box: Mapping, key: str, index: int) -> float:
    value = box.get(key)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise LayoutError(f"box {index} has an invalid {key} {value!r}: expected a finite number of pixels")
    return float(value)


def _label_to_phrase(label: Any, index: int) -> tuple[str, int | None]:
    """A box label ``"phrase"`` or ``"phrase#N"`` (N-th occurrence, 1-based) → (phrase, 0-based occurrence)."""
    if not isinstance(label, str) or not label.strip():
        raise LayoutError(
            f"box {index} has no phrase: double-click it and type the words of the prompt it should hold "
            f"(got label {label!r})"
        )
    phrase, sep, number = label.strip().rpartition("#")
    if not sep:
        return label.strip(), None
    if not number.strip().isdigit() or int(number) < 1 or not phrase.strip():
        raise LayoutError(
            f"box {index} label {label!r}: use 'phrase' or 'phrase#N' (N-th occurrence, counting from 1)"
        )
    return phrase.strip(), int(number) - 1


def layout_from_annotation(
    value: Mapping | None, width: int | None = None, height: int | None = None
) -> Layout:
    """The component's boxes (pixels of a ``width`` × ``height`` image, labels = phrases) as a normalized Layout.

    ``width``/``height`` default to the size of the image inside ``value``. Boxes keep the
    component's order; a label ``"dog#2"`` binds the box to the second "dog" of the prompt. Coordinates may
    overshoot the image by :data:`EDGE_TOLERANCE_PX` pixels (they are clipped); further out, a box
    is refused, as are boxes of zero area and unlabelled boxes.
    """
    if width is None or height is None:
        w, h = annotation_image_size(value)
        width, height = width or w, height or h
    for name, size in (("width", width), ("height", height)):
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"canvas {name} must be a positive integer, got {size!r}")
    if not isinstance(value, Mapping):
        raise ValueError(f"expected the box-drawing component's value (a dict), got {type(value).__name__}")
    if value.get("orientation") not in (None, 0):
        raise ValueError(
            f"the canvas image is rotated (orientation {value.get('orientation')!r}); upload an upright image"
        )
    raw = value.get("boxes") or []
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise ValueError(f"boxes must be a list, got {type(raw).__name__}")
    if len(raw) > MAX_BOXES:
        raise LayoutError(f"at most {MAX_BOXES} boxes per layout, got {len(raw)}")
    boxes = []
    for i, item in enumerate(raw, start=1):
        if not isinstance(item, Mapping):
            raise LayoutError(f"box {i} must be a dict with xmin, ymin, xmax, ymax and label, got {item!r}")
        phrase, occurrence = _label_to_phrase(item.get("label"), i)
        px = [_coord(item, k, i) for k in ("xmin", "ymin", "xmax", "ymax")]
        limits = (width, height, width, height)
        outside = [v for v, lim in zip(px, limits) if v < -EDGE_TOLERANCE_PX or v > lim + EDGE_TOLERANCE_PX]
        if outside:
            raise LayoutError(f"box {i} ({phrase!r}) at pixels {px} lies outside the {width}x{height} canvas")
        norm = tuple(min(max(v / lim, 0.0), 1.0) for v, lim in zip(px, limits))
        if norm[2] <= norm[0] or norm[3] <= norm[1]:
            raise LayoutError(
                f"box {i} ({phrase!r}) at pixels {px} has zero area: draw it with the mouse, "
                "from one corner to the opposite one"
            )
        boxes.append(Box(phrase, norm, occurrence))  # type: ignore[arg-type]
    return Layout(tuple(boxes))


def annotation_from_layout(layout: Layout, image: Image.Image | None = None) -> dict:
    """The component's value showing ``layout`` on ``image`` (default: the neutral canvas)."""
    image = image if image is not None else neutral_canvas()
    boxes = []
    for k, box in enumerate(layout):
        x0, y0, x1, y1 = box.to_pixels(image.width, image.height)
        label = box.phrase if box.occurrence is None else f"{box.phrase}#{box.occurrence + 1}"
        boxes.append(
            {
                "xmin": x0,
                "ymin": y0,
                "xmax": x1,
                "ymax": y1,
                "label": label,
                "color": PALETTE[k % len(PALETTE)],
            }
        )
    return {"image": np.asarray(image.convert("RGB")), "boxes": boxes}


@dataclass(frozen=True)
class DemoRequest:
    """One validated generation request from the page."""

    prompt: str
    layout: Layout
    init: str = "salt"
    guidance: str = "salt"
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    seed: int = 0
    inversion_steps: int = SpatialAwareInit.inversion_steps
    compare: bool = False
    object_steps: int = 25
    background: str = GeneratedObjects.background
    reference_image: Image.Image | None = field(default=None, compare=False, repr=False)


def _as_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if int(value) != value or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def validate_request(
    prompt: Any,
    annotation: Mapping | None,
    *,
    tokenizer=None,
    init: str = "salt",
    guidance: str = "salt",
    num_inference_steps: Any = 30,
    guidance_scale: Any = 7.5,
    seed: Any = 0,
    inversion_steps: Any = SpatialAwareInit.inversion_steps,
    compare: bool = False,
    use_canvas_as_reference: bool = False,
    object_steps: Any = 25,
    background: str = GeneratedObjects.background,
) -> DemoRequest:
    """Check a request from the page; ``ValueError`` (``LayoutError`` for the layout) names the bad value.

    With a ``tokenizer`` each boxed phrase must be found in the prompt as that model tokenizes it.
    ``use_canvas_as_reference`` makes the canvas image (an uploaded picture) SALT's reference image
    instead of generated objects.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the whole image, including the boxed phrases")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is too long ({len(prompt)} characters, at most {MAX_PROMPT_CHARS})")
    if init not in INIT_NAMES:
        raise ValueError(f"init must be one of {INIT_NAMES}, got {init!r}")
    if guidance not in GUIDANCE_LOSSES:
        raise ValueError(f"guidance must be one of {GUIDANCE_LOSSES}, got {guidance!r}")
    steps = _as_int(num_inference_steps, "steps", 1, MAX_STEPS)
    inv = _as_int(inversion_steps, "inversion steps", 1, MAX_INVERSION_STEPS)
    seed = _as_int(seed, "seed", 0, MAX_SEED)
    object_steps = _as_int(object_steps, "object steps", 1, MAX_STEPS)
    if background not in REFERENCE_BACKGROUNDS:
        raise ValueError(f"reference background must be one of {REFERENCE_BACKGROUNDS}, got {background!r}")
    if (
        isinstance(guidance_scale, bool)
        or not isinstance(guidance_scale, numbers.Real)
        or not math.isfinite(guidance_scale)
        or not 0 <= guidance_scale <= MAX_CFG
    ):
        raise ValueError(f"CFG scale must be a number in [0, {MAX_CFG}], got {guidance_scale!r}")
    width, height = annotation_image_size(annotation)
    if max(width, height) > MAX_CANVAS_SIDE:
        raise ValueError(
            f"the canvas image is {width}x{height} pixels; at most {MAX_CANVAS_SIDE} pixels a side"
        )
    layout = layout_from_annotation(annotation, width, height)
    if not len(layout):
        raise LayoutError("draw at least one box and label it with a phrase of the prompt")
    if tokenizer is not None:
        layout.resolve_tokens(tokenizer, prompt)
    reference = None
    if use_canvas_as_reference:
        if init != "salt" and not compare:
            raise ValueError("the canvas image is used as a reference only by init 'salt'")
        reference = annotation_image(annotation)  # type: ignore[arg-type]
    return DemoRequest(
        prompt=prompt,
        layout=layout,
        init=init,
        guidance=guidance,
        num_inference_steps=steps,
        guidance_scale=float(guidance_scale),
        seed=seed,
        inversion_steps=inv,
        compare=bool(compare),
        object_steps=object_steps,
        background=background,
        reference_image=reference,
    )


@dataclass
class RunOutput:
    """One pipeline run of a request: its init name, the SaltOutput, and the init object used."""

    init: str
    output: Any
    init_object: Any
    seconds: float


@dataclass
class DemoResult:
    """Everything the page shows for one request."""

    image: Image.Image
    boxed: Image.Image
    reference: Image.Image | None
    heatmaps: list[tuple[Image.Image, str]]
    losses: list[dict]
    recipe: dict
    png_path: str | None
    compare: list[tuple[Image.Image, str]]
    runs: list[RunOutput]
    seconds: float

    def losses_frame(self):
        """The per-step losses as a pandas DataFrame (columns step, loss, series) for a line plot."""
        import pandas as pd

        return pd.DataFrame(self.losses, columns=["step", "loss", "series"])


def make_init(request: DemoRequest, init: str):
    """The initializer object for ``init`` ('salt' or 'random') under ``request``."""
    if init == "random":
        return RandomInit()
    reference = (
        UserImages(image=request.reference_image)
        if request.reference_image is not None
        else GeneratedObjects(background=request.background, num_inference_steps=request.object_steps)
    )
    return SpatialAwareInit(reference=reference, inversion_steps=request.inversion_steps)


def _init_recipe(init) -> dict:
    from .cli import _init_recipe as cli_init_recipe

    data = cli_init_recipe(init)
    if isinstance(init, SpatialAwareInit) and isinstance(init.reference, UserImages):
        data["reference"]["image"] = "uploaded canvas image"
    return data


def build_recipe(request: DemoRequest, image: Image.Image, init_object, *, model: str, dtype: str) -> dict:
    """The PNG recipe, with the same keys as ``saltdiff generate``."""
    return {
        "saltdiff_version": __version__,
        "prompt": request.prompt,
        "negative_prompt": None,
        "layout": request.layout.to_dict(),
        "model": model,
        "seed": request.seed,
        "steps": request.num_inference_steps,
        "cfg": request.guidance_scale,
        "height": image.height,
        "width": image.width,
        "init": "salt" if isinstance(init_object, SpatialAwareInit) else "random",
        "init_config": _init_recipe(init_object),
        "guidance": GuidanceConfig(loss=request.guidance).to_dict(),
        "dtype": dtype,
    }


def _display(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    scale = max(1, size // max(image.width, 1))
    image = image.convert("RGB")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def run_generation(
    pipe,
    request: DemoRequest,
    *,
    model: str = DEFAULT_MODEL,
    on_step: Callable[[int, int, str], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    out_dir: str | None = None,
) -> DemoResult:
    """Run ``request`` on ``pipe`` (random init then SALT with the same seed when ``compare``).

    ``on_step(done, total, description)`` is called after every denoising step (for a progress
    bar); when ``should_cancel()`` turns true the run stops with :class:`GenerationCancelled` at the
    next denoising step (building SALT's reference objects is not interrupted).
    The image and its recipe are written to a PNG in ``out_dir`` (a fresh temporary folder by default).
    """
    inits = ["random", "salt"] if request.compare else [request.init]
    total = len(inits) * request.num_inference_steps
    runs: list[RunOutput] = []
    start = time.perf_counter()
    for r, init in enumerate(inits):

        def callback(_pipe, i, _t, kwargs, r=r, init=init):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled("generation cancelled")
            if on_step is not None:
                on_step(r * request.num_inference_steps + i + 1, total, f"{init} init: step {i + 1}")
            return kwargs

        init_object = make_init(request, init)
        t0 = time.perf_counter()
        output = pipe(
            request.prompt,
            request.layout,
            init=init_object,
            guidance=request.guidance,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed,
            return_attention_maps=True,
            callback_on_step_end=callback,
            progress=False,
        )
        runs.append(RunOutput(init, output, init_object, time.perf_counter() - t0))
    seconds = time.perf_counter() - start

    main = runs[-1]
    image = main.output.images[0]
    scale = max(1, DISPLAY_SIZE // image.width)
    boxed = draw_boxes(image, request.layout, scale=scale)
    reference = main.output.reference_image
    heatmaps = []
    maps = main.output.attention_maps
    if maps is not None:
        for k, box in enumerate(request.layout):
            heat = heatmap(maps[0, k], (image.width * scale, image.height * scale))
            heatmaps.append((draw_boxes(heat, Layout((box,)), labels=False), f"attention: {box.phrase}"))
    losses = []
    for run in runs:
        for step, value in enumerate(run.output.layout_losses):
            losses.append({"step": step, "loss": float(value), "series": f"{run.init} init: layout energy"})
        for step, values in enumerate(run.output.guidance_losses):
            if values:
                losses.append(
                    {"step": step, "loss": float(values[0]), "series": f"{run.init} init: guidance loss"}
                )
    compare = [
        (
            draw_boxes(run.output.images[0], request.layout, scale=scale),
            f"{run.init} init, seed {request.seed}",
        )
        for run in runs
    ]
    dtype = str(getattr(getattr(pipe, "unet", None), "dtype", "float32")).replace("torch.", "")
    recipe = build_recipe(request, image, main.init_object, model=model, dtype=dtype)
    out_dir = out_dir or tempfile.mkdtemp(prefix="saltdiff-demo-")
    png_path = os.path.join(out_dir, f"saltdiff-{main.init}-seed{request.seed}.png")
    save_png_with_recipe(image, png_path, recipe)
    return DemoResult(
        image=image,
        boxed=boxed,
        reference=_display(reference) if reference is not None else None,
        heatmaps=heatmaps,
        losses=losses,
        recipe=recipe,
        png_path=png_path,
        compare=compare,
        runs=runs,
        seconds=seconds,
    )


# -- models ---------------------------------------------------------------------------------------


def check_model_choice(name: Any, served: Sequence[str], *, allow_model_paths: bool) -> str:
    """Refuse a model name typed in the page unless the server allows it (no arbitrary file reads)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("choose a model")
    name = name.strip()
    if name in served:
        return name
    if not allow_model_paths:
        raise ValueError(
            f"model {name!r} is not served here: this server only offers {list(served)}; loading other "
            "models from the page needs `saltdiff demo --allow-model-paths`"
        )
    return name


class ModelPool:
    """The pipelines a server offers; one extra model (typed in the page) is kept loaded at a time."""

    def __init__(self, default, *, name: str | None = None, device=None, dtype=None, allow_model_paths=False):
        self.device, self.dtype = device, dtype
        self.allow_model_paths = allow_model_paths
        self._lock = threading.Lock()
        if isinstance(default, str):
            self.default_name = default
            self._pipes = {default: self._load(default)}
        else:
            self.default_name = name or _pipe_name(default)
            self._pipes = {self.default_name: _as_salt_pipeline(default)}
        self.choices = [self.default_name] + [
            f"builtin:{k}" for k in builtin_models() if f"builtin:{k}" != self.default_name
        ]

    def _load(self, name: str):
        from .cli import CliError, load_pipeline

        try:
            pipe = load_pipeline(name, self.device, self.dtype)
        except CliError as exc:  # a missing folder or an unloadable model: a user error in the page
            raise ValueError(str(exc)) from None
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def get(self, name: str):
        name = check_model_choice(name, self.choices, allow_model_paths=self.allow_model_paths)
        with self._lock:
            if name not in self._pipes:
                for extra in [k for k in self._pipes if k != self.default_name]:
                    del self._pipes[extra]
                self._pipes[name] = self._load(name)
            return self._pipes[name]


def _pipe_name(pipe) -> str:
    name = getattr(pipe, "name_or_path", None) or getattr(
        getattr(pipe, "config", None), "_name_or_path", None
    )
    return str(name) if name else "in-memory pipeline"


def _as_salt_pipeline(pipe):
    from diffusers import StableDiffusionPipeline

    from .pipeline import SaltPipeline

    if isinstance(pipe, StableDiffusionPipeline) and not isinstance(pipe, SaltPipeline):
        pipe = SaltPipeline.from_pipe(pipe)
    return pipe


# -- the page -------------------------------------------------------------------------------------

EXAMPLES = [
    (
        "a red circle and a blue square on a white background",
        [("red circle", (0.06, 0.3, 0.44, 0.7)), ("blue square", (0.56, 0.3, 0.94, 0.7))],
    ),
    (
        "a green triangle above a yellow circle",
        [("green triangle", (0.3, 0.05, 0.7, 0.45)), ("yellow circle", (0.3, 0.55, 0.7, 0.95))],
    ),
    ("a purple square", [("purple square", (0.1, 0.1, 0.6, 0.6))]),
]


def queue_settings() -> dict:
    """``Blocks.queue`` arguments: one generation at a time, a bounded waiting line."""
    return {"default_concurrency_limit": 1, "max_size": 16}


def launch_kwargs(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> dict:
    """``Blocks.launch`` arguments: no public share link, upload size limit, errors shown in the page."""
    return {
        "server_name": host,
        "server_port": port,
        "share": False,
        "max_file_size": MAX_UPLOAD,
        "show_error": True,
        "inbrowser": False,
    }


def user_message(exc: BaseException) -> str:
    """The one-line message a page shows for an exception from a request."""
    if isinstance(exc, GenerationCancelled):
        return "Generation cancelled."
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return str(exc)
    return f"generation failed: {type(exc).__name__}: {exc}"


#: Initial values of the page's controls (``build_app(defaults=...)`` overrides some).
CONTROL_DEFAULTS = {
    "init": "salt",
    "guidance": "salt",
    "steps": 30,
    "cfg": 7.5,
    "seed": 0,
    "inversion_steps": SpatialAwareInit.inversion_steps,
    "compare": False,
    "object_steps": 25,
    "background": GeneratedObjects.background,
}


def build_app(
    pipe_or_model,
    *,
    allow_model_paths: bool = False,
    model_name: str | None = None,
    device=None,
    dtype=None,
    defaults: Mapping[str, Any] | None = None,
):
    """The Gradio app for a pipeline object or a model name (hub id, folder, ``builtin:NAME``).

    ``defaults`` overrides initial control values (keys of :data:`CONTROL_DEFAULTS`).
    """
    import gradio as gr
    from gradio_image_annotation import image_annotator

    unknown = set(defaults or {}) - set(CONTROL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown control default(s) {sorted(unknown)}; valid: {sorted(CONTROL_DEFAULTS)}")
    d = {**CONTROL_DEFAULTS, **(defaults or {})}

    pool = ModelPool(
        pipe_or_model, name=model_name, device=device, dtype=dtype, allow_model_paths=allow_model_paths
    )
    cancel_flags: dict[str, threading.Event] = {}
    out_root = tempfile.mkdtemp(prefix="saltdiff-demo-")

    def generate(
        model,
        prompt,
        annotation,
        use_reference,
        init,
        guidance,
        steps,
        cfg,
        seed,
        inv_steps,
        compare,
        object_steps,
        background,
        request: gr.Request,
        progress=gr.Progress(),
    ):
        session = getattr(request, "session_hash", None) or "local"
        flag = cancel_flags.setdefault(session, threading.Event())
        flag.clear()
        try:
            pipe = pool.get(model)
            req = validate_request(
                prompt,
                annotation,
                tokenizer=getattr(pipe, "tokenizer", None),
                init=init,
                guidance=guidance,
                num_inference_steps=steps,
                guidance_scale=cfg,
                seed=seed,
                inversion_steps=inv_steps,
                compare=compare,
                use_canvas_as_reference=use_reference,
                object_steps=object_steps,
                background=background,
            )
            progress(0, desc="starting")
            result = run_generation(
                pipe,
                req,
                model=model,
                on_step=lambda done, total, desc: progress((done, total), desc=desc),
                should_cancel=flag.is_set,
                out_dir=tempfile.mkdtemp(dir=out_root),
            )
        except Exception as exc:
            if not isinstance(exc, (ValueError, TypeError, OSError, GenerationCancelled)):
                logger.exception("generation failed")
            raise gr.Error(user_message(exc), print_exception=False) from None
        status = (
            f"Done in {result.seconds:.1f} s: {len(req.layout)} box(es), init {req.init if not req.compare else 'random vs salt'}, "
            f"guidance {req.guidance}, {req.num_inference_steps} steps, seed {req.seed}."
        )
        return (
            _display(result.image),
            result.boxed,
            result.reference,
            result.heatmaps,
            result.losses_frame(),
            gr.update(value=result.compare, visible=req.compare),
            result.png_path,
            status,
        )

    def cancel(request: gr.Request):
        session = getattr(request, "session_hash", None) or "local"
        cancel_flags.setdefault(session, threading.Event()).set()
        return "Cancelling…"

    with gr.Blocks(title="saltdiff demo") as demo:
        gr.Markdown(
            "## saltdiff: layout-controlled generation with spatial-aware latent initialization (SALT)\n"
            "Draw boxes on the canvas with the mouse, label each with a phrase of the prompt "
            "(`dog#2` = the second *dog*), then Generate. Upload a picture to draw on it and use it as "
            "SALT's reference image."
        )
        with gr.Row():
            with gr.Column(scale=3):
                annotator = image_annotator(
                    value={"image": np.asarray(neutral_canvas()), "boxes": []},
                    label="Layout: draw boxes, label them with phrases of the prompt",
                    label_list=None,
                    image_type="numpy",
                    sources=["upload"],
                    box_min_size=4,
                    show_remove_button=True,
                    handles_cursor=True,
                    elem_id="layout-canvas",
                )
                prompt = gr.Textbox(
                    label="Prompt",
                    placeholder="a red circle and a blue square on a white background",
                    elem_id="prompt",
                    max_length=MAX_PROMPT_CHARS,
                )
                use_reference = gr.Checkbox(
                    label="Use the canvas image as SALT's reference image (set when you upload one)",
                    value=False,
                    elem_id="use-reference",
                )
                with gr.Row():
                    model = gr.Dropdown(
                        pool.choices,
                        value=pool.default_name,
                        label="Model" + (" (hub id or folder allowed)" if allow_model_paths else ""),
                        allow_custom_value=allow_model_paths,
                        elem_id="model",
                    )
                    init = gr.Radio(list(INIT_NAMES), value=d["init"], label="Initial latent", elem_id="init")
                    guidance = gr.Radio(
                        list(GUIDANCE_LOSSES), value=d["guidance"], label="Guidance", elem_id="guidance"
                    )
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps", elem_id="steps")
                    cfg = gr.Slider(0, MAX_CFG, value=d["cfg"], step=0.5, label="CFG scale", elem_id="cfg")
                    seed = gr.Number(
                        d["seed"], precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed"
                    )
                    inv_steps = gr.Slider(
                        1,
                        MAX_INVERSION_STEPS,
                        value=d["inversion_steps"],
                        step=1,
                        label="Inversion steps (SALT)",
                        elem_id="inv-steps",
                    )
                compare = gr.Checkbox(
                    label="Compare: random init vs SALT, same seed", value=d["compare"], elem_id="compare"
                )
                with gr.Accordion("Reference objects (SALT)", open=False):
                    with gr.Row():
                        background = gr.Radio(
                            list(REFERENCE_BACKGROUNDS),
                            value=d["background"],
                            label="Reference background",
                            elem_id="background",
                        )
                        object_steps = gr.Slider(
                            1,
                            MAX_STEPS,
                            value=d["object_steps"],
                            step=1,
                            label="Steps per generated object",
                            elem_id="object-steps",
                        )
                with gr.Row():
                    run_btn = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_btn = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column(scale=3):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    out_image = gr.Image(label="Result", type="pil", elem_id="result", interactive=False)
                    out_boxed = gr.Image(
                        label="Result with boxes", type="pil", elem_id="result-boxes", interactive=False
                    )
                    out_reference = gr.Image(
                        label="Reference image (SALT)", type="pil", elem_id="reference", interactive=False
                    )
                compare_gallery = gr.Gallery(
                    label="Random init vs SALT", columns=2, visible=False, elem_id="compare-gallery"
                )
                heat_gallery = gr.Gallery(
                    label="Attention per phrase", columns=4, height=220, elem_id="heatmaps"
                )
                loss_plot = gr.LinePlot(
                    x="step",
                    y="loss",
                    color="series",
                    label="Loss per denoising step",
                    elem_id="loss-plot",
                    height=220,
                )
                download = gr.File(label="PNG with its recipe", elem_id="download", interactive=False)

        inputs = [
            model,
            prompt,
            annotator,
            use_reference,
            init,
            guidance,
            steps,
            cfg,
            seed,
            inv_steps,
            compare,
            object_steps,
            background,
        ]
        outputs = [
            out_image,
            out_boxed,
            out_reference,
            heat_gallery,
            loss_plot,
            compare_gallery,
            download,
            status,
        ]
        gen_event = run_btn.click(
            generate,
            inputs,
            outputs,
            concurrency_limit=1,
            concurrency_id="generate",
            api_name="generate",
        )
        prompt.submit(
            generate, inputs, outputs, concurrency_limit=1, concurrency_id="generate", api_name=False
        )
        stop_btn.click(cancel, None, status, cancels=[gen_event], queue=False, api_name=False)
        annotator.upload(lambda: True, None, use_reference, queue=False, api_name=False)
        gr.Examples(
            examples=[
                [annotation_from_layout(Layout.from_pairs(pairs)), text, "salt", "salt", False]
                for text, pairs in EXAMPLES
            ],
            inputs=[annotator, prompt, init, guidance, compare],
            label="Examples (click one, then Generate)",
        )
    demo.queue(**queue_settings())
    demo.saltdiff_pool = pool  # for tests and callers that want the pipelines
    return demo


# -- command line ---------------------------------------------------------------------------------


def add_demo_parser(subparsers, add_model_args) -> None:
    """Register ``saltdiff demo``."""
    parser = subparsers.add_parser(
        "demo",
        help="start the interactive web demo (needs the 'demo' extra)",
        description="Start a Gradio page: draw boxes, generate, compare SALT with random init, inspect.",
    )
    add_model_args(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"interface to bind (default: {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--allow-model-paths",
        action="store_true",
        help="let the page load other models (hub ids or folders on this machine) typed by the user",
    )
    parser.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from .cli_args import CliError

    try:
        import gradio  # noqa: F401
        import gradio_image_annotation  # noqa: F401
    except ImportError as exc:
        raise CliError(f"the demo needs the 'demo' extra: pip install 'saltdiff[demo]' ({exc})") from None
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}")
    app = build_app(
        args.model, allow_model_paths=args.allow_model_paths, device=args.device, dtype=args.dtype
    )
    app.launch(**launch_kwargs(args.host, args.port))
    return 0


__all__ = [
    "DemoRequest",
    "DemoResult",
    "GenerationCancelled",
    "add_demo_parser",
    "build_app",
    "check_model_choice",
    "launch_kwargs",
    "layout_from_annotation",
    "queue_settings",
    "run_generation",
    "validate_request",
]
