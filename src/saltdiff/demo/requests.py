"""The page's fields → a validated request, one run of it, and what the page shows (no gradio here).

* :func:`layout_from_annotation` turns the box-drawing component's value (boxes in pixels of the
  canvas image, each labelled with its phrase) into a normalized :class:`~saltdiff.layout.Layout`;
* :func:`validate_request` checks everything a page can send and returns a :class:`DemoRequest`: the
  :class:`~saltdiff.request.GenerationRequest` that ``saltdiff generate`` and the bench also build,
  plus the page-only ``compare`` switch (every bad value raises ``ValueError`` naming it; phrases are
  looked up in the model's tokenizer);
* :func:`run_generation` runs it (random init first with ``compare``) and returns a
  :class:`DemoResult` with the pictures, the per-step losses and a PNG carrying the recipe that
  :meth:`GenerationRequest.save_png` writes, the same as ``saltdiff generate``.
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..guidance import OUTSIDE_PROMPT_STEPS, GuidanceConfig
from ..layout import Box, Layout, LayoutError
from ..loading import DEFAULT_MODEL, denoiser
from ..registry import GUIDANCE_LOSSES, INITIALIZERS, REFERENCE_BUILDERS, SCHEDULERS
from ..request import GenerationRequest
from ..viz import PALETTE, draw_boxes, heatmap

#: Side of the neutral canvas the boxes are drawn on (pixels; boxes are normalized by it).
CANVAS_SIZE = 512
CANVAS_COLOR = (236, 236, 236)
#: Side of the pictures shown in the page (small model outputs are upscaled, nearest neighbour).
DISPLAY_SIZE = 256
#: Limits on what a page may ask for (tighter than the registry's bounds where those are open).
MAX_PROMPT_CHARS = 400
MAX_BOXES = 8
MAX_STEPS = 150
MAX_INVERSION_STEPS = 100
MAX_CFG = 30.0
MAX_SEED = 2**32 - 1
MAX_CANVAS_SIDE = 4096
#: Most steps a page may give the outside prompt (the outside-prompt study swept 0..25).
MAX_OUTSIDE_PROMPT_STEPS = 25
#: Pixels a drawn box may overshoot the canvas edge (mouse rounding) before it counts as outside.
EDGE_TOLERANCE_PX = 2.0
#: Denoising steps the page starts with: those of the README's benchmark table and demo screenshot
#: (``saltdiff bench``'s default; ``saltdiff generate`` and the API default to 50).
DEFAULT_STEPS = 25

#: The initializer that compare mode pits against random init, and the registered params the page
#: sets (their defaults, help texts and lower bounds come from the registry).
SALT_INIT = "salt"
RANDOM_INIT = "random"
INVERSION_STEPS = INITIALIZERS.get(SALT_INIT).param("inversion_steps")
#: The page's inversion-steps value that leaves ``inversion_steps`` unset (the registered default:
#: 5, or as many as fit when few sampling steps start too low for 5); a slider cannot say None.
INVERSION_STEPS_AUTO = 0
OBJECT_STEPS = REFERENCE_BUILDERS.get("objects").param("num_inference_steps")
#: The page's object-steps value that leaves them unset (the model family's: 25, flow models 10).
OBJECT_STEPS_AUTO = 0
BACKGROUND = REFERENCE_BUILDERS.get("objects").param("background")
NOISE_OUTSIDE = INITIALIZERS.get(SALT_INIT).param("noise_outside")


class GenerationCancelled(Exception):
    """The user pressed Cancel while a generation was running."""


# -- annotation <-> layout --------------------------------------------------------------------------


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
    for k, (box, label) in enumerate(zip(layout, layout.labels)):  # a repeated phrase: "dog", "dog#2"
        x0, y0, x1, y1 = box.to_pixels(image.width, image.height)
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


def example_thumbnail(value: Mapping) -> dict:
    """The component's value with its boxes drawn into the image: what an example row shows.

    The box-drawing component's example thumbnail is its image alone, so every example looked like
    the same empty canvas; the page's examples draw their layout in (the value loaded on a click
    keeps the plain canvas).
    """
    layout = layout_from_annotation(value)
    boxed = draw_boxes(annotation_image(value), layout, width=max(2, CANVAS_SIZE // 128))
    return {**value, "image": np.asarray(boxed)}


@dataclass(frozen=True)
class DemoRequest:
    """One validated request from the page: the generation it asks for and the page-only choices.

    ``generation`` is the run whose image the page shows; with ``compare`` it uses the SALT
    initializer and a random-init run with the same seed comes first (:meth:`runs`).
    """

    generation: GenerationRequest
    compare: bool = False

    def runs(self) -> list[tuple[str, GenerationRequest]]:
        """``(label, request)`` of each pipeline run, in order; the last one is the page's result."""
        if not self.compare:
            return [(self.generation.init, self.generation)]
        baseline = replace(self.generation, init=RANDOM_INIT, init_params={}, reference_params={})
        return [(RANDOM_INIT, baseline), (self.generation.init, self.generation)]

    @property
    def reference_image(self) -> Image.Image | None:
        """The uploaded canvas when it is SALT's reference image, else ``None``."""
        gen = self.generation
        return gen.reference_params.get("image") if gen.uses_reference and gen.reference == "image" else None


