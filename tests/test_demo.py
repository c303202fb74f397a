"""The demo's request handling without a browser: layout parsing, validation, queueing, generation."""

import numpy as np
import pytest
from PIL import Image

from saltdiff.colors import background_suggestions
from saltdiff.demo.cli import DEFAULT_HOST, DEFAULT_PORT
from saltdiff.demo.models import check_model_choice
from saltdiff.demo.page import CONTROL_DEFAULTS, example_rows, launch_kwargs, queue_settings
from saltdiff.demo.requests import (
    BACKGROUND,
    CANVAS_SIZE,
    INVERSION_STEPS,
    MAX_BOXES,
    OBJECT_STEPS,
    DemoRequest,
    GenerationCancelled,
    annotation_from_layout,
    layout_from_annotation,
    neutral_canvas,
    run_generation,
    validate_request,
)
from saltdiff.guidance import OUTSIDE_PROMPT_STEPS, GuidanceConfig
from saltdiff.layout import Layout, LayoutError
from saltdiff.registry import GUIDANCE_LOSSES, INITIALIZERS, REFERENCE_BUILDERS, SCHEDULERS
from saltdiff.request import GenerationRequest, read_recipe

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
    assert isinstance(req, DemoRequest) and isinstance(req.generation, GenerationRequest)
    gen = req.generation
    assert (gen.seed, gen.guidance_scale, req.reference_image) == (3, 5.0, None)
    assert isinstance(gen.seed, int)
    assert gen.layout.phrases == ["red circle", "blue square"]
    assert [label for label, _ in req.runs()] == ["salt"]


def test_validate_request_maps_the_page_fields_onto_the_generation_request():
    req = validate_request(
        PROMPT,
        two_boxes(),
        init="salt",
        guidance="boxdiff",
        num_inference_steps=12.0,
        guidance_scale=6.5,
        seed=7,
        inversion_steps=3,
        object_steps=4,
        background="gray",
    )
    assert req.generation == GenerationRequest(
        prompt=PROMPT,
        layout=layout_from_annotation(two_boxes()),
        init="salt",
        init_params={"inversion_steps": 3, "noise_outside": 1.0},
        reference="objects",
        reference_params={"background": "gray", "num_inference_steps": 4},
        guidance=GuidanceConfig(loss="boxdiff", outside_prompt_steps=OUTSIDE_PROMPT_STEPS),
        num_inference_steps=12,
        guidance_scale=6.5,
        seed=7,
    )
    # Random init takes no initializer or reference params.
    random = validate_request(PROMPT, two_boxes(), init="random", inversion_steps=3).generation
    assert (random.init, dict(random.init_params), dict(random.reference_params)) == ("random", {}, {})


def test_validate_request_compare_runs_random_then_salt_with_the_same_seed():
    req = validate_request(PROMPT, two_boxes(), init="random", compare=True, seed=5, inversion_steps=2)
    (first, baseline), (second, salt) = req.runs()
    assert (first, second) == ("random", "salt")
    assert salt is req.generation and dict(salt.init_params) == {"inversion_steps": 2, "noise_outside": 1.0}
    assert (baseline.init, dict(baseline.init_params), dict(baseline.reference_params)) == ("random", {}, {})
    assert baseline.seed == salt.seed == 5 and baseline.layout == salt.layout


