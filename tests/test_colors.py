"""Reference backgrounds by name: special canvases, the built-in model's colours, CSS names, #rrggbb."""

import numpy as np
import pytest

from saltdiff.colors import background_rgb, background_suggestions, is_background
from saltdiff.layout import Layout
from saltdiff.reference import GeneratedObject, GeneratedObjects, UserImages
from saltdiff.registry import REFERENCE_BUILDERS
from saltdiff.worlds.shapes import BACKGROUND_COLORS


class _WhiteSquareObjects:
    """An object generator that draws a red square on white (no model), for canvas checks."""

    identity = None

    def __call__(self, prompts, *, phrases=None, height, width, num_inference_steps, guidance_scale, seed):
        image = np.ones((height, width, 3), np.float32)
        image[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (1.0, 0.0, 0.0)
        return [GeneratedObject(image.copy()) for _ in prompts]


@pytest.mark.parametrize(
    ("name", "rgb"),
    [
        ("beige", BACKGROUND_COLORS["beige"]),  # the built-in model's beige, not CSS's (245, 245, 220)
        ("Dark  Gray", BACKGROUND_COLORS["dark gray"]),
        ("light gray", BACKGROUND_COLORS["light gray"]),
        ("navy", (0, 0, 128)),
        ("LightBlue", (173, 216, 230)),
        ("#ff8800", (255, 136, 0)),
        ("prompt-color", None),
        ("gray", None),
        ("noise", None),
    ],
)
def test_background_names(name, rgb):
    assert background_rgb(name) == rgb
    assert is_background(name)


@pytest.mark.parametrize("bad", ["beigee", "#12345g", "", 3, None])
def test_unknown_background_is_refused_naming_it_and_what_is_accepted(bad):
    assert not is_background(bad)
    with pytest.raises(ValueError, match=r"#rrggbb, got") as info:
        REFERENCE_BUILDERS.get("objects").param("background").check(bad, "reference builder 'objects'")
    assert repr(bad) in str(info.value) and "prompt-color" in str(info.value)


def test_a_colour_background_paints_the_reference_canvas():
    layout = Layout.from_pairs([("red circle", (0.5, 0.5, 1.0, 1.0))])
    for name, rgb in (("beige", BACKGROUND_COLORS["beige"]), ("#102030", (16, 32, 48))):
        ref = GeneratedObjects(background=name, cache=False).build(
            _WhiteSquareObjects(), "a red circle", layout, height=32, width=32, generator=None
        )
        image = np.asarray(ref.image)
        assert tuple(image[2, 2]) == rgb  # outside the box: the canvas
        assert tuple(image[24, 24]) == (255, 0, 0)  # inside: the pasted object


def test_user_images_take_a_colour_but_not_a_generated_background():
    red = np.zeros((8, 8, 3), np.uint8)
    UserImages(objects={"red circle": red}, background="beige")
    with pytest.raises(ValueError, match="gray, white, noise or a colour"):
        UserImages(objects={"red circle": red}, background="prompt-color")
    with pytest.raises(ValueError, match="'plaid'"):
        UserImages(objects={"red circle": red}, background="plaid")


def test_suggestions_are_the_special_values_then_the_builtin_colours():
    names = background_suggestions()
    assert names[:5] == ["generated", "prompt-color", "gray", "white", "noise"]
    assert {"beige", "dark gray", "light gray"} <= set(names) and all(is_background(n) for n in names)
