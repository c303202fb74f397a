"""Cut-outs on synthetic object images whose true mask is known.

Each case is an object image as a text-to-image model draws "a {phrase} on a white background"
when it does not quite obey (soft shadow, vignette, off-white gradient, clutter, a white object on
white), and an attention map as cross-attention looks: the object seen through a 16×16 (or 8×8)
grid, peaked on its centre, blurred, a little off, noisy, with a weak stray spot elsewhere. The
attention is built from the true mask only through that degradation; no cut-out sees the mask.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from saltdiff.cutout import (
    CUTOUTS,
    attention_color_mask,
    attention_mask,
    border_color_mask,
    cut_out,
    has_location,
)

SIZE = 128


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def _grid(size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:size, :size]
    return (yy + 0.5) / size, (xx + 0.5) / size


def shape_mask(kind: str, size: int = SIZE) -> np.ndarray:
    """An object's true mask: an ellipse, a rounded square, a triangle or a mug (body and handle)."""
    y, x = _grid(size)
    if kind == "ellipse":
        return ((x - 0.5) / 0.27) ** 2 + ((y - 0.5) / 0.21) ** 2 <= 1
    if kind == "rounded-square":
        dx, dy = np.maximum(np.abs(x - 0.5) - 0.16, 0), np.maximum(np.abs(y - 0.5) - 0.16, 0)
        return np.hypot(dx, dy) <= 0.08
    if kind == "triangle":
        return (y <= 0.78) & (y >= 0.22 + 2 * np.abs(x - 0.5) * 0.56 / 0.6)
    if kind == "mug":
        body = (np.abs(x - 0.45) <= 0.2) & (np.abs(y - 0.52) <= 0.24)
        ring = np.hypot((x - 0.66) / 0.12, (y - 0.5) / 0.14)
        return body | ((ring <= 1) & (ring >= 0.55))
    raise ValueError(kind)


def compose(background: np.ndarray, mask: np.ndarray, color, rng: np.random.Generator) -> np.ndarray:
    """The object (a flat colour, or a per-pixel array) over the background, edges anti-aliased, with
    a little pixel noise as a decoder leaves."""
    alpha = ndimage.gaussian_filter(mask.astype(np.float64), 0.5)[..., None]
    color = np.broadcast_to(np.asarray(color, dtype=np.float64), background.shape)
    image = alpha * color + (1 - alpha) * background
    return np.clip(image + rng.normal(0, 0.01, image.shape), 0, 1).astype(np.float32)