def test_the_page_defaults_and_choices_come_from_the_registry():
    # the page's "automatic" inversion depth is the registry's unset default (it follows the steps)
    assert INITIALIZERS.get("salt").param("inversion_steps").default is None
    auto = validate_request(PROMPT, two_boxes(), inversion_steps=CONTROL_DEFAULTS["inversion_steps"])
    assert "inversion_steps" not in auto.generation.init_params
    objects = REFERENCE_BUILDERS.get("objects")
    # likewise the object steps (the model family's: 25, flow models 10)
    assert objects.param("num_inference_steps").default is None
    auto = validate_request(PROMPT, two_boxes(), object_steps=CONTROL_DEFAULTS["object_steps"])
    assert "num_inference_steps" not in auto.generation.reference_params
    chosen = validate_request(PROMPT, two_boxes(), object_steps=7)
    assert chosen.generation.reference_params["num_inference_steps"] == 7
    assert CONTROL_DEFAULTS["background"] == objects.param("background").default
    assert BACKGROUND is objects.param("background")
    assert INVERSION_STEPS is INITIALIZERS.get("salt").param("inversion_steps")
    assert OBJECT_STEPS is objects.param("num_inference_steps")
    assert CONTROL_DEFAULTS["init"] in INITIALIZERS and CONTROL_DEFAULTS["guidance"] in GUIDANCE_LOSSES
    rows = example_rows()
    assert all(row[2] in INITIALIZERS and row[3] in GUIDANCE_LOSSES for row in rows)
    for value, prompt, *_ in rows:  # each example's boxed phrases are words of its prompt
        assert all(phrase in prompt for phrase in layout_from_annotation(value).phrases)


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"prompt": "  "}, ValueError, "prompt is empty"),
        ({"prompt": "a red circle"}, LayoutError, "blue square"),
        ({"prompt": "x" * 1000}, ValueError, "too long"),
        ({"init": "zeros"}, ValueError, "unknown initializer 'zeros'"),
        ({"guidance": "magic"}, ValueError, "unknown guidance loss 'magic'"),
        ({"num_inference_steps": 0}, ValueError, "steps must be an integer"),
        ({"num_inference_steps": 2.5}, ValueError, "steps must be an integer"),
        ({"inversion_steps": 1000}, ValueError, "inversion steps"),
        ({"inversion_steps": -1}, ValueError, "inversion steps"),
        ({"inversion_steps": 2.5}, ValueError, "inversion steps"),
        ({"seed": -1}, ValueError, "seed"),
        ({"guidance_scale": float("inf")}, ValueError, "CFG scale"),
        ({"object_steps": -1}, ValueError, "object steps"),
        ({"background": "plaid"}, ValueError, "background must be generated, prompt-color, .* got 'plaid'"),
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
    assert req.generation.reference == "image"
    assert isinstance(req.reference_image, Image.Image)
    assert req.reference_image.size == (CANVAS_SIZE, CANVAS_SIZE)
    # Compare keeps the canvas for the SALT run; the random run has no reference.
    req = validate_request(PROMPT, two_boxes(), init="random", compare=True, use_canvas_as_reference=True)
    (_, baseline), (_, salt) = req.runs()
    assert salt.reference == "image" and not baseline.uses_reference


def test_model_paths_typed_in_the_page_are_refused_unless_allowed():
    served = ["builtin:shapes"]
    assert check_model_choice("builtin:shapes", served, allow_model_paths=False) == "builtin:shapes"
    with pytest.raises(ValueError, match="--allow-model-paths"):
        check_model_choice("/etc", served, allow_model_paths=False)
    assert check_model_choice("/some/folder", served, allow_model_paths=True) == "/some/folder"
    with pytest.raises(ValueError, match="choose a model"):
        check_model_choice("", served, allow_model_paths=True)


class _FakePipe:
    def __init__(self, name):
        self.name = name

    def set_progress_bar_config(self, **kwargs):
        self.bars = kwargs


def test_model_pool_loads_through_the_library_and_keeps_one_extra_model(monkeypatch):
    import saltdiff.demo.models as models

    loaded = []

    def fake_load(name, *, device=None, dtype=None):
        loaded.append((name, device, dtype))
        return _FakePipe(name)

    monkeypatch.setattr(models, "load_pipeline", fake_load)
    pool = models.ModelPool("builtin:shapes", device="cpu", dtype="float32", allow_model_paths=True)
    assert pool.choices[0] == "builtin:shapes" and pool.get("builtin:shapes").bars == {"disable": True}
    pool.get("/models/a")
    pool.get("/models/b")
    assert loaded == [(n, "cpu", "float32") for n in ("builtin:shapes", "/models/a", "/models/b")]
    assert set(pool._pipes) == {"builtin:shapes", "/models/b"}
    closed = models.ModelPool("builtin:shapes")
    with pytest.raises(ValueError, match="--allow-model-paths"):
        closed.get("/models/a")


def test_model_pool_reports_an_unloadable_model_in_one_line(tiny_pipe):
    from saltdiff.demo.models import ModelPool
    from saltdiff.loading import ModelLoadError

    pool = ModelPool(tiny_pipe, name="tiny", allow_model_paths=True)
    with pytest.raises(ModelLoadError, match="does not exist"):
        pool.get("./no-such-model-folder")
    assert pool.get("tiny") is tiny_pipe


