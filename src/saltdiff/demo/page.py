"""The Gradio page of ``saltdiff demo`` (the only module that imports gradio, inside :func:`build_app`).

The page's choices come from the registry: the initializer and guidance radio buttons list
:data:`~saltdiff.registry.INITIALIZERS` and :data:`~saltdiff.registry.GUIDANCE_LOSSES` with their
descriptions, and the SALT controls take their defaults, bounds and help from the registered params.
Its fields go to :func:`~saltdiff.demo.requests.validate_request`, which builds the same
:class:`~saltdiff.request.GenerationRequest` as ``saltdiff generate``. :func:`launch_kwargs` holds the
server's safety settings (no share link, upload size limit); generations are queued one at a time.
Needs the ``demo`` extra: ``pip install 'saltdiff[demo]'``. (No ``from __future__ import annotations``:
gradio finds the ``gr.Request`` and ``gr.Progress`` parameters of a handler by their annotations.)
"""

import logging
import re
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..colors import background_suggestions
from ..guidance import OUTSIDE_PROMPT_STEPS
from ..layout import Layout
from ..registry import GUIDANCE_LOSSES, INITIALIZERS, SCHEDULERS, Registry
from .models import ModelPool
from .requests import (
    BACKGROUND,
    DEFAULT_STEPS,
    INVERSION_STEPS,
    INVERSION_STEPS_AUTO,
    MAX_CFG,
    MAX_INVERSION_STEPS,
    MAX_OUTSIDE_PROMPT_STEPS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    NOISE_OUTSIDE,
    OBJECT_STEPS,
    OBJECT_STEPS_AUTO,
    RANDOM_INIT,
    SALT_INIT,
    GenerationCancelled,
    annotation_from_layout,
    display_image,
    example_thumbnail,
    family_controls,
    neutral_canvas,
    run_generation,
    user_message,
    validate_request,
)

logger = logging.getLogger(__name__)

#: Largest accepted upload (Gradio refuses bigger files before they reach the handlers).
MAX_UPLOAD = "10mb"

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

#: Initial values of the page's controls (``build_app(defaults=...)`` overrides some).
CONTROL_DEFAULTS = {
    "init": SALT_INIT,
    "guidance": "salt",
    "steps": DEFAULT_STEPS,
    "cfg": 7.5,
    "seed": 0,
    "inversion_steps": INVERSION_STEPS_AUTO,
    "compare": False,
    "object_steps": OBJECT_STEPS_AUTO,
    "background": BACKGROUND.default,
    "noise_outside": NOISE_OUTSIDE.default,
    "scheduler": "ddim",
    "outside_prompt_steps": OUTSIDE_PROMPT_STEPS,
}


def queue_settings() -> dict:
    """``Blocks.queue`` arguments: one generation at a time, a bounded waiting line."""
    return {"default_concurrency_limit": 1, "max_size": 16}


def launch_kwargs(host: str, port: int) -> dict:
    """``Blocks.launch`` arguments: no public share link, upload size limit, errors shown in the page.

    The safe defaults of ``host`` and ``port`` (loopback, 7860) are ``saltdiff demo``'s flags.
    """
    return {
        "server_name": host,
        "server_port": port,
        "share": False,
        "max_file_size": MAX_UPLOAD,
        "show_error": True,
        "inbrowser": False,
    }


#: The loss plot's legend title (each entry reads "<init> init: layout energy / guidance loss").
LOSS_LEGEND_TITLE = "curve"
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()<>#+!|~])")


