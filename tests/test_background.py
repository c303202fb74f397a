"""The shapes world's background classifier: accuracy on rendered scenes, hard cases, degraded images."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from saltdiff.worlds.background import (
    BACKGROUND_TOLERANCE,
    UNKNOWN,
    BackgroundGuess,
    classify_background,
    touched_by_boxes,
)
from saltdiff.worlds.shapes import (
    BACKGROUND_COLORS,
    BACKGROUND_STYLES,
    SceneObject,
    render,
    render_objects,
    sample_scene,
)

SEEDS_PER_CELL = 12


@pytest.mark.parametrize("background", list(BACKGROUND_COLORS))
def test_accuracy_on_rendered_scenes_of_every_colour_and_style(background):
    """≥ 98 % right per colour × style on scenes with 1-3 objects, with and without the boxes given
    (measured: 100 % on 100 scenes per cell, both ways)."""
    for style in BACKGROUND_STYLES:
        right = 0
        for k in range(SEEDS_PER_CELL):
            scene = sample_scene(50_000 + 97 * k + len(style))
            img = render_objects(scene.objects, background, style, seed=k)
            right += classify_background(img).name == background
            right += classify_background(img, [o.box for o in scene.objects]).name == background
        assert right / (2 * SEEDS_PER_CELL) >= 0.98, (background, style, right)


def test_sampled_scenes_are_classified():
    scenes = [sample_scene(seed) for seed in range(60)]
    assert all(classify_background(render(s)).name == s.background for s in scenes)


HARD = [
    # (objects, background): dark saturated objects on dark gray, a large object, crowded scenes,
    # bright yellow and orange on white and beige, an object hiding one end of a gradient.
    ([SceneObject("blue", "square", (0.05, 0.05, 0.6, 0.6))], "dark gray"),
    ([SceneObject("purple", "circle", (0.3, 0.3, 0.85, 0.85))], "dark gray"),
    ([SceneObject("red", "triangle", (0.1, 0.4, 0.5, 0.95)), SceneObject("blue", "circle", (0.55, 0.1, 0.95, 0.5))], "dark gray"),
    ([SceneObject("yellow", "square", (0.02, 0.02, 0.57, 0.57))], "white"),
    ([SceneObject("yellow", "circle", (0.2, 0.2, 0.75, 0.75)), SceneObject("orange", "square", (0.0, 0.75, 0.25, 1.0))], "beige"),
    ([SceneObject("green", "square", (0.0, 0.0, 1.0, 0.45))], "light gray"),
    ([SceneObject(c, "square", (0.1 + 0.3 * (i % 3), 0.1 + 0.45 * (i // 3), 0.3 + 0.3 * (i % 3), 0.45 + 0.45 * (i // 3))) for i, c in enumerate(["red", "orange", "yellow", "green", "blue", "purple"])], "gray"),
]  # fmt: skip


@pytest.mark.parametrize("objects,background", HARD)
def test_hard_cases(objects, background):
    for style in BACKGROUND_STYLES:
        for seed in range(4):
            img = render_objects(objects, background, style, seed=seed)
            assert classify_background(img).name == background, (style, seed)
            assert classify_background(img, [o.box for o in objects]).name == background, (style, seed)


def test_boxes_covering_the_image_fall_back_to_the_object_mask():
    obj = SceneObject("blue", "circle", (0.25, 0.25, 0.75, 0.75))
    img = render_objects([obj], "beige", "gradient", seed=1)
    assert classify_background(img, [(0.0, 0.0, 1.0, 1.0)]).name == "beige"
    # An image that is all object: no background pixel at all, so no background can be named.
    full = render_objects([SceneObject("red", "square", (0.0, 0.0, 1.0, 1.0))], "white")
    assert classify_background(full).name == UNKNOWN


@pytest.mark.parametrize(
    "rgb", [(30, 85, 230), (225, 30, 30), (235, 215, 0), (120, 160, 220), (200, 170, 120)]
)
def test_off_palette_backgrounds_are_unknown(rgb):
    """Blue, red, yellow, a light blue and a tan background are none of the five names (before the
    reject option, blue came out "gray" and red "dark gray")."""
    canvas = np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (64, 64, 3)).copy()
    obj = SceneObject("green", "circle", (0.1, 0.1, 0.4, 0.4)) if rgb != (30, 165, 55) else None
    img = render_objects([obj], "white")
    img = np.where(render_objects([obj], "white") == render_objects([], "white"), canvas, img)
    for image in (canvas, img):
        assert classify_background(image).name == UNKNOWN, rgb
        assert classify_background(image, [obj.box]).name == UNKNOWN, rgb


def test_objects_covering_most_of_the_canvas():
    """With 10 % of the image left (about 7 % once object edges are grown) the background is still named; with less it is unknown, whatever
    the objects' colours (the fit would otherwise name the objects' mean colour)."""
    for background in BACKGROUND_COLORS:
        most = [
            SceneObject("blue", "square", (0.0, 0.0, 1.0, 0.8)),
            SceneObject("red", "square", (0.0, 0.8, 0.5, 1.0)),
        ]
        assert classify_background(render_objects(most, background)).name == background  # 10 % left
        nearly_all = [
            SceneObject("blue", "square", (0.0, 0.0, 1.0, 0.8)),
            SceneObject("red", "square", (0.0, 0.8, 0.95, 1.0)),
        ]
        assert classify_background(render_objects(nearly_all, background)).name == UNKNOWN


def test_the_tolerance_is_the_reject_threshold():
    """A blue tint on gray: 6 levels of blue keep it gray; 22 levels put it beyond the tolerance."""
    img = np.full((64, 64, 3), 150, dtype=np.uint8)
    img[..., 2] = 150 + 22
    guess = classify_background(img)
    assert guess.distance > BACKGROUND_TOLERANCE and guess.name == UNKNOWN
    assert classify_background(img, tolerance=guess.distance + 0.01).name == "gray"
    img[..., 2] = 150 + 6
    assert classify_background(img).name == "gray"


def test_blurred_noisy_and_faded_images():
    """Generated images are softer than renders: blur, pixel noise, and objects half faded into the background."""
    rng = np.random.default_rng(0)
    for background in BACKGROUND_COLORS:
        for k, style in enumerate(BACKGROUND_STYLES * 2):
            scene = sample_scene(70_000 + k)
            img = render_objects(scene.objects, background, style, seed=k).astype(np.float64)
            empty = render_objects([], background, style, seed=k).astype(np.float64)
            for degraded in (
                ndimage.gaussian_filter(img, (1.5, 1.5, 0)) + rng.normal(0, 6, img.shape),
                img + rng.normal(0, 8, img.shape),
                0.5 * img + 0.5 * empty,
            ):
                out = np.clip(np.rint(degraded), 0, 255).astype(np.uint8)
                assert classify_background(out).name == background, (background, style)


def test_inputs_and_guess_fields():
    img = render_objects([SceneObject("red", "circle", (0.1, 0.1, 0.4, 0.4))], "gray", "plain")
    guess = classify_background(Image.fromarray(img))
    assert isinstance(guess, BackgroundGuess) and guess.name == "gray"
    assert guess.rgb == pytest.approx((150.0, 150.0, 150.0), abs=0.5)
    assert guess.distance == pytest.approx(0.0, abs=0.5) and guess.confidence > 0.9
    assert classify_background(img.astype(np.float32) / 255.0).name == "gray"  # floats in [0, 1]
    # Halfway between white and light gray: low confidence.
    mid = np.full((64, 64, 3), 221, dtype=np.uint8)
    assert classify_background(mid).confidence < 0.2
    with pytest.raises(ValueError, match="shape"):
        classify_background(np.zeros((8, 8), dtype=np.uint8))


def test_touched_by_boxes():
    mask = touched_by_boxes([(0.1, 0.0, 0.26, 0.5)], 10, 10)
    assert mask.sum() == 5 * 2 and mask[0, 1] and mask[4, 2] and not mask[5, 1] and not mask[0, 3]