def test_server_settings_are_local_queued_and_bounded():
    assert (DEFAULT_HOST, DEFAULT_PORT) == ("127.0.0.1", 7860)
    kwargs = launch_kwargs(DEFAULT_HOST, DEFAULT_PORT)
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
    assert recipe == result.recipe
    # The recipe `saltdiff generate` writes: GenerationRequest.save_png with the model and dtype, and
    # the values its model used for the unset params (feather, object steps).
    resolved = req.generation.resolved(tiny_pipe.scheduler)
    assert recipe == resolved.recipe(height=32, width=32, model="tiny", dtype="float32")
    assert recipe["init"] == "salt" and recipe["model"] == "tiny" and recipe["steps"] == 2
    assert recipe["reference_params"]["background"] == "gray"
    assert Layout.from_dict(recipe["layout"]) == req.generation.layout
    again = GenerationRequest.from_png(result.png_path)
    assert again.recipe(model="tiny", dtype="float32") == recipe


def test_run_generation_with_the_canvas_as_reference(tiny_pipe, tmp_path):
    req = validate_request(
        PROMPT, two_boxes(), tokenizer=tiny_pipe.tokenizer, use_canvas_as_reference=True, **FAST
    )
    result = run_generation(tiny_pipe, req, model="tiny", out_dir=str(tmp_path))
    assert result.reference is not None and [run.init for run in result.runs] == ["salt"]
    recipe = read_recipe(result.png_path)
    assert recipe["reference"] == "image"
    assert recipe["reference_params"] == {"image": f"<image {CANVAS_SIZE}x{CANVAS_SIZE}>"}


def test_run_generation_cancel_stops_the_run(tiny_pipe, tmp_path):
    req = validate_request(PROMPT, two_boxes(), tokenizer=tiny_pipe.tokenizer, init="random", **FAST)
    with pytest.raises(GenerationCancelled):
        run_generation(tiny_pipe, req, should_cancel=lambda: True, out_dir=str(tmp_path))


# -- the app (no server, no browser) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def app(tiny_pipe):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_image_annotation")
    from saltdiff.demo.page import build_app

    return build_app(tiny_pipe, model_name="tiny")


def _generate_fn(app):
    fns = app.fns.values() if isinstance(app.fns, dict) else app.fns
    return next(f for f in fns if f.api_name == "generate")


def test_app_handlers_get_the_request_and_progress_from_gradio(tiny_pipe):
    """gradio injects ``gr.Request``/``gr.Progress`` by the handler's real annotations (not strings)."""
    import warnings

    pytest.importorskip("gradio")
    pytest.importorskip("gradio_image_annotation")
    from saltdiff.demo.page import build_app

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_app(tiny_pipe, model_name="tiny")
    assert not [w for w in caught if "arguments for function" in str(w.message)]


def test_app_queues_one_generation_at_a_time(app):
    fn = _generate_fn(app)
    assert fn.concurrency_limit == 1
    assert fn.queue is not False
    assert app.saltdiff_pool.choices[0] == "tiny"


def test_app_handler_turns_bad_input_into_a_page_error(app):
    import gradio as gr

    fn = _generate_fn(app).fn
    args = [
        "tiny",
        "a red circle",
        two_boxes(),
        False,
        "salt",
        "salt",
        2,
        7.5,
        0,
        2,
        False,
        1,
        "gray",
        0.5,
        "euler",
        3,
    ]
    # a toast and the status line; the outputs are left as they were (no red "Error" badge on each)
    with pytest.warns(UserWarning, match="blue square"):
        outputs = fn(*args, request=None, progress=lambda *a, **k: None)
    assert all(isinstance(o, type(gr.skip())) and o == gr.skip() for o in outputs[:-1])
    assert outputs[-1].startswith("**Not generated:**") and "phrase 'blue square' not found" in outputs[-1]
    args[0] = "/etc/passwd"
    with pytest.warns(UserWarning, match="allow-model-paths"):
        outputs = fn(*args, request=None, progress=lambda *a, **k: None)
    assert "allow-model-paths" in outputs[-1]
    args[0], args[1] = "tiny", PROMPT
    outputs = fn(*args, request=None, progress=lambda *a, **k: None)
    assert outputs[0].size == (256, 256)  # the 32x32 result, upscaled for display
    assert outputs[-1].startswith("Done in") and "init salt" in outputs[-1]
    assert read_recipe(outputs[6])["prompt"] == PROMPT
    assert read_recipe(outputs[6])["scheduler"] == "euler"  # the page's sampler reaches the request
    assert read_recipe(outputs[6])["guidance"]["outside_prompt_steps"] == 3  # and the outside prompt's steps
    args[10] = True  # compare: random vs salt, shown in the gallery
    outputs = fn(*args, request=None, progress=lambda *a, **k: None)
    assert outputs[5]["visible"] is True and len(outputs[5]["value"]) == 2
    assert "init random vs salt" in outputs[-1]