def _as_int(value: Any, name: str, low: int, high: int) -> int:
    """``value`` as an int in ``[low, high]`` (a slider sends 3.0 for 3); else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    if int(value) != value or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
    return int(value)


def _low(param) -> int:
    """The smallest integer a registered param accepts."""
    if param.minimum is None:
        return 0
    return math.floor(param.minimum) + 1 if param.open_minimum else math.ceil(param.minimum)


def _reference_inits() -> list[str]:
    return [e.name for e in INITIALIZERS if "reference" in e.needs]


def validate_request(
    prompt: Any,
    annotation: Mapping | None,
    *,
    tokenizer=None,
    init: str = SALT_INIT,
    guidance: str = "salt",
    num_inference_steps: Any = DEFAULT_STEPS,
    guidance_scale: Any = 7.5,
    seed: Any = 0,
    inversion_steps: Any = None,
    compare: bool = False,
    use_canvas_as_reference: bool = False,
    object_steps: Any = None,
    background: str = BACKGROUND.default,
    noise_outside: Any = NOISE_OUTSIDE.default,
    scheduler: str = "ddim",
    outside_prompt_steps: Any = OUTSIDE_PROMPT_STEPS,
) -> DemoRequest:
    """Check a request from the page; ``ValueError`` (``LayoutError`` for the layout) names the bad value.

    ``init``, ``guidance`` and ``scheduler`` are registered names; ``inversion_steps`` (``None`` or
    :data:`INVERSION_STEPS_AUTO`: unset) and ``noise_outside`` go to the initializer when it has those params, ``object_steps``
    (``None`` or :data:`OBJECT_STEPS_AUTO`: unset) and ``background`` to the ``objects`` reference builder. ``outside_prompt_steps`` (default :data:`~saltdiff.guidance.OUTSIDE_PROMPT_STEPS`)
    goes to the guidance config; with guidance ``"none"`` it is dropped (plain sampling, 0 steps), as
    the SALT-only fields are under random init.
    With a ``tokenizer`` each boxed phrase must be found in the prompt as that model tokenizes it.
    ``use_canvas_as_reference`` makes the canvas image (an uploaded picture) the reference image
    (the ``image`` reference builder) instead of generated objects.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("the prompt is empty: describe the whole image, including the boxed phrases")
    prompt = prompt.strip()
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is too long ({len(prompt)} characters, at most {MAX_PROMPT_CHARS})")
    if not isinstance(init, str) or not isinstance(guidance, str):
        raise ValueError(f"init and guidance must be names, got {init!r} and {guidance!r}")
    INITIALIZERS.get(init)  # an unknown name lists the registered ones
    GUIDANCE_LOSSES.get(guidance)
    SCHEDULERS.get(scheduler)
    steps = _as_int(num_inference_steps, "steps", 1, MAX_STEPS)
    inv = None
    if inversion_steps is not None and inversion_steps != INVERSION_STEPS_AUTO:
        inv = _as_int(inversion_steps, "inversion steps", _low(INVERSION_STEPS), MAX_INVERSION_STEPS)
    seed = _as_int(seed, "seed", 0, MAX_SEED)
    if object_steps is not None and object_steps != OBJECT_STEPS_AUTO:
        object_steps = _as_int(object_steps, "object steps", _low(OBJECT_STEPS), MAX_STEPS)
    else:
        object_steps = None
    BACKGROUND.check(background, "reference builder 'objects'")
    if isinstance(noise_outside, numbers.Real) and not isinstance(noise_outside, bool):
        noise_outside = float(noise_outside)
    NOISE_OUTSIDE.check(noise_outside, "fresh noise outside the objects")
    outside_steps = _as_int(
        outside_prompt_steps,
        "outside_prompt_steps (steps that keep boxed objects out of the rest of the image)",
        0,
        MAX_OUTSIDE_PROMPT_STEPS,
    )
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

    # The page's fields → registered names and params (only those the chosen entry has).
    chosen = SALT_INIT if compare else init
    entry = INITIALIZERS.get(chosen)
    page_init = {NOISE_OUTSIDE.name: noise_outside}
    if inv is not None:
        page_init[INVERSION_STEPS.name] = inv
    init_params = {k: v for k, v in page_init.items() if k in entry.defaults()}
    uses_reference = entry.requires("reference", entry.resolve(init_params))
    if use_canvas_as_reference:
        if not uses_reference:
            names = " or ".join(repr(n) for n in _reference_inits())
            raise ValueError(f"the canvas image is used as a reference only by init {names}")
        reference, reference_params = "image", {"image": annotation_image(annotation)}  # type: ignore[arg-type]
    else:
        reference = "objects"
        reference_params = {BACKGROUND.name: background}
        if object_steps is not None:
            reference_params[OBJECT_STEPS.name] = object_steps
    generation = GenerationRequest(
        prompt=prompt,
        layout=layout,
        init=chosen,
        init_params=init_params,
        reference=reference,
        reference_params=reference_params if uses_reference else {},
        guidance=GuidanceConfig(
            loss=guidance, outside_prompt_steps=outside_steps if guidance != "none" else None
        ),
        num_inference_steps=steps,
        guidance_scale=float(guidance_scale),
        seed=seed,
        scheduler=scheduler,
    )
    return DemoRequest(generation, compare=bool(compare))


