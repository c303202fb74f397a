"""Objects the prompt names without a box: found, placed away from the boxes, pasted into the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saltdiff.layout import Box, Layout, LayoutError
from saltdiff.placement import free_boxes
from saltdiff.reference import GeneratedObject, GeneratedObjects
from saltdiff.vocabulary import ModelVocabulary, object_phrases, unboxed_objects, with_unboxed_objects

SHAPES_VOCABULARY = ModelVocabulary(
    frozenset("a photo of and on red green blue circle square triangle gray background".split()),
    {
        "colours": ("red", "green", "blue"),
        "shapes": ("circle", "square", "triangle"),
        "backgrounds": ("gray",),
    },
)


def _overlap(a, b) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def test_free_boxes_go_where_no_box_is_and_apart_from_each_other():
    left = Layout((Box("red circle", (0.05, 0.1, 0.45, 0.9)),), ("green square", "blue triangle"))
    placed = free_boxes(left)
    assert [b.phrase for b in placed] == ["green square", "blue triangle"]
    for b in placed:
        assert b.width == pytest.approx(0.35) and b.height == pytest.approx(0.35)  # the box's side, clamped
        assert _overlap(b.box, left[0].box) == 0.0
        assert b.x0 >= 0.45 - 1e-9
    assert _overlap(placed[0].box, placed[1].box) == 0.0
    assert free_boxes(left) == placed  # deterministic

    small = Layout((Box("red circle", (0.0, 0.0, 0.1, 0.1)),), ("green square",))
    (b,) = free_boxes(small)
    assert b.width == pytest.approx(0.2)  # never smaller than a fifth of the image
    assert b.center[0] > 0.3 and b.center[1] > 0.3  # away from the corner box

    assert free_boxes(Layout((Box("red circle", (0.1, 0.1, 0.5, 0.5)),))) == []


def test_a_full_canvas_still_gets_the_least_covered_place():
    boxes = (Box("a", (0.0, 0.0, 0.5, 1.0)), Box("b", (0.5, 0.0, 1.0, 0.6)))
    (b,) = free_boxes(Layout(boxes, ("c",)), side=0.3)
    assert _overlap(b.box, boxes[0].box) + _overlap(b.box, boxes[1].box) == 0.0
    assert b.x0 >= 0.5 and b.y0 >= 0.6  # the uncovered corner, bottom right
    (c,) = free_boxes(Layout(boxes, ("c",)), side=0.6)  # no room: the least overlap
    assert _overlap(c.box, boxes[0].box) + _overlap(c.box, boxes[1].box) == pytest.approx(
        0.6 * 0.6 - 0.5 * 0.4
    )


def test_unboxed_phrases_round_trip_and_are_validated():
    layout = Layout((Box("red circle", (0.1, 0.1, 0.4, 0.4)),), ("green square",))
    assert Layout.from_dict(layout.to_dict("p")) == layout
    assert "unboxed" not in Layout(layout.boxes).to_dict()
    assert layout[:1].unboxed == ("green square",)
    with pytest.raises(LayoutError, match="unboxed phrase must be a non-empty string"):
        Layout(layout.boxes, ("",))
    with pytest.raises(LayoutError, match="'unboxed' must be a list"):
        Layout.from_dict({"boxes": [], "unboxed": "green square"})


def test_object_phrases_come_from_the_models_colour_and_shape_words():
    prompt = "a photo of a red circle, a green square and a green square on a gray background"
    assert object_phrases(prompt, SHAPES_VOCABULARY) == ["red circle", "green square", "green square"]
    assert unboxed_objects(prompt, ["red circle", "green square"], SHAPES_VOCABULARY) == ["green square"]
    assert object_phrases(prompt, None) == []
    assert object_phrases(prompt, ModelVocabulary(frozenset({"red"}))) == []  # no groups: cannot tell


def test_with_unboxed_objects_detects_or_checks_the_users_phrases():
    boxed = Layout((Box("red circle", (0.1, 0.1, 0.4, 0.4)),))
    prompt = "a red circle and a blue triangle"
    assert with_unboxed_objects(boxed, prompt, SHAPES_VOCABULARY).unboxed == ("blue triangle",)
    assert with_unboxed_objects(boxed, prompt, None).unboxed == ()
    mine = Layout(boxed.boxes, ("a blue triangle",))
    assert with_unboxed_objects(mine, prompt, None) is mine
    with pytest.raises(LayoutError, match="'a cat' is not in the prompt"):
        with_unboxed_objects(Layout(boxed.boxes, ("a cat",)), prompt, SHAPES_VOCABULARY)


class _SolidObjects:
    """An object generator that draws each phrase as a centred square of its colour on white."""

    identity = None
    colours = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0)}

    def __call__(self, prompts, *, phrases, height, width, num_inference_steps, guidance_scale, seed):
        out = []
        for prompt in prompts:
            image = np.ones((height, width, 3), dtype=np.float32)
            colour = next((c for name, c in self.colours.items() if name in prompt), None)
            if colour is not None and phrases is not None:
                image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = colour
            elif phrases is None:
                image[:] = 0.5  # the background scene
            out.append(GeneratedObject(image))
        return out


@pytest.mark.parametrize("mode", ["place", "ignore"])
def test_the_reference_holds_each_unboxed_object_in_its_free_box(mode):
    layout = Layout((Box("red circle", (0.0, 0.0, 0.5, 0.5)),), ("blue square",))
    builder = GeneratedObjects(cutout="foreground", unboxed=mode, cache=False)
    ref = builder.build(
        _SolidObjects(), "a red circle and a blue square", layout, height=64, width=64, generator=None
    )
    image = np.asarray(ref.image).astype(int)
    blue = (image[..., 2] > 200) & (image[..., 0] < 60)
    assert ref.object_masks.shape == (1, 64, 64)
    if mode == "ignore":
        assert not blue.any() and ref.free_boxes == [] and ref.all_masks.shape == (1, 64, 64)
        return
    (free,) = ref.free_boxes
    x0, y0, x1, y1 = free.to_pixels(64, 64)
    assert blue.any() and blue[y0:y1, x0:x1].sum() == blue.sum()  # all of it in its free box
    assert not blue[:32, :32].any()  # none of it in the red circle's box
    assert ref.all_masks.shape == (2, 64, 64) and (ref.all_masks[1] == blue).mean() > 0.95


def test_salt_keeps_z_t_on_the_placed_object_too():
    from saltdiff.init import SpatialAwareInit

    layout = Layout((Box("red circle", (0.0, 0.0, 0.5, 0.5)),), ("blue square",))
    ref = GeneratedObjects(cutout="foreground", cache=False).build(
        _SolidObjects(), "a red circle and a blue square", layout, height=64, width=64, generator=None
    )
    kept = SpatialAwareInit(feather=0.0).kept_region(layout, ref, (16, 16))
    x0, y0, x1, y1 = ref.free_boxes[0].to_pixels(16, 16)
    assert kept[y0 + 1 : y1 - 1, x0 + 1 : x1 - 1].min() > 0.9
    assert torch.equal(kept, kept.clamp(0, 1))


def test_cli_unboxed_flag_builds_the_layout():
    from saltdiff.cli import build_layout, build_parser

    args = build_parser().parse_args(
        [
            "generate",
            "--prompt",
            "a red circle and a blue square",
            "--box",
            "red circle=0,0,0.5,0.5",
            "--unboxed",
            "blue square",
        ]
    )
    assert build_layout(args).unboxed == ("blue square",)


def test_overlay_draws_the_placed_boxes_on_the_reference():
    from PIL import Image

    from saltdiff.viz import overlay_figure

    layout = Layout((Box("red circle", (0.0, 0.0, 0.5, 0.5)),), ("blue square",))
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    plain = np.asarray(overlay_figure(white, layout, None, white))
    marked = np.asarray(
        overlay_figure(white, layout, None, white, placed=[b.to_dict() for b in free_boxes(layout)])
    )
    gray = (marked == 128).all(-1) & ~(plain == 128).all(-1)
    assert gray[:, 260:].any() and not gray[:, :256].any()  # on the reference tile only


def test_a_recipe_written_before_placement_replays_without_it():
    from saltdiff.request import GenerationRequest

    new = GenerationRequest(
        prompt="a red circle and a blue square", layout=Layout.from_pairs([("red circle", (0, 0, 0.5, 0.5))])
    )
    recipe = new.recipe()
    assert GenerationRequest.from_recipe(recipe).reference_params["unboxed"] == GeneratedObjects().unboxed
    assert GenerationRequest.from_recipe(recipe).guidance.placed_unboxed == "guide"
    old = dict(recipe)
    old["reference_params"] = {k: v for k, v in recipe["reference_params"].items() if k != "unboxed"}
    old["guidance"] = {k: v for k, v in recipe["guidance"].items() if k != "placed_unboxed"}
    replay = GenerationRequest.from_recipe(old)
    assert replay.reference_params["unboxed"] == "ignore" and replay.guidance.placed_unboxed == "free"


def _placed_run(pipe, prompt, **kwargs):
    from saltdiff.init import SpatialAwareInit

    init = SpatialAwareInit(
        reference=GeneratedObjects(background="gray", num_inference_steps=2, cache=False), inversion_steps=2
    )
    layout = Layout((Box("cat", (0.0, 0.0, 0.5, 0.5)),), ("dog",))
    return pipe(prompt, layout, init=init, seed=1, output_type="np", return_attention_maps=True, **kwargs)


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_pipelines_place_the_unboxed_phrase_and_guide_it_there(family, tiny_pipe, monkeypatch):
    from saltdiff import salt_mixin
    from saltdiff.guidance import GuidanceConfig

    if family == "sd3":
        from saltdiff.pipeline_sd3 import SaltSD3Pipeline
        from saltdiff.testing_flow import tiny_sd3_pipeline

        pipe = SaltSD3Pipeline.from_pipe(tiny_sd3_pipeline())
        pipe.set_progress_bar_config(disable=True)
        kwargs = dict(num_inference_steps=4, height=32, width=32, max_sequence_length=16)
        target, name = type(pipe), "_sample"
    else:
        pipe = tiny_pipe
        kwargs = dict(num_inference_steps=4, height=32, width=32)
        target, name = salt_mixin, "denoise"
    seen = []
    real = getattr(target, name)

    def spy(*args, **kw):
        seen.append(kw["token_indices"])
        return real(*args, **kw)

    monkeypatch.setattr(target, name, spy)
    out = _placed_run(pipe, "a cat and a dog", **kwargs)
    (placed,) = out.info["placed_unboxed"]
    assert placed["phrase"] == "dog" and _overlap(placed["box"], (0.0, 0.0, 0.5, 0.5)) == 0.0
    assert len(seen[-1]) == 2 and out.attention_maps.shape[1] == 1  # guided on both, reported for the box
    free = _placed_run(pipe, "a cat and a dog", guidance=GuidanceConfig(placed_unboxed="free"), **kwargs)
    assert len(seen[-1]) == 1 and "placed_unboxed" in free.info


def test_a_generator_draws_the_place_among_the_good_ones():
    layout = Layout((Box("red circle", (0.0, 0.0, 0.4, 0.4)),), ("green square",))
    fixed = free_boxes(layout)
    draws = {free_boxes(layout, generator=torch.Generator().manual_seed(s))[0].box for s in range(8)}
    assert len(draws) > 3  # the seed moves it
    again = {free_boxes(layout, generator=torch.Generator().manual_seed(s))[0].box for s in range(8)}
    assert draws == again  # and the same seed puts it at the same place
    from saltdiff.placement import _distance_to_box

    best = _distance_to_box(*fixed[0].center, layout[0].box)
    for box in draws:
        assert _overlap(box, layout[0].box) == 0.0
        centre = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
        assert _distance_to_box(*centre, layout[0].box) >= 0.5 * best - 1e-9  # in the free space, not hugging