def test_app_lists_the_registered_names(app):
    radios = {c.elem_id: c for c in app.blocks.values() if getattr(c, "elem_id", None)}
    assert [v for _, v in radios["init"].choices] == list(INITIALIZERS.names())
    assert [v for _, v in radios["guidance"].choices] == list(GUIDANCE_LOSSES.names())
    assert [v for _, v in radios["scheduler"].choices] == list(SCHEDULERS.names())
    assert [v for _, v in radios["background"].choices] == background_suggestions()
    assert radios["background"].allow_custom_value  # any colour name or #rrggbb can be typed
    assert "spatial-aware init" in radios["init"].info


def test_demo_command_is_registered_with_safe_defaults():
    from saltdiff.cli import build_parser
    from saltdiff.demo.cli import cmd_demo

    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.allow_model_paths, args.model) == (
        "127.0.0.1",
        7860,
        False,
        "builtin:shapes",
    )
    assert args.func is cmd_demo


def test_fresh_noise_outside_reaches_the_initializer_and_is_checked():
    req = validate_request(PROMPT, two_boxes(), noise_outside=0.25)
    assert req.generation.init_params["noise_outside"] == 0.25
    assert (
        validate_request(PROMPT, two_boxes(), init="random", noise_outside=0.25).generation.init_params == {}
    )
    with pytest.raises(ValueError, match=r"noise_outside must be a number in \[0, 1\], got 1.5"):
        validate_request(PROMPT, two_boxes(), noise_outside=1.5)


def test_outside_prompt_steps_reach_the_guidance_and_default_to_the_library_default():
    req = validate_request(PROMPT, two_boxes(), outside_prompt_steps=4.0)  # a slider sends floats
    steps = req.generation.guidance.outside_prompt_steps
    assert steps == 4 and isinstance(steps, int)
    assert (
        validate_request(PROMPT, two_boxes(), outside_prompt_steps=0).generation.guidance.outside_steps == 0
    )
    default = validate_request(PROMPT, two_boxes()).generation.guidance
    assert default.outside_prompt_steps == default.outside_steps == OUTSIDE_PROMPT_STEPS
    assert CONTROL_DEFAULTS["outside_prompt_steps"] == OUTSIDE_PROMPT_STEPS
    # Compare runs both starts with the same outside prompt.
    req = validate_request(PROMPT, two_boxes(), compare=True, outside_prompt_steps=7)
    assert [r.guidance.outside_prompt_steps for _, r in req.runs()] == [7, 7]
    # With guidance 'none' the slider does nothing: plain sampling, recorded as 0 steps.
    plain = validate_request(PROMPT, two_boxes(), guidance="none", outside_prompt_steps=12).generation
    assert plain.guidance.outside_steps == 0
    assert plain.recipe()["guidance"]["outside_prompt_steps"] == 0


@pytest.mark.parametrize("value", [-1, 26, 2.5, True, "3", None, float("nan")])
def test_bad_outside_prompt_steps_give_one_line_naming_the_field(value):
    with pytest.raises(ValueError, match=r"outside_prompt_steps .* must be an integer in \[0, 25\]") as info:
        validate_request(PROMPT, two_boxes(), outside_prompt_steps=value)
    assert "\n" not in str(info.value)


def test_the_page_has_an_outside_prompt_steps_slider_with_the_library_default(app):
    from saltdiff.demo.requests import MAX_INVERSION_STEPS

    controls = {c.elem_id: c for c in app.blocks.values() if getattr(c, "elem_id", None)}
    slider = controls["outside-prompt-steps"]
    assert (slider.minimum, slider.maximum, slider.step, slider.value) == (0, 25, 1, OUTSIDE_PROMPT_STEPS)
    assert "third batch row" in slider.info and "'none'" in slider.info
    assert controls["inv-steps"].maximum == MAX_INVERSION_STEPS


