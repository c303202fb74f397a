"""Recipes read back from files are checked as the CLI and the call check their arguments (issue #23)."""

import json
import re

import pytest
from PIL import Image, PngImagePlugin

from saltdiff import __version__
from saltdiff.layout import Layout
from saltdiff.request import RECIPE_FIELDS, GenerationRequest, read_recipe

PROMPT = "a red circle and a blue square"
LAYOUT = Layout.from_pairs([("red circle", (0, 0.25, 0.5, 0.75))])


@pytest.fixture
def recipe():
    request = GenerationRequest(
        PROMPT, LAYOUT, num_inference_steps=3, reference_params={"background": "gray"}
    )
    return request.recipe(height=32, width=32, model="tiny", dtype="float32")


def png_with(tmp_path, text, name="r.png"):
    path = tmp_path / name
    info = PngImagePlugin.PngInfo()
    info.add_text("saltdiff", text)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def refused(path) -> str:
    with pytest.raises(ValueError) as info:
        GenerationRequest.from_png(path)
    assert not isinstance(info.value, json.JSONDecodeError)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and len(message) < 600
    return message


def test_a_written_recipe_reads_back(tmp_path, recipe):
    path = png_with(tmp_path, json.dumps(recipe))
    request = GenerationRequest.from_png(path)
    assert request.recipe(height=32, width=32, model="tiny", dtype="float32") == recipe
    assert GenerationRequest.from_png(Image.open(path)).num_inference_steps == 3  # an open image too
    nulls = png_with(tmp_path, json.dumps({**recipe, "model": None, "reference": None}), "nulls.png")
    assert GenerationRequest.from_png(nulls).reference == "objects"  # null: the default builder


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("steps", -3, "field 'steps' must be an integer >= 1, got -3"),
        ("steps", 2.5, "field 'steps' must be an integer >= 1, got 2.5"),  # was: silently 2
        ("steps", "3", "field 'steps' must be an integer >= 1, got '3'"),
        ("steps", True, "field 'steps' must be an integer >= 1, got True"),
        ("cfg", float("nan"), "field 'cfg' must be a finite number >= 0, got nan"),
        ("cfg", float("inf"), "field 'cfg' must be a finite number >= 0, got inf"),
        ("cfg", -1, "field 'cfg' must be a finite number >= 0, got -1"),
        ("height", 1e9, r"field 'height' must be an integer in \[1, 16384\] or None, got 1000000000.0"),
        ("width", 10**9, r"field 'width' must be an integer in \[1, 16384\] or None, got 1000000000"),
        ("height", 0, "field 'height' must be an integer"),
        ("seed", -1, "field 'seed' must be a non-negative integer, got -1"),
        ("prompt", 7, "field 'prompt' must be a string, got 7"),
        ("prompt", " ", "the prompt is empty"),
        ("negative_prompt", ["x"], "field 'negative_prompt' must be a string or null"),
        ("scheduler", "nope", "unknown .*'nope'"),
        ("layout", [1, 2], "field 'layout' must be a JSON object"),
        (
            "layout",
            {"boxes": [{"phrase": "x" * 5000, "box": [0, 0, 2, 1]}]},
            "field 'layout': box .* lies outside",
        ),
        ("guidance", {"los": 1}, r"field 'guidance': unknown guidance option\(s\) \['los'\]"),
        ("init_params", {"inversion_steps": -1}, "inversion_steps"),
    ],
)
def test_bad_fields_are_refused_naming_the_field_and_file(tmp_path, recipe, field, value, match):
    path = png_with(tmp_path, json.dumps({**recipe, field: value}))
    message = refused(path)
    assert re.search(match, message), message


def test_a_missing_prompt_and_unknown_fields_are_refused(tmp_path, recipe):
    del recipe["prompt"]
    assert "field 'prompt' is missing" in refused(png_with(tmp_path, json.dumps(recipe)))
    recipe.update(prompt=PROMPT, sharpness=2, saltdiff_version="9.0.0")
    message = refused(png_with(tmp_path, json.dumps(recipe)))
    assert f"unknown field(s) ['sharpness'] (written by saltdiff 9.0.0, this is {__version__})" in message
    assert "model" in message  # lists the known fields


def test_the_request_checks_what_the_call_checks():
    # The same wording as SaltPipeline's check_salt_inputs, before any model is loaded.
    with pytest.raises(ValueError, match="num_inference_steps must be an integer >= 1, got 0"):
        GenerationRequest(PROMPT, num_inference_steps=0)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0, got nan"):
        GenerationRequest(PROMPT, guidance_scale=float("nan"))
    with pytest.raises(ValueError, match=r"height must be an integer in \[1, 16384\] or None, got 40000"):
        GenerationRequest(PROMPT, height=40000)
    with pytest.raises(TypeError, match="negative_prompt must be a string or None"):
        GenerationRequest(PROMPT, negative_prompt=3)


def test_extras_a_recipe_cannot_read_back_are_refused_when_written(tmp_path):
    request = GenerationRequest(PROMPT, LAYOUT)
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['note'\]"):
        request.save_png(Image.new("RGB", (8, 8)), tmp_path / "x.png", note="hi")
    assert not list(tmp_path.iterdir())
    assert set(request.recipe(model="m", dtype="float16")) <= set(RECIPE_FIELDS)


def test_files_without_a_readable_recipe_get_a_message_that_fits_them(tmp_path):
    assert "is not valid JSON: Expecting" in refused(png_with(tmp_path, '{"prompt": "a cat", "steps": 3'))
    assert "must be a JSON object, got [1, 2]" in refused(png_with(tmp_path, "[1, 2]"))
    assert "is not valid JSON: maximum recursion depth" in refused(png_with(tmp_path, "[" * 100_000))
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert "carries no saltdiff recipe (not made by saltdiff" in refused(plain)
    for fmt, name in (("JPEG", "photo.jpg"), ("WEBP", "photo.webp")):  # formats saltdiff writes
        path = tmp_path / name
        Image.new("RGB", (8, 8)).save(path, format=fmt)
        assert "carries no saltdiff recipe (not made by saltdiff" in refused(path)
    for fmt, name in (("BMP", "photo.bmp"), ("GIF", "photo.gif")):  # formats that never hold one
        path = tmp_path / name
        Image.new("RGB", (8, 8)).save(path, format=fmt)
        message = refused(path)
        assert f"is a {fmt} file, which carries no saltdiff recipe" in message and "PNG" in message
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert "is not an image" in refused(text)
    with pytest.raises(OSError, match="missing.png"):
        read_recipe(tmp_path / "missing.png")
