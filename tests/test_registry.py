"""The registry: one declaration per choosable name, from which CLI, request and pipeline all follow."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from saltdiff.cli import build_parser
from saltdiff.cli_args import CliError, method_options
from saltdiff.guidance import GuidanceConfig
from saltdiff.init import InitResult
from saltdiff.layout import Layout
from saltdiff.reference import ReferenceImage
from saltdiff.registry import (
    GUIDANCE_LOSSES,
    GUIDANCE_PARAMS,
    INITIALIZERS,
    REFERENCE_BUILDERS,
    Entry,
    Param,
    Registry,
)
from saltdiff.request import GenerationRequest

PROMPT = "a red circle and a blue square"
LAYOUT = Layout.from_pairs([("red circle", (0.0, 0.25, 0.5, 0.75)), ("blue square", (0.5, 0.25, 1.0, 0.75))])


def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


@pytest.mark.parametrize(
    ("registry", "name"),
    [
        (INITIALIZERS, "salt"),
        (INITIALIZERS, "random"),
        (REFERENCE_BUILDERS, "objects"),
        (REFERENCE_BUILDERS, "image"),
    ],
)
def test_registered_params_are_the_dataclass_fields_with_the_same_defaults(registry, name):
    entry = registry.get(name)
    fields = _field_defaults(entry.load())
    api_only = {"salt": {"reference"}, "image": {"objects", "background", "threshold", "fit"}}.get(
        name, set()
    )
    assert {p.name for p in entry.params} == set(fields) - api_only, "a field is not registered (no CLI flag)"
    for p in entry.params:
        assert p.name in fields, f"{name}: registered param {p.name!r} is not a field"
        assert fields[p.name] == p.default, (
            f"{name}.{p.name}: field default {fields[p.name]!r} != {p.default!r}"
        )


def test_guidance_params_are_the_config_fields_with_the_same_defaults():
    fields = _field_defaults(GuidanceConfig)
    assert {p.name: p.default for p in GUIDANCE_PARAMS} == {
        k: v for k, v in fields.items() if k not in ("loss", "loss_params")
    }
    for entry in GUIDANCE_LOSSES:  # every built-in loss function accepts its declared params
        if entry.target is None:
            continue
        maps = torch.rand(1, 2, 4, 4)
        masks = torch.zeros(2, 4, 4)
        masks[:, :2] = 1
        assert torch.isfinite(entry.load()(maps, masks, **entry.defaults()))


def test_param_check_names_owner_param_and_value():
    p = Param("fraction", 0.2, "a fraction", minimum=0, maximum=1, open_minimum=True)
    assert p.check(1.0) == 1.0
    with pytest.raises(ValueError, match=r"toy: fraction must be a number in \(0, 1\], got 0"):
        p.check(0, "toy")
    with pytest.raises(ValueError, match="must be a number"):
        p.check(True)
    with pytest.raises(ValueError, match=r"one of \['a', 'b'\], got 'c'"):
        Param("mode", "a", "", choices=("a", "b")).check("c")
    assert Param("limit", None, "", kind=float, optional=True).check(None) is None
    with pytest.raises(ValueError, match="an integer >= 1"):
        Param("steps", 5, "", minimum=1).check(2.5)


def test_entry_resolve_and_registry_errors():
    entry = INITIALIZERS.get("salt")
    assert entry.resolve({"inversion_steps": 3})["inversion_steps"] == 3
    assert entry.resolve({})["inversion_prompt"] == "empty"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['steps'\]; valid: \['inversion_steps'"):
        entry.resolve({"steps": 3})
    registry = Registry("widget")
    registry.register(Entry("a", None, "first"))
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register(Entry("a", None, "again"))
    with pytest.raises(ValueError, match=r"unknown widget 'b'; choose from \['a'\]"):
        registry.get("b")
    with pytest.raises(ValueError, match="unknown param 'nope'"):
        Entry("x", None, "", needs={"unboxed_tokens": "nope"})


@dataclasses.dataclass
class ConstantInit:
    """A toy initializer: z_T = value everywhere."""

    value: float = 0.5

    def __call__(self, ctx, prompt, layout, generator, *, height, width, num_inference_steps, num_images=1):
        shape = ctx.latent_shape(num_images, height, width)
        return InitResult(torch.full(shape, self.value), None, {"init": "constant"})


@dataclasses.dataclass
class CheckerReference:
    """A toy reference builder that never asks the model for objects: a checkerboard."""

    cell: int = 4

    def build(self, objects, prompt, layout, *, height, width, generator):
        yy, xx = np.mgrid[:height, :width]
        board = (((yy // self.cell) + (xx // self.cell)) % 2 * 255).astype(np.uint8)
        image = Image.fromarray(np.stack([board] * 3, -1))
        return ReferenceImage(image, layout.masks(height, width).numpy().astype(bool))


@pytest.fixture
def toy_entries():
    INITIALIZERS.register(
        Entry(
            "constant",
            ConstantInit,
            "z_T = VALUE",
            params=(Param("value", 0.5, "the constant", minimum=-3, maximum=3),),
        )
    )
    REFERENCE_BUILDERS.register(
        Entry(
            "checker",
            CheckerReference,
            "a checkerboard",
            params=(Param("cell", 4, "cell size in pixels", minimum=1),),
        )
    )
    try:
        yield
    finally:
        INITIALIZERS.unregister("constant")
        REFERENCE_BUILDERS.unregister("checker")


def test_a_registered_initializer_is_a_cli_choice_and_runs(toy_entries, tiny_pipe):
    args = build_parser().parse_args(
        ["generate", "--prompt", PROMPT, "--init", "constant", "--value", "0.25"]
    )
    options = method_options(args)
    assert (options.init, options.init_params) == ("constant", {"value": 0.25})
    request = GenerationRequest(
        PROMPT,
        LAYOUT,
        init="constant",
        init_params={"value": 0.25},
        guidance=GuidanceConfig(loss="none"),
        num_inference_steps=2,
        height=32,
        width=32,
    )
    out = request.run(tiny_pipe, progress=False)
    assert out.init_latent.shape == (1, 4, 16, 16) and bool((out.init_latent == 0.25).all())
    assert request.recipe()["init_params"] == {"value": 0.25}
    with pytest.raises(
        CliError, match=r"--value applies to the initializer\(s\) \['constant'\], not \['salt'\]"
    ):
        method_options(build_parser().parse_args(["generate", "--prompt", PROMPT, "--value", "0.25"]))


def test_a_registered_reference_builder_is_a_cli_choice_and_runs(toy_entries, tiny_pipe):
    args = build_parser().parse_args(
        ["generate", "--prompt", PROMPT, "--reference-builder", "checker", "--cell", "2"]
    )
    options = method_options(args)
    assert (options.reference, options.reference_params) == ("checker", {"cell": 2})
    request = GenerationRequest(
        PROMPT,
        LAYOUT,
        reference="checker",
        reference_params={"cell": 2},
        init_params={"inversion_steps": 1},
        guidance=GuidanceConfig(loss="none"),
        num_inference_steps=2,
        height=32,
        width=32,
    )
    out = request.run(tiny_pipe, progress=False)
    ref = np.asarray(out.reference_image.convert("L"))
    assert ref[0, 0] == 0 and ref[0, 2] == 255 and ref[2, 2] == 0


def test_request_refuses_params_that_do_not_apply():
    with pytest.raises(
        ValueError, match=r"init 'random': unknown option\(s\) \['inversion_steps'\]; valid: none"
    ):
        GenerationRequest(PROMPT, init="random", init_params={"inversion_steps": 2})
    with pytest.raises(ValueError, match=r"reference options \['background'\] apply only to an initializer"):
        GenerationRequest(PROMPT, init="random", reference_params={"background": "gray"})
    with pytest.raises(ValueError, match="reference builder 'objects': background must be generated, "):
        GenerationRequest(PROMPT, reference_params={"background": "plaid"})


def test_recipe_round_trip_and_legacy_recipe(tmp_path):
    request = GenerationRequest(
        PROMPT,
        LAYOUT,
        init_params={"inversion_steps": 3},
        reference_params={"background": "gray"},
        guidance=GuidanceConfig(loss="boxdiff", loss_params={"topk_fraction": 0.3}),
        seed=4,
        num_inference_steps=7,
    )
    path = str(tmp_path / "x.png")
    recipe = request.save_png(Image.new("RGB", (8, 8)), path, model="m")
    again = GenerationRequest.from_png(path)
    assert again.recipe(height=8, width=8, model="m") == recipe
    assert again.guidance.params == {"topk_fraction": 0.3} and again.seed == 4
    legacy = {  # a recipe written by saltdiff 0.1.0
        "prompt": PROMPT,
        "layout": LAYOUT.to_dict(),
        "seed": 1,
        "steps": 5,
        "cfg": 7.5,
        "init": "salt",
        "init_config": {
            "inversion_steps": 2,
            "reference": {"type": "GeneratedObjects", "background": "gray", "cache": True},
        },
        "guidance": {"loss": "salt", "guidance_steps": 3, "reg_weight": 1.0, "boxdiff_topk_fraction": 0.2},
    }
    old = GenerationRequest.from_recipe(legacy)
    assert old.init_params == {"inversion_steps": 2} and old.reference_params["background"] == "gray"
    assert old.guidance.params == {"reg_weight": 1.0, "unboxed_weight": 0.0}