def test_the_outside_prompt_steps_reach_the_png_recipe(tiny_pipe, tmp_path):
    req = validate_request(PROMPT, two_boxes(), tokenizer=tiny_pipe.tokenizer, outside_prompt_steps=1, **FAST)
    result = run_generation(tiny_pipe, req, model="tiny", out_dir=str(tmp_path))
    assert read_recipe(result.png_path)["guidance"]["outside_prompt_steps"] == 1
    assert GenerationRequest.from_png(result.png_path).guidance.outside_steps == 1


def test_the_page_takes_any_colour_as_the_reference_background():
    for colour in ("beige", "dark gray", "#336699"):
        req = validate_request(PROMPT, two_boxes(), background=colour)
        assert req.generation.reference_params["background"] == colour


def test_a_repeated_phrase_is_labelled_apart_on_the_canvas():
    layout = Layout.from_pairs(
        [("red circle", (0.05, 0.3, 0.45, 0.7)), ("red circle", (0.55, 0.3, 0.95, 0.7))]
    )
    value = annotation_from_layout(layout)
    assert [b["label"] for b in value["boxes"]] == ["red circle", "red circle#2"]
    assert layout_from_annotation(value).labels == ["red circle", "red circle#2"]


def test_run_generation_captions_a_repeated_phrase_apart(tiny_pipe, tmp_path):
    value = annotation(("red circle", (32, 128, 224, 384)), ("red circle#2", (288, 128, 480, 384)))
    req = validate_request(
        "a red circle and a red circle", value, tokenizer=tiny_pipe.tokenizer, init="random", **FAST
    )
    result = run_generation(tiny_pipe, req, model="tiny", out_dir=str(tmp_path))
    assert [caption for _, caption in result.heatmaps] == ["attention: red circle", "attention: red circle#2"]


def test_example_thumbnail_draws_the_layout_into_the_canvas():
    from saltdiff.demo.requests import CANVAS_COLOR, example_thumbnail
    from saltdiff.viz import PALETTE

    value = example_rows()[0][0]
    thumb = np.asarray(example_thumbnail(value)["image"])
    colours = {tuple(int(v) for v in c) for c in thumb.reshape(-1, 3)}
    assert PALETTE[0] in colours and PALETTE[1] in colours
    assert tuple(thumb[4, 4]) == CANVAS_COLOR  # outside the boxes: the plain canvas
    assert PALETTE[0] not in {tuple(int(v) for v in c) for c in np.asarray(value["image"]).reshape(-1, 3)}


def test_example_rows_show_their_boxes_in_the_page(app):
    from gradio.components import Dataset

    from saltdiff.viz import PALETTE

    dataset = next(c for c in app.blocks.values() if isinstance(c, Dataset))
    for sample in dataset.samples:
        thumb = sample[0]
        path = thumb["path"] if isinstance(thumb, dict) else thumb.path
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
        near_box_colour = np.abs(pixels - np.array(PALETTE[0])).max(axis=1) < 24  # stored as lossy webp
        assert near_box_colour.sum() > 500  # every example draws its first box (the canvas has none)


def test_the_page_starts_with_the_benchmarks_steps():
    # DEFAULT_STEPS promises the steps of `saltdiff bench` and of the README's benchmark table
    import re
    from pathlib import Path

    from saltdiff.cli import build_parser

    bench = build_parser().parse_args(["bench", "--suite", "shapes", "--out", "x"])
    assert CONTROL_DEFAULTS["steps"] == bench.steps
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    table = re.search(r"N = 200 layouts × 2 seeds[^\n]*?, (\d+) steps", readme)
    assert table is not None and int(table.group(1)) == CONTROL_DEFAULTS["steps"]


def test_the_demo_log_drops_gradios_debug_lines_and_keeps_the_rest():
    import io

    from saltdiff.demo.cli import GradioDebugFilter

    out = io.StringIO()
    stream = GradioDebugFilter(out)
    print("* Running on local URL:  http://127.0.0.1:7860", file=stream)
    print("id=2417001, environment=client, type=index.js, file_name=index.js", file=stream)
    print("id=2417001, environment=server, type=style.css, file_name=style.css", file=stream)
    print("saltdiff: wrote x.png", file=stream)
    stream.write("50%|█████")  # a progress bar's partial line goes out at once
    assert (
        out.getvalue() == "* Running on local URL:  http://127.0.0.1:7860\nsaltdiff: wrote x.png\n50%|█████"
    )


def test_gradio_still_prints_the_line_the_demo_filters():
    pytest.importorskip("gradio")
    import inspect

    import gradio.routes

    assert "environment={environment}, type={type}, file_name={file_name}" in inspect.getsource(gradio.routes)