def family_controls(pipe) -> dict[str, Any]:
    """The page's control values a model's family decides (keys of the page's ``CONTROL_DEFAULTS``):
    its own sampler (:func:`saltdiff.samplers.default_sampler`: ddim, SD3 flow-euler) and the outside
    prompt's steps (``pipe.guidance_defaults``: 0 on FLUX; else
    :data:`~saltdiff.guidance.OUTSIDE_PROMPT_STEPS`; the page sends it set, so an SD3 run at CFG ≤ 1
    with it above 0 is refused in one line) and the CFG scale
    (:func:`saltdiff.loading.pipeline_guidance_scale`: 5 for the built-in models, else the family's
    pipeline default). The page starts with them and sets them again when another model is chosen."""
    from ..loading import pipeline_guidance_scale
    from ..samplers import default_sampler

    defaults = getattr(pipe, "guidance_defaults", {})
    outside = defaults.get("outside_prompt_steps")
    return {
        "scheduler": default_sampler(pipe.scheduler),
        "outside_prompt_steps": OUTSIDE_PROMPT_STEPS if outside is None else outside,
        "cfg": pipeline_guidance_scale(pipe),
    }


# -- one generation ---------------------------------------------------------------------------------


@dataclass
class RunOutput:
    """One pipeline run: its label (the initializer), the request it ran, the SaltOutput, its time."""

    init: str
    request: GenerationRequest
    output: Any
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


