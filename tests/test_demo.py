"""The demo's request handling without a browser: layout parsing, validation, queueing, generation."""

import numpy as np
import pytest
from PIL import Image

from saltdiff.demo import (
    CANVAS_SIZE,
    MAX_BOXES,
    DemoRequest,
    GenerationCancelled,
    annotation_from_layout,
    check_model_choice,
    launch_kwargs,
    layout_from_annotation,
    neutral_canvas,
    queue_settings,
    run_generation,
    validate_request,
)
from saltdiff.layout import Layout, LayoutError
from saltdiff.viz import read_recipe

PROMPT = "a red circle and a blue square on a white background"
# Cheap settings for the tiny pipeline.
FAST = {"num_inference_steps": 2, "inversion_steps": 2, "object_steps": 1, "background": "gray"}


def annotation(*boxes, size=(CANVAS_SIZE, CANVAS_SIZE)):
    image = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    return {
        "image": image,
        "boxes": [
            {"label": label, "xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3], "color": (0, 0, 0)}
            for label, b in boxes
        ],
        "orientation": 0,
    }


def two_boxes():
    return annotation(("red circle", (32, 128, 224, 384)), ("blue square", (288, 128, 480, 384)))


# -- annotation → layout ----------------------------------------------------------------------------


def test_layout_from_annotation_normalizes_pixels_by_the_image_size():
    layout = layout_from_annotation(two_boxes())
    assert layout.phrases == ["red circle", "blue square"]
    assert layout[0].box == pytest.approx((0.0625, 0.25, 0.4375, 0.75))
    assert layout[1].box == pytest.approx((0.5625, 0.25, 0.9375, 0.75))


def test_layout_from_annotation_uses_a_non_square_upload_and_explicit_sizes():
    value = annotation(("dog", (100, 50, 300, 150)), size=(400, 200))
    assert layout_from_annotation(value)[0].box == pytest.approx((0.25, 0.25, 0.75, 0.75))
    assert layout_from_annotation(value, 800, 400)[0].box == pytest.approx((0.125, 0.125, 0.375, 0.375))


def test_layout_from_annotation_reads_occurrences_and_clips_small_overshoot():
    value = annotation(("dog#2", (-1, 0, 256, 513)), size=(512, 512))
    box = layout_from_annotation(value)[0]
    assert (box.phrase, box.occurrence) == ("dog", 1)
    assert box.box == pytest.approx((0.0, 0.0, 0.5, 1.0))


@pytest.mark.parametrize(
    "boxes, message",
    [
        ([("", (10, 10, 100, 100))], "has no phrase"),
        ([("dog#0", (10, 10, 100, 100))], "phrase#N"),
        ([("dog", (10, 10, 10, 100))], "zero area"),
        ([("dog", (10, 10, 100, 10))], "zero area"),
        ([("dog", (10, 10, 900, 100))], "outside"),
        ([("dog", (10, float("nan"), 100, 100))], "ymin"),
        ([("dog", (10, 10, 100, 100))] * (MAX_BOXES + 1), f"at most {MAX_BOXES}"),
    ],
)
def test_layout_from_annotation_refuses_bad_boxes(boxes, message):
    with pytest.raises(LayoutError, match=message):
        layout_from_annotation(annotation(*boxes))


def test_layout_from_annotation_refuses_missing_image_and_rotation():
    with pytest.raises(ValueError, match="no image"):
        layout_from_annotation(None)
    with pytest.raises(ValueError, match="rotated"):
        layout_from_annotation({**two_boxes(), "orientation": 1})


def test_annotation_from_layout_round_trips():
    layout = Layout.from_pairs([("red circle", (0.25, 0.25, 0.5, 0.75))])
    value = annotation_from_layout(layout)
    assert value["image"].shape == (CANVAS_SIZE, CANVAS_SIZE, 3)
    assert layout_from_annotation(value) == layout
    assert neutral_canvas().size == (CANVAS_SIZE, CANVAS_SIZE)


# -- validation -------------------------------------------------------------------------------------


def test_validate_request_accepts_a_good_request(tiny_pipe):
    req = validate_request(PROMPT, two_boxes(), tokenizer=tiny_pipe.tokenizer, seed=3.0, guidance_scale=5)
    assert isinstance(req, DemoRequest)
    assert (req.seed, req.guidance_scale, req.reference_image) == (3, 5.0, None)
    assert req.layout.phrases == ["red circle", "blue square"]


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"prompt": "  "}, ValueError, "prompt is empty"),
        ({"prompt": "a red circle"}, LayoutError, "blue square"),
        ({"prompt": "x" * 1000}, ValueError, "too long"),
        ({"init": "zeros"}, ValueError, "init must be one of"),
        ({"guidance": "magic"}, ValueError, "guidance must be one of"),
        ({"num_inference_steps": 0}, ValueError, "steps must be an integer"),
        ({"num_inference_steps": 2.5}, ValueError, "steps must be an integer"),
        ({"inversion_steps": 1000}, ValueError, "inversion steps"),
        ({"seed": -1}, ValueError, "seed"),
        ({"guidance_scale": float("inf")}, ValueError, "CFG scale"),
        ({"object_steps": 0}, ValueError, "object steps"),
        ({"background": "plaid"}, ValueError, "reference background"),
        ({"annotation": annotation()}, LayoutError, "at least one box"),
        ({"annotation": annotation(("dog", (1, 1, 2, 2)), size=(5000, 10))}, ValueError, "at most 4096"),
        ({"use_canvas_as_reference": True, "init": "random"}, ValueError, "only by init 'salt'"),
    ],
)
def test_validate_request_names_the_bad_value(tiny_pipe, change, error, message):
    kwargs = {"prompt": PROMPT, "annotation": two_boxes(), "tokenizer": tiny_pipe.tokenizer, **change}
    with pytest.raises(error, match=message):
        validate_request(kwargs.pop("prompt"), kwargs.pop("annotation"), **kwargs)