def test_the_sampler_is_a_registered_name_and_the_demo_flag_sets_the_page_default(tiny_pipe):
    assert validate_request(PROMPT, two_boxes(), scheduler="heun").generation.scheduler == "heun"
    with pytest.raises(ValueError, match="unknown scheduler 'dpm3'"):
        validate_request(PROMPT, two_boxes(), scheduler="dpm3")
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_image_annotation")
    from saltdiff.cli import build_parser
    from saltdiff.demo.page import build_app

    args = build_parser().parse_args(["demo", "--scheduler", "euler-a"])
    page = build_app(tiny_pipe, model_name="tiny", defaults={"scheduler": args.scheduler})
    controls = {c.elem_id: c for c in page.blocks.values() if getattr(c, "elem_id", None)}
    assert controls["scheduler"].value == "euler-a"


def test_the_automatic_inversion_depth_follows_the_steps_into_the_png_recipe(tiny_pipe, tmp_path):
    fast = {**FAST, "num_inference_steps": 3, "inversion_steps": CONTROL_DEFAULTS["inversion_steps"]}
    req = validate_request(PROMPT, two_boxes(), tokenizer=tiny_pipe.tokenizer, **fast)
    result = run_generation(tiny_pipe, req, model="tiny", out_dir=str(tmp_path))
    # 5 inversion steps cannot end at the 3-step sampler's first timestep (667): 3 do
    assert read_recipe(result.png_path)["init_params"]["inversion_steps"] == 3
    assert result.runs[-1].output.info["inversion_steps"] == 3


def test_the_loss_plot_legend_is_titled_for_a_reader_not_with_the_frames_column(app):
    from gradio.components import LinePlot

    from saltdiff.demo.requests import DemoResult

    plot = next(c for c in app.blocks.values() if isinstance(c, LinePlot))
    frame_columns = DemoResult.losses_frame(DemoResult(*[None] * 4, [], *[None] * 5)).columns
    assert plot.color in frame_columns  # the plot colours by a column of the frame ...
    assert plot.color_title and plot.color_title not in frame_columns  # ... but does not show its name
    assert plot.x_title and plot.y_title


def test_the_status_line_shows_messages_literally():
    from saltdiff.demo.page import status_markdown

    text = "use inversion_steps <= 3 (--inversion-steps) or *more* steps"
    shown = status_markdown(text, failed=True)
    assert shown.startswith("**Not generated:** ")
    assert "inversion\\_steps" in shown and "\\*more\\*" in shown and "\\<= 3" in shown


# -- the server under concurrent use ------------------------------------------------------------------


def _cli_args_of(recipe: dict) -> list[str]:
    """``saltdiff generate`` flags for the request a demo PNG's recipe describes."""
    args = ["--prompt", recipe["prompt"], "--seed", str(recipe["seed"]), "--steps", str(recipe["steps"])]
    args += ["--cfg", str(recipe["cfg"]), "--scheduler", recipe["scheduler"], "--init", recipe["init"]]
    args += ["--guidance", recipe["guidance"]["loss"]]
    args += ["--outside-prompt-steps", str(recipe["guidance"]["outside_prompt_steps"])]
    for box in recipe["layout"]["boxes"]:
        args += ["--box", f"{box['phrase']}={','.join(repr(float(v)) for v in box['box'])}"]
    if recipe["init"] == "salt":
        params, reference = recipe["init_params"], recipe["reference_params"]
        args += ["--inversion-steps", str(params["inversion_steps"])]
        args += ["--noise-outside", str(params["noise_outside"]), "--background", reference["background"]]
        args += ["--object-steps", str(reference["num_inference_steps"])]
    return args