def status_markdown(text: str, *, failed: bool = False) -> str:
    """The status line as Markdown: ``text`` shown literally (``inversion_steps`` keeps its
    underscores), prefixed with "Not generated:" when ``failed``."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", text)
    return f"**Not generated:** {escaped}" if failed else escaped


def registry_help(registry: Registry) -> str:
    """One line describing each registered name (the help under a radio button)."""
    return "; ".join(f"{e.name}: {e.description}" for e in registry)


def example_rows(defaults: Mapping[str, Any] = CONTROL_DEFAULTS) -> list[list]:
    """The page's examples as values of (canvas, prompt, init, guidance, compare)."""
    return [
        [
            annotation_from_layout(Layout.from_pairs(pairs)),
            text,
            defaults["init"],
            defaults["guidance"],
            False,
        ]
        for text, pairs in EXAMPLES
    ]


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

    ``defaults`` overrides initial control values (keys of :data:`CONTROL_DEFAULTS`; ``None``: unset).
    The sampler and the outside prompt's steps start as the model's family runs them
    (:func:`~saltdiff.demo.requests.family_controls`: SD3 flow-euler and 0) and follow the model
    chosen in the page.
    """
    import gradio as gr
    from gradio_image_annotation import image_annotator

    unknown = set(defaults or {}) - set(CONTROL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown control default(s) {sorted(unknown)}; valid: {sorted(CONTROL_DEFAULTS)}")
    pool = ModelPool(
        pipe_or_model, name=model_name, device=device, dtype=dtype, allow_model_paths=allow_model_paths
    )
    given = {k: v for k, v in (defaults or {}).items() if v is not None}
    d = {**CONTROL_DEFAULTS, **family_controls(pool.get(pool.default_name)), **given}
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
        noise_outside,
        scheduler,
        outside_prompt_steps,
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
                noise_outside=noise_outside,
                scheduler=scheduler,
                outside_prompt_steps=outside_prompt_steps,
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
            message = user_message(exc)
            # A toast and the status line; the outputs keep what they showed. (Raising gr.Error
            # marked every output component with a red "Error" badge besides the toast.)
            if isinstance(exc, GenerationCancelled):
                gr.Info(message)
            else:
                gr.Warning(message, title="Not generated")
            return (*[gr.skip()] * (len(outputs) - 1), status_markdown(message, failed=True))
        gen = req.generation
        inits = f"{RANDOM_INIT} vs {gen.init}" if req.compare else gen.init
        status = (
            f"Done in {result.seconds:.1f} s: {len(gen.layout)} box(es), init {inits}, "
            f"guidance {gen.guidance.loss}, {gen.num_inference_steps} steps, seed {gen.seed}."
        )
        return (
            display_image(result.image),
            result.boxed,
            result.reference,
            result.heatmaps,
            result.losses_frame(),
            gr.update(value=result.compare, visible=req.compare),
            result.png_path,
            status_markdown(status),
        )

    def model_changed(name):
        """The chosen model's sampler, outside-prompt steps and CFG scale (loading it, as Generate would)."""
        try:
            controls = family_controls(pool.get(name))
        except Exception as exc:
            if not isinstance(exc, (ValueError, TypeError, OSError)):
                logger.exception("loading model %r failed", name)
            gr.Warning(user_message(exc), title="Model not loaded")
            return gr.skip(), gr.skip(), gr.skip()
        return (
            gr.update(value=controls["scheduler"]),
            gr.update(value=controls["outside_prompt_steps"]),
            gr.update(value=controls["cfg"]),
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
                    placeholder=EXAMPLES[0][0],
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
                    init = gr.Radio(
                        list(INITIALIZERS.names()),
                        value=d["init"],
                        label="Initial latent",
                        info=registry_help(INITIALIZERS),
                        elem_id="init",
                    )
                    guidance = gr.Radio(
                        list(GUIDANCE_LOSSES.names()),
                        value=d["guidance"],
                        label="Guidance",
                        info=registry_help(GUIDANCE_LOSSES),
                        elem_id="guidance",
                    )
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=d["steps"], step=1, label="Steps", elem_id="steps")
                    cfg = gr.Slider(0, MAX_CFG, value=d["cfg"], step=0.5, label="CFG scale", elem_id="cfg")
                    scheduler = gr.Dropdown(
                        list(SCHEDULERS.names()),
                        value=d["scheduler"],
                        label="Sampler",
                        info="SALT's start is converted into the sampler's noise space",
                        elem_id="scheduler",
                    )
                    seed = gr.Number(
                        d["seed"], precision=0, minimum=0, maximum=MAX_SEED, label="Seed", elem_id="seed"
                    )
                    inv_steps = gr.Slider(
                        INVERSION_STEPS_AUTO,
                        MAX_INVERSION_STEPS,
                        value=d["inversion_steps"],
                        step=1,
                        label="Inversion steps (SALT)",
                        info=f"{INVERSION_STEPS_AUTO}: automatic. " + INVERSION_STEPS.help,
                        elem_id="inv-steps",
                    )
                noise_outside = gr.Slider(
                    NOISE_OUTSIDE.minimum or 0,
                    NOISE_OUTSIDE.maximum or 1,
                    value=d["noise_outside"],
                    step=0.05,
                    label="Fresh noise outside the objects (SALT)",
                    info="1: the prompt's background and the seed decide everything outside the objects; "
                    "0: the reference is copied (same picture for every seed)",
                    elem_id="noise-outside",
                )
                outside_prompt_steps = gr.Slider(
                    0,
                    MAX_OUTSIDE_PROMPT_STEPS,
                    value=d["outside_prompt_steps"],
                    step=1,
                    label="Steps that keep boxed objects out of the rest of the image",
                    info="for the first N steps the area outside the boxes gets its own text condition. "
                    "More steps: fewer copies of the boxed objects outside their boxes, but unboxed "
                    "objects that share a colour or shape word with a boxed one can be suppressed; "
                    "costs a third batch row on those steps. Does nothing with guidance 'none'",
                    elem_id="outside-prompt-steps",
                )
                compare = gr.Checkbox(
                    label=f"Compare: {RANDOM_INIT} init vs SALT, same seed",
                    value=d["compare"],
                    elem_id="compare",
                )
                with gr.Accordion("Reference objects (SALT)", open=False):
                    with gr.Row():
                        background = gr.Dropdown(
                            background_suggestions(),
                            value=d["background"],
                            allow_custom_value=True,
                            label="Reference background (or type a colour name or #rrggbb)",
                            info=BACKGROUND.help,
                            elem_id="background",
                        )
                        object_steps = gr.Slider(
                            OBJECT_STEPS_AUTO,
                            MAX_STEPS,
                            value=d["object_steps"],
                            step=1,
                            label="Steps per generated object",
                            info=f"{OBJECT_STEPS_AUTO}: automatic. " + OBJECT_STEPS.help,
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
                    label=f"{RANDOM_INIT.capitalize()} init vs SALT",
                    columns=2,
                    visible=False,
                    elem_id="compare-gallery",
                )
                heat_gallery = gr.Gallery(
                    label="Attention per phrase", columns=4, height=220, elem_id="heatmaps"
                )
                loss_plot = gr.LinePlot(
                    x="step",
                    y="loss",
                    color="series",
                    x_title="denoising step",
                    y_title="loss",
                    color_title=LOSS_LEGEND_TITLE,  # not the frame's column name
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
            noise_outside,
            scheduler,
            outside_prompt_steps,
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
        model.change(
            model_changed,
            model,
            [scheduler, outside_prompt_steps, cfg],
            concurrency_limit=1,
            concurrency_id="generate",  # loads a model: not beside a generation
            api_name=False,
        )
        annotator.upload(lambda: True, None, use_reference, queue=False, api_name=False)
        # Example thumbnails show each layout's boxes (the component's own shows its image alone).
        plain_example = annotator.process_example
        annotator.process_example = lambda value: plain_example(value and example_thumbnail(value))
        gr.Examples(
            examples=example_rows(),
            inputs=[annotator, prompt, init, guidance, compare],
            label="Examples (click one, then Generate)",
        )
    demo.queue(**queue_settings())
    demo.saltdiff_pool = pool  # for tests and callers that want the pipelines
    return demo