def plausible_attention(
    mask: np.ndarray, rng: np.random.Generator, *, cells: int = 16, shift=(0.6, -0.5)
) -> np.ndarray:
    """What a phrase's averaged cross-attention looks like for an object with this mask.

    Peaked on the object's centre (the distance to its edge), blurred by a cell, shifted by
    ``shift`` cells (the map and the pixels do not line up exactly), averaged into ``cells × cells``,
    with a floor, noise of 8 % of the peak and a stray spot at 30 % of the peak.
    """
    size = mask.shape[0]
    cell = size / cells
    density = ndimage.distance_transform_edt(mask)
    density = ndimage.gaussian_filter(density / density.max(), cell)
    density = ndimage.shift(density, (shift[0] * cell, shift[1] * cell), order=1, mode="constant")
    low = density.reshape(cells, size // cells, cells, size // cells).mean(axis=(1, 3))
    low = low / low.max()
    yy, xx = np.mgrid[:cells, :cells]
    sy, sx = (cells - 1.5, 1.5) if mask[-size // 8 :, : size // 8].sum() == 0 else (1.5, cells - 1.5)
    stray = 0.3 * np.exp(-((yy - sy) ** 2 + (xx - sx) ** 2) / 2.0)
    noisy = low + stray + 0.03 + rng.normal(0, 0.08, low.shape)
    return np.clip(noisy, 0, None).astype(np.float32)


def white(size: int = SIZE, level: float = 0.99) -> np.ndarray:
    return np.full((size, size, 3), level, dtype=np.float64)


def case_clean(rng, kind="ellipse", color=(0.85, 0.1, 0.1)):
    mask = shape_mask(kind)
    return compose(white(), mask, color, rng), mask


def case_shadow(rng):
    """A soft cast shadow, down and to the right, half as dark as black where it is darkest."""
    mask = shape_mask("mug")
    cast = ndimage.shift(mask.astype(np.float64), (0.07 * SIZE, 0.09 * SIZE), order=0)
    cast = ndimage.gaussian_filter(cast, 0.05 * SIZE)
    background = white() * (1 - 0.5 * cast / cast.max())[..., None]
    return compose(background, mask, (0.15, 0.3, 0.8), rng), mask


def case_vignette(rng):
    """A warm white that falls off to 55 % in the corners, as studio shots and some models draw."""
    y, x = _grid()
    falloff = 1 - 0.45 * ((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.5
    background = np.array([1.0, 0.97, 0.92]) * falloff[..., None]
    return compose(background, shape_mask("rounded-square"), (0.2, 0.65, 0.25), rng), shape_mask(
        "rounded-square"
    )


def case_gradient(rng):
    """An off-white at the top that turns into a cool grey at the bottom (a paper sweep lit from
    above): the border's median colour is neither."""
    y, _ = _grid()
    t = (y**1.5)[..., None]
    background = (1 - t) * np.array([0.98, 0.95, 0.88]) + t * np.array([0.58, 0.62, 0.7])
    mask = shape_mask("triangle")
    return compose(background, mask, (0.95, 0.55, 0.1), rng), mask


def case_clutter(rng):
    """A busy scene behind the object: rectangles and blobs of many colours, some touching it, one in
    the object's own colour away from it, over a textured beige."""
    y, x = _grid()
    background = np.array([0.82, 0.76, 0.66]) + rng.normal(0, 0.04, (SIZE, SIZE, 1))
    palette = [(0.3, 0.3, 0.35), (0.9, 0.9, 0.85), (0.2, 0.5, 0.3), (0.75, 0.2, 0.15), (0.95, 0.8, 0.2)]
    for i in range(14):
        cy, cx = rng.uniform(0, 1, 2)
        hy, hx = rng.uniform(0.05, 0.18, 2)
        color = np.array(palette[i % len(palette)]) + rng.normal(0, 0.03, 3)
        if i % 2:
            region = (np.abs(y - cy) <= hy) & (np.abs(x - cx) <= hx)
        else:
            region = ((y - cy) / hy) ** 2 + ((x - cx) / hx) ** 2 <= 1
        background[region] = color
    own = ((y - 0.9) / 0.06) ** 2 + ((x - 0.12) / 0.08) ** 2 <= 1  # the object's colour, elsewhere
    background[own] = (0.55, 0.2, 0.65)
    background = ndimage.gaussian_filter(np.clip(background, 0, 1), (0.8, 0.8, 0))
    mask = shape_mask("ellipse")
    return compose(background, mask, (0.55, 0.2, 0.65), rng), mask


def case_white_on_white(rng):
    """A white mug on white, lit from the top left: Lambertian shading (0.80 where it turns from the
    light, 0.92 facing the camera, 0.98 facing the light) and a darker rim where the surface turns away from the camera,
    as white ceramic renders: most of it within 0.08 of the background."""
    mask = shape_mask("mug")
    depth = ndimage.distance_transform_edt(mask)
    height = np.sqrt(np.clip(depth / 6.0, 0, 1))  # a body that bulges over its outer 6 px
    gy, gx = np.gradient(ndimage.gaussian_filter(height, 1.0))
    normal = np.stack([-gx * 6, -gy * 6, np.ones_like(gx)])
    normal /= np.linalg.norm(normal, axis=0)
    light = np.array([-1.0, -1.0, 2.0]) / np.sqrt(6.0)
    lambert = np.clip(np.tensordot(light, normal, axes=1), 0, 1)
    shade = (0.62 + 0.37 * lambert)[..., None] * np.ones(3)
    return compose(white(level=0.995), mask, shade, rng), mask


HARD_CASES = {
    "soft-shadow": case_shadow,
    "vignette": case_vignette,
    "off-white-gradient": case_gradient,
    "clutter": case_clutter,
    "white-on-white": case_white_on_white,
}
CLEAN_CASES = {
    "clean-red-ellipse": lambda rng: case_clean(rng),
    "clean-yellow-triangle": lambda rng: case_clean(rng, "triangle", (0.95, 0.85, 0.15)),
    "clean-blue-mug": lambda rng: case_clean(rng, "mug", (0.15, 0.3, 0.8)),
}


def build(name: str, seed: int = 0):
    rng = np.random.default_rng(seed)
    image, mask = {**HARD_CASES, **CLEAN_CASES}[name](rng)
    return image, mask, rng


def table(cells: int = 16, seeds=(0, 1, 2)) -> dict[str, dict[str, float]]:
    """Mean IoU with the true mask per case and cut-out (``python tests/test_cutout.py`` prints it)."""
    rows = {}
    for name in [*HARD_CASES, *CLEAN_CASES]:
        scores = {m: [] for m in CUTOUTS}
        for seed in seeds:
            image, mask, rng = build(name, seed)
            attention = plausible_attention(mask, rng, cells=cells)
            for method in CUTOUTS:
                scores[method].append(iou(cut_out(image, attention, method), mask))
        rows[name] = {m: float(np.mean(v)) for m, v in scores.items()}
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(HARD_CASES))
def test_attention_color_cuts_out_hard_cases(name, seed):
    image, mask, rng = build(name, seed)
    attention = plausible_attention(mask, rng)
    assert iou(attention_color_mask(image, attention), mask) >= 0.8


@pytest.mark.parametrize("name", [n for n in HARD_CASES if n != "clutter"])
def test_attention_color_survives_coarse_attention(name):
    """8×8 attention (SD's coarsest layer at 512²; a cell is an eighth of the image)."""
    image, mask, rng = build(name)
    attention = plausible_attention(mask, rng, cells=8)
    assert iou(attention_color_mask(image, attention), mask) >= 0.8


def test_coarse_attention_on_clutter_still_beats_colour_alone():
    """The known limit: with 8×8 attention, clutter touching the object can join it (mean IoU about
    0.75 over these seeds), but the cut-out stays well above the border-colour one."""
    ours, colour = [], []
    for seed in (0, 1, 2):
        image, mask, rng = build("clutter", seed)
        attention = plausible_attention(mask, rng, cells=8)
        ours.append(iou(attention_color_mask(image, attention), mask))
        colour.append(iou(border_color_mask(image), mask))
    assert np.mean(ours) >= np.mean(colour) + 0.15


def test_broad_attention_does_not_take_the_background_with_it():
    """A map that covers most of the image (a cone from the centre to the corners) makes the
    attention core's colours mostly background; the cut-out still keeps only the object."""
    image = np.ones((32, 32, 3), dtype=np.float32)
    image[8:24, 8:24] = (1.0, 0.0, 0.0)
    yy, xx = np.mgrid[:8, :8]
    attention = 1.0 - np.hypot(yy - 3.5, xx - 3.5) / np.hypot(3.5, 3.5)
    mask = attention_color_mask(image, attention)
    assert mask[8:24, 8:24].all() and mask.sum() == 16 * 16


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", list(CLEAN_CASES))
def test_attention_color_keeps_clean_cases_exact(name, seed):
    image, mask, rng = build(name, seed)
    attention = plausible_attention(mask, rng)
    assert iou(attention_color_mask(image, attention), mask) >= 0.95
    assert iou(border_color_mask(image), mask) >= 0.9  # its home ground (it fills the handle opening)


def test_the_hard_cases_are_hard_for_each_cue_alone():
    """Neither colour nor attention alone reaches 0.8 on most of the hard cases (else they test nothing)."""
    colour_fails = attention_fails = 0
    for name in HARD_CASES:
        image, mask, rng = build(name)
        attention = plausible_attention(mask, rng)
        colour_fails += iou(border_color_mask(image), mask) < 0.8
        attention_fails += iou(attention_mask(attention, SIZE, SIZE), mask) < 0.8
    assert colour_fails >= 4 and attention_fails >= 4


def test_the_attention_is_not_the_mask():
    """The synthetic attention is coarse and off: thresholded, it is a poor outline by itself."""
    for name in HARD_CASES:
        _, mask, rng = build(name)
        attention = plausible_attention(mask, rng)
        assert attention.shape == (16, 16)
        assert iou(attention_mask(attention, SIZE, SIZE), mask) < 0.85


@pytest.mark.parametrize("attention", [None, np.zeros((16, 16)), np.full((16, 16), np.nan), np.zeros(0)])
def test_without_usable_attention_the_cutout_is_the_colour_one(attention):
    image, _, _ = build("clean-red-ellipse")
    assert not has_location(attention)
    expected = border_color_mask(image)
    assert np.array_equal(attention_color_mask(image, attention), expected)
    assert np.array_equal(cut_out(image, attention, "attention-color"), expected)
    assert np.array_equal(cut_out(image, attention, "attention"), expected)


def test_cut_out_dispatches_by_name_and_refuses_unknown_names():
    image, mask, rng = build("vignette")
    attention = plausible_attention(mask, rng)
    assert np.array_equal(cut_out(image, attention, "foreground"), border_color_mask(image))
    assert np.array_equal(cut_out(image, attention, "attention"), attention_mask(attention, SIZE, SIZE))
    assert np.array_equal(cut_out(image, attention), attention_color_mask(image, attention))
    with pytest.raises(ValueError, match="grabcut"):
        cut_out(image, attention, "grabcut")


def test_attention_color_works_at_the_built_in_models_size():
    """64×64 images with 16×16 attention, as ``builtin:shapes`` makes them."""
    rng = np.random.default_rng(0)
    small = ndimage.zoom(shape_mask("ellipse"), 0.5, order=0)
    y, x = _grid(64)
    background = np.array([0.97, 0.96, 0.93]) * (1 - 0.3 * ((x - 0.5) ** 2 + (y - 0.5) ** 2) / 0.5)[..., None]
    image = compose(background, small, (0.2, 0.3, 0.85), rng)
    attention = plausible_attention(small, rng, cells=16)
    assert iou(attention_color_mask(image, attention), small) >= 0.9


if __name__ == "__main__":
    for cells in (16, 8):
        print(f"attention {cells}x{cells}; mean IoU over seeds 0-2")
        print(f"{'case':24s}" + "".join(f"{m:>17s}" for m in CUTOUTS))
        for name, row in table(cells).items():
            print(f"{name:24s}" + "".join(f"{row[m]:17.3f}" for m in CUTOUTS))


class _Objects:
    """An ObjectGenerator that draws the vignette case for every prompt, with or without attention."""

    identity = None

    def __init__(self, with_attention: bool):
        self.with_attention = with_attention

    def __call__(self, prompts, *, phrases=None, height, width, num_inference_steps, guidance_scale, seed):
        from saltdiff.reference import GeneratedObject

        image, mask, rng = build("vignette")
        attention = plausible_attention(mask, rng) if self.with_attention and phrases else None
        return [GeneratedObject(image, attention) for _ in prompts]


@pytest.mark.parametrize("with_attention", [True, False])
def test_generated_objects_cut_out_with_attention_by_default(with_attention):
    """The reference builder's default cut-out uses the phrase's map; without one it cuts by colour."""
    from saltdiff.layout import Layout
    from saltdiff.reference import GeneratedObjects

    builder = GeneratedObjects(background="white", cache=False)
    assert builder.cutout == "attention-color"
    layout = Layout.from_pairs([("green square", (0.0, 0.0, 1.0, 1.0))])
    ref = builder.build(_Objects(with_attention), "x", layout, height=SIZE, width=SIZE, generator=None)
    # The cut-out is cropped to its bounding box and stretched to the box: a tight one fills it.
    image, mask, _ = build("vignette")
    ys, xs = np.nonzero(mask)
    expected_fill = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].mean()
    fill = ref.object_masks[0].mean()
    if with_attention:
        assert abs(fill - expected_fill) < 0.03
    else:  # the colour cut-out takes the vignette's bright middle: a disc around the square
        assert fill < expected_fill - 0.1
