"""The demo on a tiny random SD3 folder (and a FLUX pipeline object): the model pool, the controls its family decides, one run with
its recipe, and one line for a sampler or an option SD3 does not run."""

import numpy as np
import pytest

from saltdiff.demo.requests import family_controls, run_generation, validate_request
from saltdiff.guidance import OUTSIDE_PROMPT_STEPS
from saltdiff.request import read_recipe

PROMPT = "a red circle and a blue square on a white background"
FAST = {"num_inference_steps": 2, "inversion_steps": 1, "object_steps": 1, "background": "gray"}


def request_fields(controls):
    """The page's control values as ``validate_request`` keywords (the page's ``cfg`` slider feeds
    ``guidance_scale``)."""
    fields = dict(controls)
    fields["guidance_scale"] = fields.pop("cfg")
    return fields


def two_boxes(size=64):
    image = np.zeros((size, size, 3), dtype=np.uint8)
    boxes = [("red circle", (4, 16, 28, 48)), ("blue square", (36, 16, 60, 48))]
    return {
        "image": image,
        "boxes": [
            {"label": label, "xmin": b[0], "ymin": b[1], "xmax": b[2], "ymax": b[3], "color": (0, 0, 0)}
            for label, b in boxes
        ],
        "orientation": 0,
    }


@pytest.fixture(scope="module")
def sd3_pool(tiny_sd3_dir):
    from saltdiff.demo.models import ModelPool

    return ModelPool(tiny_sd3_dir, device="cpu", dtype="float32")


def test_the_pool_loads_an_sd3_folder_and_offers_the_built_in_models(sd3_pool, tiny_sd3_dir):
    from saltdiff.loading import builtin_models
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline

    assert type(sd3_pool.get(tiny_sd3_dir)) is SaltSD3Pipeline
    assert sd3_pool.choices == [tiny_sd3_dir, *(f"builtin:{k}" for k in builtin_models())]
    assert "builtin:shapes" in sd3_pool.choices


def test_a_plain_sd3_pipeline_object_is_served_as_a_salt_sd3_pipeline(sd3_pool, tiny_sd3_dir):
    from diffusers import StableDiffusion3Pipeline

    from saltdiff.demo.models import ModelPool
    from saltdiff.pipeline_sd3 import SaltSD3Pipeline

    plain = StableDiffusion3Pipeline(**sd3_pool.get(tiny_sd3_dir).components)
    pool = ModelPool(plain, name="plain")
    assert type(pool.get("plain")) is SaltSD3Pipeline


def test_a_plain_flux_pipeline_object_is_served_as_a_salt_flux_pipeline():
    from diffusers import FluxPipeline

    from saltdiff.demo.models import ModelPool
    from saltdiff.pipeline_flux import SaltFluxPipeline
    from saltdiff.testing_flow import tiny_flux_components

    pool = ModelPool(FluxPipeline(**tiny_flux_components()), name="flux")
    assert type(pool.get("flux")) is SaltFluxPipeline
    assert family_controls(pool.get("flux")) == {"scheduler": "flow-euler", "outside_prompt_steps": 0, "cfg": 3.5}


def test_the_family_decides_the_sampler_and_the_outside_prompt(sd3_pool, tiny_sd3_dir, tiny_pipe):
    assert family_controls(sd3_pool.get(tiny_sd3_dir)) == {
        "scheduler": "flow-euler",
        "outside_prompt_steps": OUTSIDE_PROMPT_STEPS,
        "cfg": 7.0,
    }
    expected = {"scheduler": "ddim", "outside_prompt_steps": OUTSIDE_PROMPT_STEPS, "cfg": 7.5}
    assert family_controls(tiny_pipe) == expected


def test_run_generation_on_sd3_compares_and_writes_the_recipe(sd3_pool, tiny_sd3_dir, tmp_path):
    pipe = sd3_pool.get(tiny_sd3_dir)
    controls = request_fields(family_controls(pipe))
    req = validate_request(PROMPT, two_boxes(), tokenizer=pipe.tokenizer, compare=True, **FAST, **controls)
    result = run_generation(pipe, req, model="tiny-sd3", out_dir=str(tmp_path))
    assert [run.init for run in result.runs] == ["random", "salt"]
    assert result.image.size == (64, 64) and result.reference is not None
    assert [caption for _, caption in result.heatmaps] == ["attention: red circle", "attention: blue square"]
    recipe = read_recipe(result.png_path)
    assert (
        recipe["scheduler"] == "flow-euler" and recipe["dtype"] == "float32" and recipe["model"] == "tiny-sd3"
    )
    assert recipe["guidance"]["outside_prompt_steps"] == OUTSIDE_PROMPT_STEPS
    assert recipe["init_params"]["inversion_steps"] == 1


def test_a_vp_sampler_on_sd3_is_one_line_and_writes_nothing(sd3_pool, tiny_sd3_dir, tmp_path):
    pipe = sd3_pool.get(tiny_sd3_dir)
    fields = {**FAST, **request_fields(family_controls(pipe)), "scheduler": "ddim"}
    req = validate_request(PROMPT, two_boxes(), tokenizer=pipe.tokenizer, **fields)
    with pytest.raises(ValueError, match="scheduler 'ddim' is a VP") as info:
        run_generation(pipe, req, model="tiny-sd3", out_dir=str(tmp_path))
    assert "\n" not in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_pages_outside_prompt_steps_reach_an_sd3_run(sd3_pool, tiny_sd3_dir, tmp_path):
    pipe = sd3_pool.get(tiny_sd3_dir)
    fields = {**FAST, **request_fields(family_controls(pipe)), "outside_prompt_steps": 1}
    req = validate_request(PROMPT, two_boxes(), tokenizer=pipe.tokenizer, **fields)
    result = run_generation(pipe, req, model="tiny-sd3", out_dir=str(tmp_path))
    assert read_recipe(result.png_path)["guidance"]["outside_prompt_steps"] == 1


def test_the_page_starts_with_the_families_controls_and_follows_the_chosen_model(
    sd3_pool, tiny_sd3_dir, tiny_pipe
):
    pytest.importorskip("gradio")
    pytest.importorskip("gradio_image_annotation")
    from saltdiff.demo.page import build_app

    page = build_app(sd3_pool.get(tiny_sd3_dir), model_name="tiny-sd3", defaults={"scheduler": None})
    controls = {c.elem_id: c for c in page.blocks.values() if getattr(c, "elem_id", None)}
    assert controls["scheduler"].value == "flow-euler" and controls["outside-prompt-steps"].value == OUTSIDE_PROMPT_STEPS
    assert controls["cfg"].value == 7.0
    page.saltdiff_pool._pipes["tiny"] = tiny_pipe  # a second model, already loaded
    page.saltdiff_pool.choices.append("tiny")
    fns = page.fns.values() if isinstance(page.fns, dict) else page.fns
    changed = next(f for f in fns if getattr(f.fn, "__name__", "") == "model_changed").fn
    scheduler, outside, cfg = changed("tiny")
    assert (scheduler["value"], outside["value"], cfg["value"]) == ("ddim", OUTSIDE_PROMPT_STEPS, 7.5)
    scheduler, outside, cfg = changed("tiny-sd3")
    assert (scheduler["value"], outside["value"], cfg["value"]) == ("flow-euler", OUTSIDE_PROMPT_STEPS, 7.0)