def display_image(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """``image`` upscaled (nearest neighbour, whole factor) to about ``size`` pixels wide."""
    scale = max(1, size // max(image.width, 1))
    image = image.convert("RGB")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def _loss_rows(runs: Sequence[RunOutput]) -> list[dict]:
    rows = []
    for run in runs:
        for step, value in enumerate(run.output.layout_losses):
            rows.append({"step": step, "loss": float(value), "series": f"{run.init} init: layout energy"})
        for step, values in enumerate(run.output.guidance_losses):
            if values:
                rows.append(
                    {"step": step, "loss": float(values[0]), "series": f"{run.init} init: guidance loss"}
                )
    return rows


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
    next denoising step (building SALT's reference objects is not interrupted). The image and its
    recipe (``model`` and the pipeline's dtype added) go to a PNG in ``out_dir`` (default: a fresh
    temporary folder).
    """
    planned = request.runs()
    steps = request.generation.num_inference_steps
    total = len(planned) * steps
    runs: list[RunOutput] = []
    start = time.perf_counter()
    for r, (label, generation) in enumerate(planned):
        # as the model's family runs it (a sampler or option it lacks: one line), then the values the
        # run leaves to the sampler: the recipe records what the run used
        generation = generation.for_pipeline(pipe).resolved(pipe.scheduler)

        def callback(_pipe, i, _t, kwargs, r=r, label=label):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled("generation cancelled")
            if on_step is not None:
                on_step(r * steps + i + 1, total, f"{label} init: step {i + 1}")
            return kwargs

        t0 = time.perf_counter()
        output = generation.run(
            pipe, return_attention_maps=True, callback_on_step_end=callback, progress=False
        )
        runs.append(RunOutput(label, generation, output, time.perf_counter() - t0))
    seconds = time.perf_counter() - start

    main = runs[-1]
    layout = main.request.layout
    image = main.output.images[0]
    scale = max(1, DISPLAY_SIZE // image.width)
    heatmaps = []
    maps = main.output.attention_maps
    if maps is not None:
        for k, (box, label) in enumerate(zip(layout, layout.labels)):
            heat = heatmap(maps[0, k], (image.width * scale, image.height * scale))
            heatmaps.append((draw_boxes(heat, Layout((box,)), labels=False), f"attention: {label}"))
    compare = [
        (draw_boxes(run.output.images[0], layout, scale=scale), f"{run.init} init, seed {run.request.seed}")
        for run in runs
    ]
    dtype = str(denoiser(pipe).dtype).replace("torch.", "")
    out_dir = out_dir or tempfile.mkdtemp(prefix="saltdiff-demo-")
    png_path = os.path.join(out_dir, f"saltdiff-{main.init}-seed{main.request.seed}.png")
    recipe = main.request.save_png(image, png_path, model=model, dtype=dtype)
    reference = main.output.reference_image
    return DemoResult(
        image=image,
        boxed=draw_boxes(image, layout, scale=scale),
        reference=display_image(reference) if reference is not None else None,
        heatmaps=heatmaps,
        losses=_loss_rows(runs),
        recipe=recipe,
        png_path=png_path,
        compare=compare,
        runs=runs,
        seconds=seconds,
    )


def user_message(exc: BaseException) -> str:
    """The one-line message a page shows for an exception from a request."""
    if isinstance(exc, GenerationCancelled):
        return "Generation cancelled."
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return str(exc)
    return f"generation failed: {type(exc).__name__}: {exc}"