def test_concurrent_requests_each_get_their_own_image_or_their_own_error(
    tiny_pipe_dir, tmp_path, monkeypatch
):
    """Six generations and two bad requests sent at once to a server on loopback, from eight sessions:
    each valid one gets the image ``saltdiff generate`` makes for its recipe, each bad one its own
    message, and the server keeps serving."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("gradio")
    pytest.importorskip("gradio_image_annotation")
    from gradio_client import Client, handle_file

    from saltdiff.cli import main
    from saltdiff.demo.page import build_app, launch_kwargs
    from saltdiff.demo.requests import neutral_canvas

    monkeypatch.setenv("SALTDIFF_CACHE", str(tmp_path / "cache"))  # the objects the CLI finds, too
    from saltdiff.pipeline import SaltPipeline

    pipe = SaltPipeline.from_pretrained(tiny_pipe_dir)  # the weights `--model tiny_pipe_dir` loads
    pipe.set_progress_bar_config(disable=True)
    app = build_app(pipe, model_name=tiny_pipe_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app.launch(**launch_kwargs("127.0.0.1", port), prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    canvas = tmp_path / "canvas.png"
    neutral_canvas().save(canvas)

    def annotation(*boxes):
        pixels = [
            dict(zip(("xmin", "ymin", "xmax", "ymax"), (v * 512 for v in b)), label=p) for p, b in boxes
        ]
        return {"image": handle_file(str(canvas)), "boxes": pixels, "orientation": 0}

    two = annotation(("red circle", (0.0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1.0, 0.75)))
    one = annotation(("blue square", (0.25, 0.0, 0.75, 0.5)))
    # model, prompt, canvas, use_reference, init, guidance, steps, cfg, seed, inversion steps (0: auto),
    # compare, object steps, background, noise outside, sampler, outside-prompt steps
    requests = [
        [tiny_pipe_dir, PROMPT, two, False, "salt", "salt", 2, 7.5, 1, 0, False, 1, "gray", 1.0, "ddim", 1],
        [tiny_pipe_dir, PROMPT, two, False, "salt", "salt", 3, 5.0, 2, 2, False, 1, "gray", 0.5, "euler", 0],
        [
            tiny_pipe_dir,
            PROMPT,
            two,
            False,
            "random",
            "layout-guidance",
            2,
            7.5,
            3,
            0,
            False,
            1,
            "gray",
            1.0,
            "ddim",
            2,
        ],
        [
            tiny_pipe_dir,
            "a blue square",
            one,
            False,
            "salt",
            "boxdiff",
            3,
            7.5,
            4,
            0,
            False,
            1,
            "white",
            1.0,
            "euler-a",
            1,
        ],
        [
            tiny_pipe_dir,
            "a blue square",
            one,
            False,
            "salt",
            "none",
            2,
            3.0,
            5,
            1,
            False,
            1,
            "gray",
            0.0,
            "dpm++2m",
            0,
        ],
        [tiny_pipe_dir, PROMPT, two, False, "salt", "salt", 2, 7.5, 1, 0, False, 1, "gray", 1.0, "ddim", 1],
        [
            tiny_pipe_dir,
            "a red circle",
            two,
            False,
            "salt",
            "salt",
            2,
            7.5,
            6,
            0,
            False,
            1,
            "gray",
            1.0,
            "ddim",
            1,
        ],
        [tiny_pipe_dir, PROMPT, two, False, "salt", "salt", 2, 7.5, 7, 0, False, 1, "plaid", 1.0, "ddim", 1],
    ]
    bad = {6: "phrase 'blue square' not found", 7: "got 'plaid'"}

    def send(args):
        client = Client(url, verbose=False)  # a session of its own, like another browser tab
        return client.submit(*args, api_name="/generate").result(timeout=600)

    try:
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(send, requests))
        assert (
            Client(url, verbose=False).predict(*requests[0], api_name="/generate")[-1].startswith("Done in")
        )
    finally:
        app.close()

    for k, result in enumerate(results):
        status = result[-1]
        if k in bad:
            assert status.startswith("**Not generated:**") and bad[k] in status, (k, status)
            continue
        assert status.startswith("Done in"), (k, status)
        recipe = read_recipe(result[6])
        sent = requests[k]
        assert (recipe["prompt"], recipe["seed"], recipe["scheduler"]) == (sent[1], sent[8], sent[14]), k
        out = tmp_path / f"cli{k}.png"
        assert (
            main(["generate", *_cli_args_of(recipe), "--model", tiny_pipe_dir, "--quiet", "--out", str(out)])
            == 0
        )
        assert read_recipe(str(out))["init_params"] == recipe["init_params"], k
        with Image.open(result[6]) as demo, Image.open(out) as cli:
            assert np.array_equal(np.asarray(demo), np.asarray(cli)), k  # its own image, the CLI's
    assert np.array_equal(np.asarray(Image.open(results[0][6])), np.asarray(Image.open(results[5][6])))
    assert not np.array_equal(np.asarray(Image.open(results[0][6])), np.asarray(Image.open(results[1][6])))