def test_validate_request_takes_the_canvas_as_reference():
    req = validate_request(PROMPT, two_boxes(), use_canvas_as_reference=True)
    assert isinstance(req.reference_image, Image.Image)
    assert req.reference_image.size == (CANVAS_SIZE, CANVAS_SIZE)


def test_model_paths_typed_in_the_page_are_refused_unless_allowed():
    served = ["builtin:shapes"]
    assert check_model_choice("builtin:shapes", served, allow_model_paths=False) == "builtin:shapes"
    with pytest.raises(ValueError, match="--allow-model-paths"):
        check_model_choice("/etc", served, allow_model_paths=False)
    assert check_model_choice("/some/folder", served, allow_model_paths=True) == "/some/folder"
    with pytest.raises(ValueError, match="choose a model"):
        check_model_choice("", served, allow_model_paths=True)


def test_server_settings_are_local_queued_and_bounded():
    kwargs = launch_kwargs()
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["server_port"] == 7860
    assert kwargs["share"] is False and kwargs["max_file_size"]
    assert queue_settings()["default_concurrency_limit"] == 1


# -- generation -------------------------------------------------------------------------------------


def test_run_generation_compare_returns_everything_the_page_shows(tiny_pipe, tmp_path):
    req = validate_request(PROMPT, two_boxes(), tokenizer=tiny_pipe.tokenizer, compare=True, **FAST)
    steps = []
    result = run_generation(
        tiny_pipe, req, model="tiny", on_step=lambda *a: steps.append(a), out_dir=str(tmp_path)
    )
    assert [run.init for run in result.runs] == ["random", "salt"]
    assert [s[:2] for s in steps] == [(i, 4) for i in range(1, 5)]
    assert result.image.size == (32, 32) and result.reference is not None
    assert [caption for _, caption in result.heatmaps] == ["attention: red circle", "attention: blue square"]
    assert len(result.compare) == 2
    series = {row["series"] for row in result.losses}
    assert series >= {"random init: layout energy", "salt init: layout energy", "salt init: guidance loss"}
    assert sum(row["series"] == "salt init: layout energy" for row in result.losses) == 2
    recipe = read_recipe(result.png_path)
    # The same keys as `saltdiff generate` writes.
    assert set(recipe) == {
        "saltdiff_version", "prompt", "negative_prompt", "layout", "model", "seed", "steps", "cfg",
        "height", "width", "init", "init_config", "guidance", "dtype",
    }  # fmt: skip
    assert recipe["init"] == "salt" and recipe["model"] == "tiny" and recipe["steps"] == 2
    assert Layout.from_dict(recipe["layout"]) == req.layout


def test_run_generation_cancel_stops_the_run(tiny_pipe, tmp_path):
    req = validate_request(PROMPT, two_boxes(), tokenizer=tiny_pipe.tokenizer, init="random", **FAST)
    with pytest.raises(GenerationCancelled):
        run_generation(tiny_pipe, req, should_cancel=lambda: True, out_dir=str(tmp_path))


# -- the app (no server, no browser) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_pipe):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_image_annotation")
    from saltdiff.demo import build_app

    return build_app(tiny_pipe, model_name="tiny")


def _generate_fn(app):
    fns = app.fns.values() if isinstance(app.fns, dict) else app.fns
    return next(f for f in fns if f.api_name == "generate")


def test_app_queues_one_generation_at_a_time(app):
    fn = _generate_fn(app)
    assert fn.concurrency_limit == 1
    assert fn.queue is not False
    assert app.saltdiff_pool.choices[0] == "tiny"


def test_app_handler_turns_bad_input_into_a_page_error(app):
    import gradio as gr

    fn = _generate_fn(app).fn
    args = ["tiny", "a red circle", two_boxes(), False, "salt", "salt", 2, 7.5, 0, 2, False, 1, "gray"]
    with pytest.raises(gr.Error, match="blue square"):
        fn(*args, request=None, progress=lambda *a, **k: None)
    args[0] = "/etc/passwd"
    with pytest.raises(gr.Error, match="allow-model-paths"):
        fn(*args, request=None, progress=lambda *a, **k: None)
    args[0], args[1] = "tiny", PROMPT
    outputs = fn(*args, request=None, progress=lambda *a, **k: None)
    assert outputs[0].size == (256, 256)  # the 32x32 result, upscaled for display
    assert outputs[-1].startswith("Done in")
    assert read_recipe(outputs[6])["prompt"] == PROMPT


def test_demo_command_is_registered_with_safe_defaults():
    from saltdiff.cli import build_parser
    from saltdiff.demo import cmd_demo

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.allow_model_paths, args.model) == (
        "127.0.0.1",
        7860,
        False,
        "builtin:shapes",
    )
    assert args.func is cmd_demo
